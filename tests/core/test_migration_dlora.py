"""The dLoRA migrator on real cluster state: triggers, the problem it builds, and the actions it
returns (every move from an overloaded replica, adapters and slots respected after applying)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlora.build import load_latency, make_adapters, make_cluster
from dlora.core.migration_dlora import DloraMigrator
from dlora.scenario import scenario_from_dict
from dlora.types import MigrateMode, Request, RequestStatus, StepResult
from dlora.views import ClusterView, MigrateRequest, ReplicaView

ROOT = Path(__file__).resolve().parents[2]


def scenario(replicas=3, adapters=6, slots=3, migration_params=None):
    data = {
        "model": {"profile": str(ROOT / "profiles" / "cpu-tiny-synthetic.yaml")},
        "cluster": {"replicas": replicas, "max_batch_size": 4, "max_batched_tokens": 256,
                    "max_adapter_slots": slots},
        "adapters": {"count": adapters, "ranks": [8]},
        "workload": {"num_requests": 10, "arrival": {"kind": "poisson", "rate_per_s": 10},
                     "lengths": {"kind": "fixed", "prompt_tokens": 16, "output_tokens": 8}},
        "policies": {"dispatch": "least_loaded",
                     "migration": {"name": "dlora", "params": migration_params or {}}},
    }
    return scenario_from_dict(data, ROOT)


def cluster_with(loads, **kw):
    """A cluster whose replica i holds `loads[i]` waiting requests (adapters cycled)."""
    sc = scenario(**kw)
    latency = load_latency(sc)
    adapters = make_adapters(sc, latency)
    cluster, migrator = make_cluster(sc, latency, adapters)
    rid = 0
    for i, n in enumerate(loads):
        for _ in range(n):
            r = Request(rid, rid % 2 + 2 * i % len(adapters), 0.0, 16, 8)
            cluster.requests[r.id] = r
            cluster.replicas[i].add(r, 0.0)
            rid += 1
    return cluster, migrator


def rv(rid, n, work, kv_used=0, kv_total=100):
    return ReplicaView(rid, True, n, 0, 0, kv_used, kv_total, frozenset(), None, work, (), 4,
                       backlog_s=work)


def test_triggers():
    _, m = cluster_with([0, 0, 0])
    assert isinstance(m, DloraMigrator)
    calm = ClusterView(0.0, (rv(0, 3, 1.0), rv(1, 3, 1.2)))
    assert m.triggered(calm) == []
    assert m.triggered(ClusterView(0.0, (rv(0, 3, 1.0, 95), rv(1, 3, 1.0, 10)))) == ["kv_pressure"]
    assert m.triggered(ClusterView(0.0, (rv(0, 40, 1.0), rv(1, 2, 1.0)))) == ["count_imbalance"]
    assert m.triggered(ClusterView(0.0, (rv(0, 3, 9.0), rv(1, 3, 1.0)))) == ["work_imbalance"]
    assert m.triggered(ClusterView(0.0, (rv(0, 3, 1.0, 95), rv(1, 3, 1.0, 95)))) == []


def test_balanced_cluster_makes_no_moves():
    cluster, m = cluster_with([5, 5, 5])
    assert m.plan(cluster.view(0.0), 0.0) == []
    assert m.stats()["solver_calls"] == 0 and m.stats()["checks"] == 1


@pytest.mark.parametrize("mode", ["auto", "recompute", "transfer"])
def test_overloaded_replica_sheds_requests_within_limits(mode):
    cluster, m = cluster_with([30, 1, 0], migration_params={"mode": mode, "count_imbalance": 8})
    n_before = [len(r.unfinished) for r in cluster.replicas]
    actions = m.plan(cluster.view(0.0), 0.0)
    moves = [a for a in actions if isinstance(a, MigrateRequest)]
    assert moves, m.stats()
    assert all(a.source == 0 and a.destination in (1, 2) for a in moves)
    assert len({a.request_id for a in moves}) == len(moves)
    cluster.apply(actions, 0.0)
    n_after = [len(r.unfinished) for r in cluster.replicas]
    assert sum(n_after) == sum(n_before) == 31
    assert max(n_after) < 30
    ids = [r.id for rep in cluster.replicas for r in rep.unfinished]
    assert sorted(ids) == list(range(31))  # nothing lost or duplicated
    for rep in cluster.replicas:
        rep.memory.check()
        assert len(rep.memory.adapters) <= 3
        assert all(r.replica == rep.id and r.status == RequestStatus.WAITING for r in rep.unfinished)
    s = m.stats()
    assert s["solver_calls"] == 1 and s["moves"] == len(moves)
    assert s["triggers"]["count_imbalance"] == 1
    assert s["solver_wall_s"] > 0


def test_problem_respects_slots_and_lists_resident_adapters():
    cluster, m = cluster_with([20, 0, 0], migration_params={"count_imbalance": 4, "max_candidates": 6})
    for rep in cluster.replicas[1:]:
        for a in (4, 5):
            rep.prefetch_adapter(a)
    problem = m.build_problem(cluster.migration_view(0.0), kv_trigger=False)
    assert problem is not None
    assert len(problem.requests) == 6
    assert {q.replica for q in problem.requests} == {0}
    assert all(s.max_adapters == 3 for s in problem.replicas)
    by_id = {s.id: s for s in problem.replicas}
    assert by_id[1].resident_adapters == frozenset({4, 5})
    assert by_id[1].evictable_adapters == frozenset({4, 5})  # nobody there uses them
    assert all(q.adapter in by_id[0].resident_adapters for q in problem.requests)


def test_deferred_migration_waits_for_the_iteration_in_flight():
    cluster, m = cluster_with([6, 0])
    rep = cluster.replicas[0]
    batch = rep.schedule(0.0)
    assert batch is not None
    cluster.begin_step(0, batch)
    rid = batch.request_ids[0]
    cluster.apply([MigrateRequest(rid, 0, 1, MigrateMode.RECOMPUTE)], 0.0)
    assert cluster.requests[rid].replica == 0 and cluster.deferred[0]
    rep.complete(batch, StepResult(0.01), 0.01)
    dests = cluster.run_deferred(0, 0.01)
    assert [d.id for d in dests] == [1]
    assert cluster.requests[rid].replica == 1 and cluster.requests[rid].num_migrations == 1
    assert not cluster.deferred


def _migration_report(params, monkeypatch=None, clock_step_s=None):
    """report.json and timings of a small run where the node limit binds (issue 13)."""
    import itertools

    from dlora.core import migration_solver
    from dlora.report import build_report
    from dlora.sim.driver import simulate

    if clock_step_s is not None:  # a machine where every solve seems to take ages
        ticks = itertools.count()
        monkeypatch.setattr(migration_solver.time, "perf_counter", lambda: next(ticks) * clock_step_s)
    data = {
        "model": {"profile": str(ROOT / "profiles" / "cpu-tiny-synthetic.yaml")},
        "cluster": {"replicas": 4, "max_batch_size": 4, "max_batched_tokens": 256, "max_adapter_slots": 3},
        "adapters": {"count": 8, "ranks": [8, 16]},
        "workload": {"num_requests": 80, "arrival": {"kind": "poisson", "rate_per_s": 300.0},
                     "popularity": {"kind": "zipf", "alpha": 3.0},
                     "lengths": {"kind": "uniform", "prompt_range": [4, 64], "output_range": [4, 40]}},
        "policies": {"dispatch": {"name": "round_robin", "params": {"placement": "round_robin"}},
                     "migration": {"name": "dlora", "params": {
                         "interval_s": 0.05, "count_imbalance": 3, "max_candidates": 16, "node_limit": 10,
                         **params}}},
        "run": {"progress": False},
    }
    report = build_report(simulate(scenario_from_dict(data, ROOT)))
    return report.to_json(), report.timings


def test_report_is_identical_whatever_the_wall_clock(monkeypatch):
    """No wall-clock quantity decides anything: the same scenario and seed give the same
    report.json bytes with the time limit off or generous, and on a machine whose clock says
    every solve takes minutes; the solver's wall time goes to the timings only."""
    base, timings = _migration_report({})
    stats = json.loads(base)["migration"]
    assert stats["statuses"].get("node_limit", 0) > 0  # the deterministic limit really binds
    assert "solver_wall_s" not in stats and "solver_wall_s" in timings["migration"]
    assert _migration_report({"time_limit_s": 1000.0})[0] == base
    slow, slow_timings = _migration_report({}, monkeypatch, clock_step_s=60.0)
    assert slow == base
    assert slow_timings["migration"]["solver_max_wall_s"] >= 60.0
