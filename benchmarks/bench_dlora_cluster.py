"""dLoRA across replicas against the paper's goals (PAPER.md section 7), from the scenarios in
scenarios/paper/:

- Fig. 11a: throughput under the SLO (`dlora capacity`) of round_robin, proactive and dlora;
  goals dlora >= 3.6x round_robin and >= 1.4x proactive.
- Fig. 11b: dlora's mean latency per token at 8x lengths over its 1x value; goal <= 1.5.
- Fig. 12: dlora's throughput from 16 to 128 adapters; goal within 10%.
- Solver wall time as a share of simulated time over the dlora runs above; goal <= 2%.

    .venv/bin/python benchmarks/bench_dlora_cluster.py [--only 11a,11b,12] [--tol 2]

Several minutes on two shared cores (each capacity probe simulates 100 x rate requests)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dlora.config import to_plain
from dlora.report import build_report
from dlora.scenario import load_scenario, scenario_from_dict, sweep_points
from dlora.sim.driver import simulate
from dlora.studies.capacity import capacity_by_variant

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper"


def sweep_runs(path: Path) -> list[tuple[str, Any, dict[str, Any], dict[str, Any]]]:
    """(variant, value, summary, migration stats) for every point of a scenario's sweep."""
    sc = load_scenario(path)
    data = to_plain(sc)
    data.pop("base_dir", None)
    out = []
    for point in sweep_points(sc, data):
        rep = build_report(simulate(scenario_from_dict(point.data, Path(sc.base_dir))))
        migration = {**rep.extra["migration"], **rep.timings.get("migration", {})}  # wall times
        out.append((point.variant, point.value, rep.summary, migration))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="11a,11b,12")
    ap.add_argument("--tol", type=float, default=2.0)
    ap.add_argument("--low", type=float, default=8.0)
    ap.add_argument("--high", type=float, default=32.0)
    args = ap.parse_args()
    only = set(args.only.split(","))
    console = Console()
    table = Table(title="dLoRA across replicas vs the paper's goals")
    for col in ("figure", "measured", "goal", "met"):
        table.add_column(col)
    solver_s = simulated_s = 0.0

    if "11a" in only:
        sc = load_scenario(PAPER / "fig11a-load-balancing.yaml")
        res = capacity_by_variant(sc, args.low, args.high, args.tol)
        rates = {k: v.rate for k, v in res.items()}
        console.print("fig11a max rate under the SLO:", {k: round(v, 2) for k, v in rates.items()})
        rr, pro, dl = rates["round_robin"], rates["proactive"], rates["dlora"]
        table.add_row(
            "11a dlora / round_robin",
            f"{dl / rr:.2f}x ({dl:.1f} / {rr:.1f} req/s)",
            ">= 3.6x",
            str(dl / rr >= 3.6),
        )
        table.add_row(
            "11a dlora / proactive",
            f"{dl / pro:.2f}x ({dl:.1f} / {pro:.1f} req/s)",
            ">= 1.4x",
            str(dl / pro >= 1.4),
        )
    if "11b" in only:
        runs = sweep_runs(PAPER / "fig11b-length-scaling.yaml")
        lpt = {(v, x): s["latency_per_token_s"]["mean"] for v, x, s, _ in runs}
        for v, _, s, m in runs:
            if v == "dlora":
                solver_s += m.get("solver_wall_s", 0.0)
                simulated_s += s["simulated_s"]
        console.print(
            "fig11b mean latency/token:", {f"{v} x{x}": round(y, 4) for (v, x), y in lpt.items()}
        )
        ratio = lpt["dlora", 8] / lpt["dlora", 1]
        rr = lpt["round_robin", 8] / lpt["round_robin", 1]
        table.add_row(
            "11b dlora latency/token 8x / 1x",
            f"{ratio:.2f}x (round_robin {rr:.2f}x)",
            "<= 1.5x",
            str(ratio <= 1.5),
        )
    if "12" in only:
        runs = sweep_runs(PAPER / "fig12-adapters.yaml")
        thr = {x: s["throughput_rps"] for v, x, s, _ in runs if v == "dlora"}
        for v, _, s, m in runs:
            if v == "dlora":
                solver_s += m.get("solver_wall_s", 0.0)
                simulated_s += s["simulated_s"]
        console.print("fig12 dlora throughput (req/s):", {x: round(y, 2) for x, y in thr.items()})
        spread = (max(thr.values()) - min(thr.values())) / max(thr.values())
        table.add_row(
            "12 dlora throughput 16..128 adapters",
            f"{min(thr.values()):.2f}..{max(thr.values()):.2f} req/s ({spread:.1%} spread)",
            "within 10%",
            str(spread <= 0.10),
        )
    if simulated_s > 0:
        share = solver_s / simulated_s
        table.add_row(
            "solver wall time / simulated time",
            f"{share:.3%} ({solver_s:.2f} s / {simulated_s:.0f} s)",
            "<= 2%",
            str(share <= 0.02),
        )
    console.print(table)


if __name__ == "__main__":
    main()
