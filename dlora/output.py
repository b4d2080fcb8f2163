"""Writing a run's outputs: report.json, requests.csv, PNG plots, and the rich summary table.

Used by every command that produces a report (simulate, run, validate, sweeps)."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .labels import SCENARIO_SECTIONS, count, label, number, percent, seconds, value
from .metrics import Report, write_requests_csv
from .types import Request


def write_outputs(out_dir: Path, report: Report, requests: Sequence[Request], adapter_names: Sequence[str],
                  queue_samples: Sequence[Sequence[tuple[float, int]]] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "requests.csv"]
    paths[0].write_text(report.to_json())
    write_requests_csv(paths[1], requests, adapter_names)
    if report.timings:
        import json

        paths.append(out_dir / "timings.json")
        paths[-1].write_text(json.dumps(report.timings, indent=2, sort_keys=True, default=str) + "\n")
    from .plots import plot_latency_cdf, plot_queue_lengths

    paths.append(plot_latency_cdf(out_dir / "latency_cdf.png", {report.scenario: requests}))
    if queue_samples:
        paths.append(plot_queue_lengths(out_dir / "queue_length.png", queue_samples))
    return paths


def _ms(x: float | None) -> str:
    return "-" if x is None else number(x * 1e3)


DISTRIBUTIONS = (("latency_s", "end-to-end latency"), ("latency_per_token_s", "latency per output token"),
                 ("ttft_s", "TTFT (first token)"), ("tpot_s", "TPOT (per output token)"),
                 ("queueing_s", "queueing delay"))


def summary_table(report: Report) -> Table:
    """The run at a glance: counts, throughput, SLO; the latency distributions are in
    `latency_table`."""
    s = report.summary
    t = Table(title=f"dlora: {report.scenario}", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests: completed / rejected / unfinished",
              f"{count(s['completed'])} / {count(s['rejected'])} / {count(s['unfinished'])}")
    t.add_row("throughput", f"{number(s['throughput_rps'])} req/s")
    t.add_row("output throughput", f"{number(s['throughput_output_tokens_per_s'])} tokens/s")
    slo = s["slo"]
    t.add_row(f"SLO attainment (latency/token <= {seconds(slo['latency_per_token_s'])})",
              percent(slo["attainment"]))
    t.add_row("mean latency/token within the SLO", "yes" if slo["mean_within_slo"] else "no")
    t.add_row("preemptions / migrations", f"{count(s['preemptions'])} / {count(s['migrations'])}")
    return t


def latency_table(report: Report) -> Table:
    """Mean and percentiles of each latency, in ms, one row per metric."""
    s = report.summary
    t = Table(title="latency (ms) over completed requests", header_style="bold")
    t.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        t.add_column(col, justify="right")
    for key, words in DISTRIBUTIONS:
        st = s[key]
        t.add_row(words, *[_ms(st[c]) for c in ("mean", "p50", "p90", "p99")])
    return t


REPLICA_ROWS = (  # (report key, label, as percent)
    ("completed", "requests completed", False), ("utilisation", "busy (% of run)", True),
    ("queueing_share", "queueing (% of latency)", True), ("iterations", "iterations", False),
    ("merged_iterations", "merged iterations", False), ("unmerged_iterations", "unmerged iterations", False),
    ("switches", "merge switches", False), ("credit_forced_batches", "credit-forced batches", False),
    ("adapter_loads", "adapter loads", False), ("recomputes", "preempted: recompute", False),
    ("swaps", "preempted: swap", False), ("prefix_hit_tokens", "prefix-cache hit tokens", False),
    ("migrated_in", "migrated in", False), ("migrated_out", "migrated out", False),
)
TRANSPOSE_MAX = 6  # replicas shown one column each; more: min / mean / max over replicas


def replica_table(report: Report) -> Table:
    """Per-replica decisions as rows of metrics, fitting 80 columns: one column per replica
    up to TRANSPOSE_MAX replicas, else the spread (min, mean, max and which replica has the
    max); the full table is in report.json."""
    rows = report.replicas
    t = Table(title="per replica", header_style="bold")
    t.add_column("metric")

    def cell(v: Any, pct: bool) -> str:
        return percent(v) if pct else count(v)

    if len(rows) <= TRANSPOSE_MAX:
        for row in rows:
            t.add_column(f"r{row.get('replica', '?')}", justify="right")
        for key, label, pct in REPLICA_ROWS:
            t.add_row(label, *[cell(row.get(key, 0), pct) for row in rows])
        return t
    for name in ("min", "mean", "max", "max at"):
        t.add_column(name, justify="right")
    for key, label, pct in REPLICA_ROWS:
        values = [row.get(key, 0) for row in rows]
        top = max(range(len(values)), key=lambda i: values[i])
        mean = sum(values) / len(values)
        t.add_row(label, cell(min(values), pct), cell(mean if pct else round(mean), pct),
                  cell(values[top], pct), f"r{rows[top].get('replica', top)}")
    return t


def print_report(report: Report, console: Console | None = None, per_replica: bool = True) -> None:
    console = console or Console()
    console.print(summary_table(report))
    console.print(latency_table(report))
    if per_replica and len(report.replicas) <= 32:
        console.print(replica_table(report))


def comparison_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    """A sweep's rows; columns named by summary fields or key paths are headed in words with
    units (`latency_per_token_s.mean` -> "mean latency per output token (ms)") and their
    values scaled to match; report.json / sweep.json keep the stored values."""
    t = Table(title=title, header_style="bold")
    for c in columns:
        if c == "variant":
            t.add_column(c, no_wrap=True)
        else:
            t.add_column(label(c).text, justify="right")
    for row in rows:
        t.add_row(*[value(c, row.get(c)) for c in columns])
    return t


def fits(table: Table, width: int = 80) -> bool:
    """Whether `table` prints within `width` columns with no cell cut short (rich cuts a word
    that a column cannot hold with "…")."""
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    return "…" not in text and max(map(len, text.splitlines()), default=0) <= width


def comparison_tables(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                      keys: int = 1, width: int = 80) -> list[Table]:
    """`comparison_table`, split so that each part fits `width` columns without cutting a
    word: the first `keys` columns (variant, swept parameter) in every part, then as many
    metrics as fit (at least one)."""
    head, metrics = list(columns[:keys]), list(columns[keys:])
    parts: list[list[str]] = []
    for m in metrics:
        if parts and fits(comparison_table(title, rows, head + parts[-1] + [m]), width):
            parts[-1].append(m)
        else:
            parts.append([m])
    if len(parts) <= 1:
        return [comparison_table(title, rows, columns)]
    return [comparison_table(f"{title} ({i + 1}/{len(parts)})", rows, head + part)
            for i, part in enumerate(parts)]


class StatusLine:
    """What a long command is doing, on stderr from its first second: on a terminal one
    transient line (spinner, message, elapsed time) replaced by each `update`; elsewhere (a
    pipe, a log file) one line per new stage, "[  3.2 s] loading the model", with count
    updates (`update(msg, transient=True)`) left out. Use as a context manager; calling the
    object is `update`."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None
        self._stage = ""

    def __enter__(self) -> StatusLine:
        self.t0 = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, message: str, transient: bool = False) -> None:
        if not self.enabled:
            return
        if not transient:
            self._stage = message
        if self._progress is not None:
            self._progress.update(self._task, description=escape(message))
        elif not transient:
            self.console.print(f"[{time.perf_counter() - self.t0:6.1f} s] {message}", highlight=False,
                               markup=False, soft_wrap=True)

    def __call__(self, message: str) -> None:
        self.update(message)

    def progress(self, done: int, total: int) -> None:
        """A `progress(done, total)` callback: the current stage with a count of requests."""
        self.update(f"{self._stage}: {count(done)} of {count(total)} finished", transient=True)


@dataclass
class Outcome:
    """What a command prints: a report and/or a sweep table, notes for stderr, files written."""

    report: Report | None = None
    sweep_rows: list[dict[str, Any]] = field(default_factory=list)
    sweep_columns: list[str] = field(default_factory=list)
    title: str = ""
    notes: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def print(self, console: Console) -> None:
        if self.report is not None:
            print_report(self.report, console)
        if self.sweep_rows:
            cols = self.sweep_columns
            keys = 1 + (len(cols) > 1 and cols[1].split(".")[0] in SCENARIO_SECTIONS)  # the swept parameter
            for table in comparison_tables(self.title, self.sweep_rows, self.sweep_columns, keys):
                console.print(table)
