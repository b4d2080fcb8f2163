"""Solve time and quality of the co-migration MILP (HiGHS) against its greedy fallback.

Random instances: R replicas x N candidate requests, 16 adapters (2-4 resident per replica,
4 slots, some evictable), exponential work, about half the requests piled on replica 0.
Prints one row per size: MILP seconds, status, whether the fallback answered, makespan before,
after (MILP) and after (greedy only), moves. Run: `.venv/bin/python benchmarks/bench_migration_solver.py`
(`--time-limit 2 --seed 0`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from dlora.core.migration_solver import (
    AdapterCost,
    CandidateRequest,
    MigrationProblem,
    ReplicaState,
    solve_migration,
)


def make_instance(num_replicas: int, num_requests: int, seed: int) -> MigrationProblem:
    rng = np.random.default_rng(seed)
    num_adapters = 16
    ads = tuple(AdapterCost(k, 96 << 20, 0.003) for k in range(num_adapters))
    resident = [
        set(rng.choice(num_adapters, int(rng.integers(2, 5)), replace=False).tolist())
        for _ in range(num_replicas)
    ]
    reqs = []
    for i in range(num_requests):
        j = 0 if rng.random() < 0.5 else int(rng.integers(num_replicas))
        adapter = int(rng.choice(sorted(resident[j])))
        tokens = int(rng.integers(50, 1500))
        reqs.append(
            CandidateRequest(
                i, adapter, j, float(rng.exponential(2.0)), tokens // 16 + 1,
                recompute_s=tokens * 4e-5, transfer_s=tokens * 5e-4 / 32,
            )
        )  # fmt: skip
    reps = tuple(
        ReplicaState(
            j, float(rng.uniform(0, 10)), 2000, int(rng.integers(0, 500)), 4, 4 * (96 << 20),
            frozenset(resident[j]), frozenset(list(resident[j])[:1]), swap_s_per_block=1e-3,
        )
        for j in range(num_replicas)
    )  # fmt: skip
    return MigrationProblem(reps, tuple(reqs), ads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = Table(title=f"co-migration solver (HiGHS time limit {args.time_limit} s)")
    for col in ("replicas", "requests", "solve s", "status", "fallback", "before s", "after s",
                "greedy s", "greedy after s", "moves", "loads"):  # fmt: skip
        table.add_column(col, justify="right")
    for num_replicas in (2, 4, 8):
        for num_requests in (32, 128, 512):
            p = make_instance(num_replicas, num_requests, args.seed)
            plan = solve_migration(p, time_limit_s=args.time_limit, max_size=1 << 20)
            t0 = time.perf_counter()
            greedy = solve_migration(p, max_size=0)
            greedy_s = time.perf_counter() - t0
            table.add_row(
                str(num_replicas), str(num_requests), f"{plan.solve_s:.3f}", plan.status.value,
                "yes" if plan.used_fallback else "no", f"{plan.makespan_before_s:.2f}",
                f"{plan.makespan_after_s:.2f}", f"{greedy_s:.3f}",
                f"{greedy.makespan_after_s:.2f}", str(len(plan.moves)), str(len(plan.adapter_loads)),
            )  # fmt: skip
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
