"""The SimPy driver end to end: completion, horizon, determinism, the fast path, the golden
quickstart summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dlora.report import build_report
from dlora.scenario import load_scenario
from dlora.sim.driver import simulate
from dlora.types import RequestStatus

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
GOLDEN = Path(__file__).with_name("golden_quickstart.json")
SMALL = ["workload.num_requests=300", "run.progress=false"]


def run(*sets: str):
    sc = load_scenario(QUICKSTART, [*SMALL, *sets])
    return simulate(sc)


def test_every_request_finishes_exactly_once():
    res = run()
    assert len(res.requests) == 300
    assert all(r.status == RequestStatus.FINISHED for r in res.requests)
    assert all(r.generated_tokens == r.output_tokens for r in res.requests)
    assert all(r.arrival_s <= r.first_scheduled_s <= r.first_token_s <= r.finish_s for r in res.requests)
    assert sum(rep.stats.finished for rep in res.cluster.replicas) == 300
    for rep in res.cluster.replicas:
        assert rep.memory.kv_used_blocks == 0
        rep.memory.check()


def test_horizon_reports_unfinished_requests():
    res = run("run.horizon_s=20")
    report = build_report(res)
    s = report.summary
    assert res.end_s == pytest.approx(20.0)
    assert s["unfinished"] > 0 and s["completed"] + s["unfinished"] + s["rejected"] == 300
    assert s["slo"]["mean_within_slo"] is False


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = (build_report(run(f"seed={s}")).to_json() for s in (1, 1, 2))
    assert a == b
    assert a != c


@pytest.mark.parametrize("sets", [
    (),
    ("policies.batching=merged_only",),
    ("cluster.replicas=1", "workload.arrival.rate_per_s=3", "cluster.preemption=recompute"),
    ("run.horizon_s=15",),
    ("workload.arrival.kind=gamma", "workload.arrival.cv=3", "policies.dispatch=round_robin"),
    ("policies.batching=credit", "workload.popularity.alpha=2", "cluster.replicas=2"),
    ("policies.batching=vllm", "cluster.replicas=2", "adapters.count=12"),
    ("policies.batching=peft", "cluster.max_adapter_slots=4", "cluster.memory_fraction=0.02"),
    # placement replans (adapter prefetches) land on replicas in the middle of jumps
    ("policies.dispatch.name=dlora", "policies.dispatch.params.placement_interval_s=3",
     "cluster.max_adapter_slots=8", "adapters.count=24", "workload.arrival.rate_per_s=12"),
])
def test_fast_path_is_identical_to_stepping_every_iteration(sets):
    slow, fast = run(*sets, "run.fast_path=false"), run(*sets, "run.fast_path=true")
    assert build_report(slow).to_json() == build_report(fast).to_json()
    for a, b in zip(slow.requests, fast.requests, strict=True):
        assert (a.first_token_s, a.finish_s, a.executing_s, a.replica, a.num_preemptions) == \
               (b.first_token_s, b.finish_s, b.executing_s, b.replica, b.num_preemptions)


def test_fast_path_identical_under_memory_pressure():
    # a tiny KV cache forces preemptions in the middle of decode runs
    sets = ("cluster.replicas=1", "workload.arrival.rate_per_s=4", "cluster.max_batch_size=16",
            "model.profile=../profiles/cpu-tiny-synthetic.yaml", "adapters.count=4",
            "workload.lengths.max_total_tokens=512", "workload.lengths.max_prompt_tokens=256",
            "model.allow_extrapolation=true", "cluster.memory_fraction=0.0025", "cluster.preemption=auto")
    slow, fast = run(*sets, "run.fast_path=false"), run(*sets, "run.fast_path=true")
    assert sum(r.num_preemptions for r in slow.requests) > 0
    assert build_report(slow).to_json() == build_report(fast).to_json()


def _golden_view(summary: dict) -> dict:
    keys = ("completed", "throughput_rps", "latency_s", "latency_per_token_s", "ttft_s", "tpot_s",
            "queueing_s", "preemptions")
    return json.loads(json.dumps({k: summary[k] for k in keys}))


def test_golden_quickstart_summary():
    """The quickstart's summary, checked in. Regenerate after an intended change with
    DLORA_UPDATE_GOLDEN=1 pytest tests/sim/test_driver.py -k golden."""
    summary = json.loads(build_report(run()).to_json())["summary"]
    view = _golden_view(summary)
    if os.environ.get("DLORA_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(view, indent=2, sort_keys=True) + "\n")
    assert view == json.loads(GOLDEN.read_text())


def test_report_bytes_are_deterministic_with_migration_and_placement():
    sets = ("policies.dispatch=dlora", "policies.migration.name=dlora", "policies.migration.params.interval_s=2",
            "policies.batching=credit", "workload.arrival.rate_per_s=20")
    a, b = build_report(run(*sets)), build_report(run(*sets))
    assert a.to_json() == b.to_json()
    assert "solver_wall_s" not in a.to_json() and a.extra["migration"]["checks"] > 0
