"""`dlora validate`: the simulator's fidelity against the live system on one scenario.

Runs the scenario live (dlora.live), then simulates the identical request list (fresh copies of
the live run's requests: same ids, arrival times, lengths and adapters) with the scenario's
profile (`model.profile`, measured by `dlora profile`), and compares mean and P90 end-to-end
latency, TTFT and TPOT, throughput and the number of merged/unmerged mode switches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..labels import seconds
from ..live.driver import build_live_report, run, scheduler_note, workload_requests
from ..live.machine_load import busy_warning
from ..metrics import Report
from ..output import write_outputs
from ..report import build_report
from ..scenario import Scenario, resolve
from ..sim.driver import simulate
from ..types import Request

log = logging.getLogger(__name__)

# (row label, summary key, statistic or None, goal on |relative error| or None)
METRICS: tuple[tuple[str, str, str | None, float | None], ...] = (
    ("mean latency (s)", "latency_s", "mean", 0.05),
    ("P90 latency (s)", "latency_s", "p90", 0.10),
    ("mean TTFT (s)", "ttft_s", "mean", 0.10),
    ("P90 TTFT (s)", "ttft_s", "p90", 0.10),
    ("mean TPOT (s)", "tpot_s", "mean", 0.10),
    ("P90 TPOT (s)", "tpot_s", "p90", 0.10),
    ("throughput (req/s)", "throughput_rps", None, None),
    ("throughput (output tokens/s)", "throughput_output_tokens_per_s", None, None),
    ("mode switches", "switches", None, None),
    ("completed requests", "completed", None, None),
)


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    live: float | None
    simulated: float | None
    rel_error: float | None  # (simulated - live) / live
    goal: float | None  # bound on |rel_error|, where the issue sets one
    live_min: float | None = None  # over repeated live runs
    live_max: float | None = None

    @property
    def meets_goal(self) -> bool | None:
        if self.goal is None or self.rel_error is None:
            return None
        return abs(self.rel_error) <= self.goal


@dataclass
class Validation:
    scenario: str
    profile: str
    rows: list[Row]
    live: Report
    sim: Report
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "profile": self.profile,
                "rows": [{**asdict(r), "meets_goal": r.meets_goal} for r in self.rows],
                "live_summary": self.live.summary, "sim_summary": self.sim.summary,
                "live": self.live.extra.get("live", {}), "notes": self.notes}


def fresh_copy(r: Request) -> Request:
    """A not-yet-run request with the same id, adapter, arrival time, lengths and prompt (its
    token ids and prefix group, which prefix caching hashes)."""
    return Request(id=r.id, adapter_id=r.adapter_id, arrival_s=r.arrival_s,
                   prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens,
                   prompt_token_ids=r.prompt_token_ids, prefix_group=r.prefix_group,
                   prefix_tokens=r.prefix_tokens)


def _value(summary: dict[str, Any], key: str, stat: str | None) -> float | None:
    if key == "switches":
        return float(summary["totals"]["switches"])
    v = summary[key] if stat is None else summary[key][stat]
    return None if v is None else float(v)


def compare(live: dict[str, Any] | list[dict[str, Any]], sim: dict[str, Any]) -> list[Row]:
    """Rows of live vs simulated; with several live runs the live value is their mean (the
    simulator is deterministic; the live system on a shared CPU is not)."""
    runs = live if isinstance(live, list) else [live]
    rows = []
    for label, key, stat, goal in METRICS:
        values = [v for v in (_value(r, key, stat) for r in runs) if v is not None]
        a = sum(values) / len(values) if values else None
        b = _value(sim, key, stat)
        err = None if a is None or b is None or a == 0 else (b - a) / a
        rows.append(Row(label, a, b, err, goal, min(values, default=None), max(values, default=None)))
    return rows


def validate(scenario: Scenario, out_dir: Path | None = None, *, device: str | None = None,
             progress: Callable[[int, int], None] | None = None, repeats: int = 1,
             status: Callable[[str], None] | None = None) -> Validation:
    """Run live (`repeats` times: the live values are their means), simulate the same requests,
    compare (and write validate.json and the outputs under `out_dir`/live and `out_dir`/sim).
    `status` hears each stage as it starts; a machine busy with other work during a live run
    (`live.machine_load`) adds a warning to the notes."""
    summaries = []
    warnings: list[str] = []
    for i in range(repeats):
        requests = workload_requests(scenario)
        log.info("validate: running %d requests live (%d/%d)", len(requests), i + 1, repeats)
        if status is not None:
            status(f"live run {i + 1} of {repeats}" if repeats > 1 else "live run")
        live = run(scenario, requests=requests, device=device, progress=progress, status=status)
        live_report = build_live_report(live)
        summaries.append(live_report.summary)
        advice = "rerun on an idle machine (stop other jobs first), or with --repeats 3 to see the spread"
        warning = busy_warning(live.live.get("machine", {}), "the live values", advice)
        if warning:
            warnings.append(warning if repeats == 1 else f"{warning} (live run {i + 1})")
    sim_requests = [fresh_copy(r) for r in live.requests]
    log.info("validate: simulating the same %d requests", len(sim_requests))
    if status is not None:
        status(f"simulating the same {len(sim_requests)} requests with {scenario.model.profile}")
    sim = simulate(scenario, requests=sim_requests)  # prefix caching as the live run: cluster.prefix_caching
    sim_report = build_report(sim)
    result = Validation(scenario.name, str(resolve(scenario, scenario.model.profile)),
                        compare(summaries, sim_report.summary), live_report, sim_report)
    if repeats > 1:
        result.notes.append(f"live values are means of {repeats} runs (the last run's outputs are written)")
    result.notes.append(f"live run: {seconds(live.wall_s)} wall; {scheduler_note(live.live)}")
    result.notes.extend(warnings)
    if out_dir is not None:
        names = scenario.adapters.adapter_names()
        write_outputs(out_dir / "live", live_report, live.requests, names, live.queue_samples)
        write_outputs(out_dir / "sim", sim_report, sim.requests, names, sim.queue_samples)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "validate.json"
        path.write_text(json.dumps(result.as_dict(), indent=2, sort_keys=True, default=str) + "\n")
        result.notes.append(f"wrote validate.json, live/ and sim/ to {out_dir}")
    return result
