"""The cluster's own duties: learning a new adapter (`register_adapter`), the steps in flight
(`begin_step` / `end_step`, migrations deferred until a step ends) and evacuating a dead
replica (`evacuate`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dlora.build import load_latency, make_adapters, make_cluster
from dlora.scenario import scenario_from_dict
from dlora.types import Adapter, MigrateMode, Request, RequestStatus, StepResult
from dlora.views import MigrateRequest

ROOT = Path(__file__).resolve().parents[2]


def scenario(batching="credit", dispatch="dlora", replicas=3, adapters=4):
    data = {
        "model": {"profile": str(ROOT / "profiles" / "cpu-tiny-synthetic.yaml")},
        "cluster": {"replicas": replicas, "max_batch_size": 4, "max_batched_tokens": 256},
        "adapters": {"count": adapters, "ranks": [8]},
        "workload": {"num_requests": 10, "arrival": {"kind": "poisson", "rate_per_s": 10},
                     "lengths": {"kind": "fixed", "prompt_tokens": 16, "output_tokens": 8}},
        "policies": {"batching": batching, "dispatch": dispatch, "migration": "dlora"},
    }
    return scenario_from_dict(data, ROOT)


def build(**kw):
    sc = scenario(**kw)
    latency = load_latency(sc)
    return make_cluster(sc, latency, make_adapters(sc, latency))


def test_a_registered_adapter_is_known_to_every_policy_and_replica() -> None:
    cluster, migrator = build()
    new = replace(cluster.adapters[0], id=4, name="new", rank=16)
    cluster.register_adapter(new)
    assert cluster.adapters[4] is new and cluster.adapters.ranks[4] == 16
    for rep in cluster.replicas:
        assert rep.adapters[4] == new
        assert rep.policy.ctx.adapter_ranks[4] == 16  # type: ignore[attr-defined]
    dispatcher = cluster.dispatcher
    assert dispatcher.costs.adapters[4] is new  # type: ignore[attr-defined]
    assert cluster.placer is not None and cluster.placer.adapters[4] is new
    assert migrator.adapters[4] is new  # type: ignore[attr-defined]
    r = Request(0, 4, 0.0, 16, 8)
    replica = cluster.submit(r, 0.0)
    assert replica is not None and r.status == RequestStatus.WAITING


def test_a_registered_adapter_is_sized_by_each_replicas_policy() -> None:
    cluster, _ = build(batching="vllm", dispatch="least_loaded")
    new = Adapter(4, "new", 16, 1234)
    cluster.register_adapter(new)
    model_bytes = cluster.replicas[0].latency.model.weight_bytes
    assert cluster.adapters[4].size_bytes == 1234  # the catalog keeps the adapter as it is
    assert all(rep.adapters[4].size_bytes == model_bytes for rep in cluster.replicas)


def queued(cluster, counts):
    """Queue `counts[i]` fresh requests on replica i (adapters cycled); their ids."""
    ids = []
    for i, n in enumerate(counts):
        for _ in range(n):
            r = Request(len(cluster.requests), len(cluster.requests) % 4, 0.0, 16, 8)
            cluster.requests[r.id] = r
            cluster.replicas[i].add(r, 0.0)
            ids.append(r.id)
    return ids


def test_a_move_of_a_request_in_a_step_waits_for_the_step_to_end() -> None:
    cluster, _ = build(dispatch="least_loaded")
    queued(cluster, [3, 0, 0])
    rep = cluster.replicas[0]
    batch = rep.schedule(0.0)
    assert batch is not None
    cluster.begin_step(0, batch)
    rid = batch.request_ids[0]
    assert cluster.apply([MigrateRequest(rid, 0, 1, MigrateMode.RECOMPUTE)], 0.0) == [rep, cluster.replicas[1]]
    assert cluster.requests[rid].replica == 0 and cluster.deferred[0]
    rep.complete(batch, StepResult(0.01), 0.01)
    cluster.end_step(0)
    assert cluster.in_flight[0] == () and cluster.deferred[0]  # run by the driver's run_deferred
    assert [d.id for d in cluster.run_deferred(0, 0.01)] == [1]
    assert cluster.requests[rid].replica == 1 and not cluster.deferred
    cluster.end_step(1)
    other = queued(cluster, [1, 0, 0])[0]
    cluster.apply([MigrateRequest(other, 0, 2, MigrateMode.RECOMPUTE)], 0.02)  # nothing in flight
    assert cluster.requests[other].replica == 2 and cluster.num_migrations == 2


def test_evacuate_moves_a_dead_replicas_requests_and_rejects_when_none_is_left() -> None:
    cluster, _ = build(dispatch="least_loaded")
    ids = queued(cluster, [3, 1, 0])
    rep = cluster.replicas[0]
    batch = rep.schedule(0.0)
    assert batch is not None
    cluster.begin_step(0, batch)
    cluster.apply([MigrateRequest(ids[0], 0, 1, MigrateMode.RECOMPUTE)], 0.0)  # deferred
    moved = cluster.evacuate(0, 0.01)
    assert not rep.is_alive and not rep.has_work and 0 not in cluster.deferred
    assert cluster.in_flight[0] == ()
    assert [d.id for d in moved] == [cluster.requests[i].replica for i in ids[:3]]
    assert all(d.id in (1, 2) for d in moved) and cluster.num_migrations == 0
    for i in ids[:3]:
        r = cluster.requests[i]
        assert r.status == RequestStatus.WAITING and r.computed_tokens == 0 and r.num_migrations == 0
    rejected = []
    cluster.evacuate(1, 0.02)
    assert cluster.evacuate(2, 0.03, on_rejected=rejected.append) == []
    assert sorted(r.id for r in rejected) == sorted(r.id for r in cluster.rejected) == ids
    assert all(r.finish_reason == "rejected: every replica failed" for r in rejected)
