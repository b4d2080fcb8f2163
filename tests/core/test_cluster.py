"""The cluster's own duties: learning a new adapter (`register_adapter`), the steps in flight
(`begin_step` / `end_step`, migrations deferred until a step ends) and evacuating a dead
replica (`evacuate`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dlora.build import load_latency, make_adapters, make_cluster
from dlora.scenario import scenario_from_dict
from dlora.types import Adapter, Request, RequestStatus

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
