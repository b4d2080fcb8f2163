"""Simulator speed at the paper's scale (issue 13): the end-to-end setup of PAPER.md section 7
(Llama-2-7B replicas on the derived A800 profile, 4 adapters per replica of rank 16, per-adapter
Gamma streams with power-law shares, ShareGPT-like lengths, credit batching + dLoRA dispatch +
co-migration every 10 s) at a fixed load per replica (by default 1.75 req/s, as 56 req/s over 32
replicas: about 40% of what this setup sustains under the SLO), for 4, 8, 16 and 32 replicas.
Prints simulated requests per wall second and per CPU second, the iterations per request the
fast path left to step one by one and its jumps per request, and the share of CPU time per
component (from cProfile, which slows the run: shares only).

    .venv/bin/python benchmarks/bench_sim_scale.py [--replicas 4 8 16 32] [--duration-s 3600]
        [--rate-per-replica 1.75] [--profile-components] [--policy credit]

The paper setup is `--replicas 32 --duration-s 3600` (201,600 requests). Near capacity (what a
capacity search's probes around the answer cost): `--rate-per-replica 3.5` (the 7B panel of
Fig. 9 sustains about 4 req/s per replica with dlora)."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dlora.report import build_report
from dlora.scenario import scenario_from_dict
from dlora.sim.driver import simulate

ROOT = Path(__file__).resolve().parents[1]
RATE_PER_REPLICA = 56 / 32

COMPONENTS = {  # label -> (file suffix, function) whose cumulative time makes it up
    "MILP solve (HiGHS)": ("_milp.py", "milp"),
    "co-migration check and plan": ("migration_dlora.py", "plan"),
    "replica.schedule (plan + admission)": ("replica.py", "schedule"),
    "batching policy decisions": ("credit.py", "_decide"),
    "replica.complete": ("replica.py", "complete"),
    "fast path (plan + jumps)": ("driver.py", "_jump"),
    "lazy catch-up of jumped iterations": ("fastpath.py", "materialize"),
    "arrivals + dispatch": ("driver.py", "arrivals"),
    "replica views built for decisions": ("replica_views.py", "view"),
    "placement re-planning": ("driver.py", "placement"),
}


def scenario(replicas: int, duration_s: float, policy: str, migration: bool,
             rate_per_replica: float = RATE_PER_REPLICA) -> dict:
    return {
        "name": f"scale-{replicas}",
        "seed": 0,
        "model": {"profile": str(ROOT / "profiles" / "a800-llama-2-7b.yaml")},
        "cluster": {"replicas": replicas, "max_batch_size": 16, "max_batched_tokens": 4096},
        "adapters": {"count": 4 * replicas, "ranks": [16]},
        "workload": {
            "duration_s": duration_s,
            "arrival": {"kind": "gamma", "rate_per_s": rate_per_replica * replicas, "cv": 1.0},
            "popularity": {"kind": "gamma_streams", "alpha": 1.0},
            "lengths": {"kind": "lognormal", "prompt_median": 340, "prompt_sigma": 0.9,
                        "output_median": 360, "output_sigma": 0.7, "min_prompt_tokens": 4,
                        "max_prompt_tokens": 1024, "min_output_tokens": 4, "max_total_tokens": 2048},
        },
        "policies": {"batching": policy, "dispatch": "dlora",
                     "migration": {"name": "dlora", "params": {"interval_s": 10}} if migration else "none"},
        "run": {"progress": False},
    }


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(replicas: int, duration_s: float, policy: str, migration: bool,
        rate_per_replica: float = RATE_PER_REPLICA) -> tuple[int, float, float, dict]:
    sc = scenario_from_dict(scenario(replicas, duration_s, policy, migration, rate_per_replica), ROOT)
    c0, w0 = cpu_s(), time.perf_counter()
    result = simulate(sc)
    wall, cpu = time.perf_counter() - w0, cpu_s() - c0
    report = build_report(result)
    summary = dict(report.summary)
    iterations = sum(rep.stats.iterations for rep in result.cluster.replicas)
    fast = result.fast_path or {}
    summary["_stepped_per_request"] = (iterations - fast.get("jumped_iterations", 0)) / max(1, len(result.requests))
    summary["_jumps_per_request"] = fast.get("jumps", 0) / max(1, len(result.requests))
    return len(result.requests), wall, cpu, summary


def components(replicas: int, duration_s: float, policy: str, migration: bool,
               rate_per_replica: float) -> list[tuple[str, float]]:
    prof = cProfile.Profile()
    prof.enable()
    run(replicas, duration_s, policy, migration, rate_per_replica)
    prof.disable()
    stats = pstats.Stats(prof)
    total = max(v[3] for v in stats.stats.values())  # type: ignore[attr-defined]
    out = []
    for label, (suffix, name) in COMPONENTS.items():
        best = 0.0
        for (path, _, fn), v in stats.stats.items():  # type: ignore[attr-defined]
            if fn == name and path.endswith(suffix):
                best = max(best, v[3])
        out.append((label, best / total))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--duration-s", type=float, default=600.0, help="simulated seconds of arrivals")
    ap.add_argument("--rate-per-replica", type=float, default=RATE_PER_REPLICA, help="arrivals per replica (req/s)")
    ap.add_argument("--policy", default="credit")
    ap.add_argument("--no-migration", action="store_true")
    ap.add_argument("--profile-components", action="store_true", help="cProfile shares (slower)")
    args = ap.parse_args()
    if not args.rate_per_replica > 0:
        ap.error("--rate-per-replica must be > 0")
    console = Console()
    rate = args.rate_per_replica
    table = Table(title=f"simulator speed, {args.duration_s:g} simulated s at {rate:g} req/s per replica")
    # (req/s: per wall second; step/req: iterations stepped one by one per request; jump/req: jumps)
    for col in ("reps", "requests", "wall s", "CPU s", "req/s", "req/CPU-s", "step/req", "jump/req"):
        table.add_column(col, justify="right")
    for n in args.replicas:
        count, wall, cpu, summary = run(n, args.duration_s, args.policy, not args.no_migration, rate)
        table.add_row(str(n), f"{count:,}", f"{wall:.1f}", f"{cpu:.1f}", f"{count / wall:,.0f}",
                      f"{count / cpu:,.0f}", f"{summary['_stepped_per_request']:.2f}",
                      f"{summary['_jumps_per_request']:.2f}")
        console.print(f"{n} replicas: {count:,} requests ({summary['completed']:,} completed) in {wall:.1f} s wall, "
                      f"{cpu:.1f} s CPU", highlight=False)
    console.print(table)
    if args.profile_components:
        n = args.replicas[min(1, len(args.replicas) - 1)]
        shares = components(n, args.duration_s, args.policy, not args.no_migration, rate)
        t = Table(title=f"share of CPU time per component ({n} replicas, cumulative, overlapping)")
        t.add_column("component")
        t.add_column("share", justify="right")
        for label, share in shares:
            t.add_row(label, f"{share:.0%}")
        console.print(t)


if __name__ == "__main__":
    main()
