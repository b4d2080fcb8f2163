"""Writing a run's outputs: report.json, requests.csv, PNG plots, and the rich summary table.

Used by every command that produces a report (simulate, run, validate, sweeps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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
    return "-" if x is None else f"{x * 1000:.1f}"


def summary_table(report: Report) -> Table:
    s = report.summary
    t = Table(title=f"dlora: {report.scenario}", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests completed / rejected / unfinished", f"{s['completed']} / {s['rejected']} / {s['unfinished']}")
    t.add_row("throughput (req/s)", f"{s['throughput_rps']:.3f}")
    t.add_row("throughput (output tokens/s)", f"{s['throughput_output_tokens_per_s']:.1f}")
    for key, label in (("latency_s", "end-to-end latency (ms)"), ("latency_per_token_s", "latency per output token (ms)"),
                       ("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"), ("queueing_s", "queueing (ms)")):
        st = s[key]
        t.add_row(label, f"mean {_ms(st['mean'])}  p50 {_ms(st['p50'])}  p90 {_ms(st['p90'])}  p99 {_ms(st['p99'])}")
    slo = s["slo"]
    att = slo["attainment"]
    t.add_row(f"SLO attainment (<= {slo['latency_per_token_s']} s/token)", "-" if att is None else f"{att * 100:.1f}%")
    t.add_row("mean latency/token within SLO", "yes" if slo["mean_within_slo"] else "no")
    t.add_row("preemptions / migrations", f"{s['preemptions']} / {s['migrations']}")
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
        return f"{v * 100:.1f}%" if pct else (f"{v:,.0f}" if isinstance(v, float) else f"{v:,}")

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
    if per_replica and len(report.replicas) <= 32:
        console.print(replica_table(report))


def comparison_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right")
    for row in rows:
        t.add_row(*[_fmt(row.get(c)) for c in columns])
    return t


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
            console.print(comparison_table(self.title, self.sweep_rows, self.sweep_columns))
