"""Sim/live parity (DESIGN.md section 9): with the same scripted timings the live driver makes
exactly the simulator's batch decisions (replica, step, mode, merged adapter, request ids).

On the virtual clock the live threads run one at a time in SimPy's event order, so the whole
decision log matches for any policy mix. On the wall clock (an executor that really sleeps),
arrivals come in bursts separated by idle gaps much longer than a burst takes, so thread
jitter cannot move an arrival across an iteration boundary; each replica's log matches.

Both sides cache prefixes as `cluster.prefix_caching` says (on by default): the simulator hashes
a request's shared blocks by prefix group, the live side by token ids, and the live driver gives
the requests of a prefix group the same first `prefix_tokens` ids, so both find the same hits."""

from __future__ import annotations

import pytest
from live_helpers import SleepingExecutor, scenario

from dlora.live import VirtualClock, build_live_report, run
from dlora.report import build_report
from dlora.sim.driver import simulate
from dlora.testing import ScriptedExecutor
from dlora.types import Request

MIGRATION = ("policies.migration={name: dlora, params: {interval_s: 0.2, count_imbalance: 2, "
             "min_work_gap_s: 0.05, work_imbalance: 1.2, mode: %s}}")
CASES = {
    "unmerged-least-loaded": ("policies.batching=unmerged_only",),
    "credit-round-robin": ("policies.batching=credit", "policies.dispatch=round_robin"),
    "merged-dlora-dispatch": ("policies.batching=merged_only", "policies.dispatch=dlora"),
    "migration-transfer": (MIGRATION % "transfer", "policies.dispatch=round_robin",
                           "workload.arrival.kind=gamma", "workload.arrival.cv=3"),
    "migration-recompute": (MIGRATION % "recompute", "policies.dispatch=round_robin",
                            "policies.batching=credit", "workload.arrival.kind=gamma",
                            "workload.arrival.cv=3"),
    "shared-prefixes": ("workload.prefix={kind: per_adapter, tokens: 48}", "policies.batching=credit"),
    "shared-prefixes-preemption": (
        "workload.prefix={kind: groups, tokens: 40, groups: 2}", "cluster.replicas=1",
        "model.profile=../profiles/cpu-tiny-synthetic.yaml", "model.allow_extrapolation=true",
        "cluster.memory_fraction=0.0025", "workload.lengths.max_total_tokens=512",
        "workload.lengths.max_prompt_tokens=256", "workload.arrival.rate_per_s=4",
        "cluster.preemption=recompute"),
    "preemption": ("cluster.replicas=1", "model.profile=../profiles/cpu-tiny-synthetic.yaml",
                   "model.allow_extrapolation=true", "cluster.memory_fraction=0.0025",
                   "workload.lengths.max_total_tokens=512", "workload.lengths.max_prompt_tokens=256",
                   "workload.arrival.rate_per_s=4", "cluster.preemption=recompute"),
}


def outcome(r: Request) -> tuple:
    return (r.id, r.replica, r.first_token_s, r.finish_s, r.generated_tokens, r.num_migrations,
            r.num_preemptions)


@pytest.mark.parametrize("sets", CASES.values(), ids=CASES.keys())
def test_virtual_clock_live_makes_the_simulators_decisions(sets):
    sc = scenario("workload.num_requests=40", "workload.lengths.scale=0.3", "cluster.replicas=3", *sets)

    def make(i):
        return ScriptedExecutor(0.02, switch_s=0.005)

    sim = simulate(sc, executor_factory=make, record_batches=True)
    live = run(sc, executor_factory=make, clock=VirtualClock(), record_batches=True)
    assert sim.batch_log and live.batch_log == sim.batch_log
    assert [outcome(r) for r in live.requests] == [outcome(r) for r in sim.requests]
    assert live.end_s == sim.end_s
    assert build_live_report(live).summary == build_report(sim).summary
    if "migration" in sets[0]:
        assert sum(r.num_migrations for r in sim.requests) > 0  # the case exercises migration
        assert live.live["deferred_migrations"] > 0  # ... of requests in a step in flight
    if "cluster.preemption=recompute" in sets:
        assert sum(r.num_preemptions for r in sim.requests) > 0
    hits = [sum(rep.stats.prefix_hit_tokens for rep in x.cluster.replicas) for x in (sim, live)]
    assert hits[0] == hits[1]
    if "workload.prefix" in sets[0] or "cluster.preemption=recompute" in sets:
        assert hits[0] > 0  # shared system prompts, or a recomputed prompt found again


def bursts(starts=(0.05, 0.45, 0.85), per_burst=6) -> list[Request]:
    out = []
    for b, t in enumerate(starts):
        for k in range(per_burst):
            i = len(out)
            out.append(Request(i, (i * 7 + b) % 4, t, prompt_tokens=8 + 5 * k, output_tokens=2 + (i % 4)))
    return out


@pytest.mark.parametrize("policy", ["credit", "unmerged_only"])
def test_wall_clock_live_makes_the_simulators_decisions_per_replica(policy):
    sc = scenario("cluster.replicas=2", "adapters.count=4", f"policies.batching={policy}")
    sim = simulate(sc, bursts(), executor_factory=lambda i: ScriptedExecutor(0.004, 0.002),
                   record_batches=True)
    live = run(sc, bursts(), executor_factory=lambda i: SleepingExecutor(0.004, 0.002),
               record_batches=True)
    assert live.batch_log is not None and sim.batch_log is not None
    for rep in (0, 1):
        sim_log = [b for b in sim.batch_log if b[0] == rep]
        assert sim_log
        assert [b for b in live.batch_log if b[0] == rep] == sim_log
    assert all(r.generated_tokens == r.output_tokens for r in live.requests)
    assert [r.replica for r in live.requests] == [r.replica for r in sim.requests]
