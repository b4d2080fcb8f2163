"""Digests of the simulator's decisions, to check that a speed change changes none of them.

For each of 15 scenarios (the scale benchmark's shape light and near capacity at 8-32 replicas,
unmerged_only, memory pressure with swap and with recompute plus prefix groups, vllm, the
quickstart and Fig. 11a) prints the sha256 of report.json plus every request's (id, first token,
finish, generated tokens, executing seconds). Run it at two revisions and compare:

    git worktree add /tmp/base <rev>
    PYTHONPATH=/tmp/base .venv/bin/python scripts/decision_digest.py > /tmp/before.json
    .venv/bin/python scripts/decision_digest.py > /tmp/after.json
    diff /tmp/before.json /tmp/after.json && echo identical

(about 2 minutes; the two can run side by side on two cores). Then run the random fast-path
test with `DLORA_FASTPATH_CASES=400` and `tests/core/test_credit.py`."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sim_scale as scale  # noqa: E402

from dlora.report import build_report  # noqa: E402
from dlora.scenario import load_scenario, scenario_from_dict  # noqa: E402
from dlora.sim.driver import SimResult, simulate  # noqa: E402


def _pressed(d: dict[str, Any], memory_fraction: float, prefix: dict[str, Any] | None = None,
             preemption: str | None = None) -> dict[str, Any]:
    d = copy.deepcopy(d)
    d["cluster"]["memory_fraction"] = memory_fraction
    if prefix is not None:
        d["workload"]["prefix"] = prefix
    if preemption is not None:
        d["cluster"]["preemption"] = preemption
    return d


def cases() -> dict[str, dict[str, Any]]:
    s = scale.scenario
    return {
        "light8": s(8, 120, "credit", True),
        "cap8": s(8, 60, "credit", True, 3.5),
        "cap16": s(16, 40, "credit", True, 3.5),
        "light32": s(32, 60, "credit", True),
        "um8": s(8, 60, "unmerged_only", True, 3.5),
        "press8": _pressed(s(8, 60, "credit", True, 3.5), 0.3),
        "pfx8": _pressed(s(8, 60, "credit", True, 3.5), 0.3, {"kind": "per_adapter", "tokens": 100}),
        "grp4": _pressed(s(4, 60, "credit", True, 3.5), 0.25, {"kind": "groups", "tokens": 200, "groups": 3}),
        "vllm4": _pressed(s(4, 60, "vllm", True, 4.0), 0.25, {"kind": "groups", "tokens": 64, "groups": 2}),
        "rec8": _pressed(s(8, 60, "credit", True, 3.5), 0.05, {"kind": "per_adapter", "tokens": 100}, "recompute"),
        "recg4": _pressed(s(4, 60, "vllm", True, 4.0), 0.04, {"kind": "groups", "tokens": 64, "groups": 2},
                          "recompute"),
        "recn4": _pressed(s(4, 60, "credit", True, 4.0), 0.04, None, "recompute"),
        "swap8": _pressed(s(8, 60, "credit", True, 3.5), 0.05, {"kind": "per_adapter", "tokens": 100}, "swap"),
    }


def digest(result: SimResult) -> str:
    h = hashlib.sha256(build_report(result).to_json().encode())
    for r in result.requests:
        h.update(repr((r.id, r.first_token_s, r.finish_s, r.generated_tokens, r.executing_s)).encode())
    return h.hexdigest()[:16]


def main() -> None:
    out = {name: digest(simulate(scenario_from_dict(d, ROOT))) for name, d in cases().items()}
    for name in ("scenarios/quickstart.yaml", "scenarios/paper/fig11a-load-balancing.yaml"):
        out[name] = digest(simulate(load_scenario(ROOT / name)))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
