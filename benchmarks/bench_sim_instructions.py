"""Instructions per simulated request, counted by valgrind's callgrind: a speed measure that
does not drift with the machine's load (wall and CPU seconds on this VM vary by 30% and more
within the hour, and two runs side by side disagree by more than the changes they compare).

Runs the scale benchmark's scenario (`bench_sim_scale.py`: the paper's end-to-end setup at a
fixed load per replica) under callgrind twice per checkout, for `--duration-s` and for 1
simulated second, and prints the difference per simulated request (the interpreter's start,
the imports and the cluster's build cancel out). Give several checkouts to compare revisions
(a `git worktree` of the baseline and this one); they run in parallel, one per core. Each
run costs about 50x its normal time: keep the scenario small (the default takes ~2 minutes).

    .venv/bin/python benchmarks/bench_sim_instructions.py [--tree /tmp/base --tree .]
        [--replicas 8] [--duration-s 60] [--rate-per-replica 3.5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import sys
sys.path.insert(0, {bench!r})
import bench_sim_scale as b
from dlora.scenario import scenario_from_dict
from dlora.sim.driver import simulate
sc = scenario_from_dict(b.scenario({replicas}, {duration}, "credit", True, {rate}), b.ROOT)
print("requests", len(simulate(sc).requests))
"""


def count(tree: Path, replicas: int, duration_s: float, rate: float) -> tuple[int, int]:
    """(instructions, simulated requests) of one run of the scenario on checkout `tree`."""
    code = RUN.format(bench=str(tree / "benchmarks"), replicas=replicas, duration=duration_s, rate=rate)
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    found = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    reqs = re.search(r"requests (\d+)", proc.stdout)
    if proc.returncode != 0 or found is None or reqs is None:
        raise SystemExit(f"{tree}: the run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1)), int(reqs.group(1))


def measure(tree: Path, replicas: int, duration_s: float, rate: float) -> tuple[int, float]:
    """(simulated requests, instructions per simulated request) beyond a 1-second run's."""
    full, n_full = count(tree, replicas, duration_s, rate)
    base, n_base = count(tree, replicas, 1.0, rate)
    return n_full, (full - base) / max(1, n_full - n_base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path, help="a checkout to measure (default: this one); repeat to compare")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--rate-per-replica", type=float, default=3.5)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        ap.exit(2, "valgrind not found: install it (Debian: apt-get install valgrind)\n")
    if not args.duration_s > 1.0:
        ap.error("--duration-s must be above 1 (the 1-second run is subtracted)")
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    for t in trees:
        if not (t / "dlora" / "sim" / "driver.py").is_file():
            ap.error(f"--tree {t}: not a dlora checkout")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda t: measure(t, args.replicas, args.duration_s, args.rate_per_replica), trees))
    print(f"{args.replicas} replicas, {args.duration_s:g} simulated s at {args.rate_per_replica:g} req/s per replica")
    first = results[0][1]
    for t, (n, per) in zip(trees, results, strict=True):
        rel = f" ({per / first - 1:+.1%} against the first)" if t != trees[0] else ""
        print(f"  {t}: {n:,} requests, {per / 1e6:.2f} M instructions per simulated request{rel}")


if __name__ == "__main__":
    main()
