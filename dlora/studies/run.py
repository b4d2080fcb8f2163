"""Run a scenario (one simulation, or every point of its sweep) and collect the outputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..output import Outcome, write_outputs
from ..report import build_report
from ..scenario import Scenario, scenario_from_dict, sweep_points
from ..sim.driver import simulate

log = logging.getLogger(__name__)


def metric(summary: dict[str, Any], path: str) -> Any:
    node: Any = summary
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_scenario(sc: Scenario, out_dir: Path | None, progress: Callable[[int, int], None] | None = None) -> Outcome:
    if sc.sweep is not None:
        return run_sweep(sc, out_dir)
    result = simulate(sc, progress=progress)
    report = build_report(result)
    outcome = Outcome(report=report)
    n = len(result.requests)
    outcome.notes.append(f"simulated {n} requests in {result.wall_s:.2f} s wall ({n / max(result.wall_s, 1e-9):.0f} requests/s)")
    if out_dir is not None:
        outcome.paths = write_outputs(out_dir, report, result.requests, sc.adapters.adapter_names(), result.queue_samples)
        outcome.notes.append(f"wrote {', '.join(p.name for p in outcome.paths)} to {out_dir}")
    return outcome


def run_sweep(sc: Scenario, out_dir: Path | None) -> Outcome:
    """Every (variant, value) point of the sweep: one comparison table, one plot per metric."""
    from ..plots import plot_latency_cdf, plot_sweep

    sweep = sc.sweep
    assert sweep is not None
    raw = _raw(sc)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for point in sweep_points(sc, raw):
        psc = scenario_from_dict(point.data, Path(sc.base_dir))
        log.info("sweep point %s %s=%s", point.variant, sweep.parameter, point.value)
        result = simulate(psc)
        report = build_report(result)
        row: dict[str, Any] = {"variant": point.variant or psc.policies.batching.name}
        if sweep.parameter:
            row[sweep.parameter] = point.value
        for m in sweep.metrics:
            row[m] = metric(report.summary, m)
        rows.append(row)
        runs[f"{row['variant']} {point.value if sweep.parameter else ''}".strip()] = result.requests
        if out_dir is not None:
            sub = out_dir / _slug(f"{row['variant']}-{point.value}" if sweep.parameter else row["variant"])
            write_outputs(sub, report, result.requests, psc.adapters.adapter_names(), result.queue_samples)
    columns = ["variant"] + ([sweep.parameter] if sweep.parameter else []) + list(sweep.metrics)
    outcome = Outcome(sweep_rows=rows, sweep_columns=columns, title=f"{sc.name}: sweep")
    if out_dir is not None:
        import json

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "sweep.json").write_text(json.dumps({"scenario": sc.name, "rows": rows}, indent=2, sort_keys=True, default=str) + "\n")
        outcome.paths.append(out_dir / "sweep.json")
        if sweep.parameter:
            variants = list(dict.fromkeys(r["variant"] for r in rows))
            xs = list(dict.fromkeys(r[sweep.parameter] for r in rows))
            for m in sweep.metrics:
                series = {v: [next((r[m] for r in rows if r["variant"] == v and r[sweep.parameter] == x), None) for x in xs] for v in variants}
                outcome.paths.append(plot_sweep(out_dir / f"sweep_{_slug(m)}.png", sweep.parameter, xs, series, m))
        else:
            outcome.paths.append(plot_latency_cdf(out_dir / "latency_cdf.png", runs))
        outcome.notes.append(f"wrote sweep.json and plots to {out_dir}")
    return outcome


def _raw(sc: Scenario) -> dict[str, Any]:
    from ..config import to_plain

    data = to_plain(sc)
    data.pop("base_dir", None)
    return data


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
