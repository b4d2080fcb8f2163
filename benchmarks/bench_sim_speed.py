"""Simulator speed: replay the Azure LLM inference 2023 conversation trace (19,366 requests
over one hour) on 4 replicas of the derived Llama-2-7B profile with 32 Zipf-popular adapters,
and print simulated requests per wall-clock second, with the fast path on and (optionally)
off, checking that both give the same report.

    .venv/bin/python benchmarks/bench_sim_speed.py [--trace PATH] [--compare] [--policy NAME]

The trace lives in ../shared/data (not part of the repo); without it the benchmark says so."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = (
    ROOT.parent / "shared" / "data" / "azure_llm_inference_2023" / "AzureLLMInferenceTrace_conv.csv"
)


def scenario_dict(trace: Path, policy: str, fast: bool) -> dict:
    return {
        "name": "bench-azure-conv",
        "seed": 0,
        "model": {"profile": str(ROOT / "profiles" / "a800-llama-2-7b.yaml")},
        "cluster": {"replicas": 4, "max_batch_size": 16, "max_batched_tokens": 4096},
        "adapters": {"count": 32, "ranks": [16]},
        "workload": {
            "arrival": {"kind": "trace", "path": str(trace), "format": "azure_llm_2023"},
            "popularity": {"kind": "zipf", "alpha": 1.0},
            "lengths": {"max_total_tokens": 4096},
        },
        "policies": {"batching": policy, "dispatch": "least_loaded"},
        "run": {"fast_path": fast, "progress": False},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--policy", default="unmerged_only")
    ap.add_argument("--compare", action="store_true", help="also step every iteration and compare")
    args = ap.parse_args()
    if not args.trace.is_file():
        print(f"trace not found: {args.trace} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from dlora.report import build_report
    from dlora.scenario import scenario_from_dict
    from dlora.sim.driver import simulate

    table = Table(
        title=f"simulator speed: Azure LLM conv trace, 4 x 7B, 32 adapters, {args.policy}"
    )
    for col in ("mode", "requests", "simulated s", "wall s", "requests / wall s", "iterations"):
        table.add_column(col, justify="right")
    reports = {}
    for fast in [True, False] if args.compare else [True]:
        sc = scenario_from_dict(scenario_dict(args.trace, args.policy, fast), ROOT)
        res = simulate(sc)
        rep = build_report(res)
        reports[fast] = rep.to_json()
        n = len(res.requests)
        table.add_row(
            "fast path" if fast else "every iteration",
            str(n),
            f"{res.end_s:.0f}",
            f"{res.wall_s:.2f}",
            f"{n / res.wall_s:.0f}",
            str(rep.summary["totals"]["iterations"]),
        )
    Console().print(table)
    if args.compare:
        print("reports identical:", reports[True] == reports[False])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
