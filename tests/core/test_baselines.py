"""The paper's baselines as named policies (PAPER.md section 6): each one's defining rule."""

from __future__ import annotations

import random

from dlora.core.batching import BATCH_POLICIES
from dlora.core.context import PolicyContext, ReplicaConfig
from dlora.core.memory import MemoryConfig, MemoryPool
from dlora.core.replica import ReplicaScheduler
from dlora.testing import (
    ScriptedExecutor,
    latency_model,
    make_adapters,
    make_replica,
    make_request,
    run_replica,
)
from dlora.types import BatchMode


def workload(n: int = 60, adapters: int = 6, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    return [make_request(i, rng.randrange(adapters), rng.uniform(0, 0.5), rng.randint(1, 40), rng.randint(1, 20))
            for i in range(n)]


def test_peft_never_mixes_adapters_and_never_merges() -> None:
    rep = make_replica("peft", num_adapters=6, max_batch_size=8)
    ex = ScriptedExecutor()
    reqs = workload()
    run_replica(rep, reqs, ex)
    assert all(r.is_done for r in reqs)
    for b in ex.batches:
        assert b.mode == BatchMode.UNMERGED and not b.is_switch
        assert len({it.adapter_id for it in b.items}) == 1


def test_slora_never_merges_and_uses_the_unified_pool() -> None:
    rep = make_replica("slora", num_adapters=6, max_batch_size=8)
    ex = ScriptedExecutor()
    run_replica(rep, workload(), ex)
    assert all(b.mode == BatchMode.UNMERGED and not b.is_switch for b in ex.batches)
    assert any(len({it.adapter_id for it in b.items}) > 1 for b in ex.batches)
    lat = latency_model()
    adapters = make_adapters(2)
    cfg = MemoryConfig(capacity_bytes=1 << 20, block_tokens=16, block_bytes=1024, adapter_budget_bytes=1024)
    ctx = PolicyContext(lat, {a: 16 for a in adapters}, ReplicaConfig(8))
    rep2 = ReplicaScheduler(0, ReplicaConfig(), MemoryPool(cfg), BATCH_POLICIES.create("slora", {}, "p", ctx),
                            lat, adapters)
    assert rep2.memory.config.adapter_budget_bytes is None  # static split overridden


def test_vllm_models_resident_one_model_per_iteration_no_switch_cost() -> None:
    lat = latency_model()
    model_bytes = lat.model.weight_bytes
    adapters = make_adapters(6)
    block_bytes = 16 * lat.kv_bytes_per_token
    cfg = MemoryConfig(capacity_bytes=lat.kv_capacity_bytes(), block_tokens=16, block_bytes=block_bytes)
    ctx = PolicyContext(lat, {a: 16 for a in adapters}, ReplicaConfig(8))
    pol = BATCH_POLICIES.create("vllm", {"max_models": 2}, "p", ctx)
    rep = ReplicaScheduler(0, ReplicaConfig(8, 512), MemoryPool(cfg), pol, lat, adapters)
    assert rep.memory.capacity_bytes == cfg.capacity_bytes + model_bytes
    assert all(a.size_bytes == model_bytes for a in rep.adapters.values())
    ex = ScriptedExecutor()
    seen_resident = []

    def script(batch):  # type: ignore[no-untyped-def]
        seen_resident.append(len(rep.memory.adapters))
        rep.memory.check()
        from dlora.types import StepResult
        return StepResult(0.01)

    ex.script = script
    reqs = workload(adapters=6)
    run_replica(rep, reqs, ex)
    assert all(r.is_done for r in reqs)
    assert max(seen_resident) <= 2 and rep.stats.adapter_evictions > 0
    for b in ex.batches:
        assert not b.is_switch  # selecting a resident model merges nothing
        assert len({it.adapter_id for it in b.items}) == 1
        assert b.load_bytes == len(b.load_adapters) * model_bytes
    # resident models take room from the KV cache
    assert rep.memory.kv_capacity_blocks == (rep.memory.capacity_bytes - len(rep.memory.adapters) * model_bytes) // block_bytes


def test_vllm_evicts_least_recently_used_model() -> None:
    lat = latency_model()
    adapters = make_adapters(3)
    cfg = MemoryConfig(capacity_bytes=lat.kv_capacity_bytes(), block_tokens=16, block_bytes=16 * lat.kv_bytes_per_token)
    pol = BATCH_POLICIES.create("vllm", {"max_models": 2}, "p", PolicyContext(lat, {a: 16 for a in adapters}, ReplicaConfig(8)))
    rep = ReplicaScheduler(0, ReplicaConfig(8, 512), MemoryPool(cfg), pol, lat, adapters)
    ex = ScriptedExecutor()
    for i, a in enumerate([0, 1]):
        rep.add(make_request(i, a, 0.0, 4, 2), 0.0)
    while rep.has_work:
        b = rep.schedule(0.0)
        rep.complete(b, ex.execute(b), 0.0)
    # 0 then 1 ran; both resident; a request of 2 evicts model 0 (least recently used)
    assert set(rep.memory.adapters) == {0, 1}
    rep.add(make_request(9, 2, 1.0, 4, 2), 1.0)
    b = rep.schedule(1.0)
    assert b.evict_adapters == (0,) and b.load_adapters == (2,)


def test_vllm_under_tensor_parallelism_holds_whole_models_per_replica() -> None:
    """A profile's memory is per replica (all its GPUs): a TP-4 70B replica holds each resident
    model whole across its 4 GPUs, so 2 fit (the paper's max_models for 70B) and 4 do not."""
    from pathlib import Path

    from dlora.build import make_adapters as build_adapters
    from dlora.build import memory_config
    from dlora.scenario import load_scenario

    root = Path(__file__).resolve().parents[2]
    sc = load_scenario(root / "scenarios" / "paper" / "fig9-gamma.yaml",
                       ["model.profile=../../profiles/a800-llama-2-70b-tp4.yaml", "cluster.replicas=1",
                        "adapters.count=4", "sweep=null"])
    from dlora.build import load_latency

    lat = load_latency(sc)
    assert lat.model.tensor_parallel == 4
    adapters = build_adapters(sc, lat)
    whole = lat.model.adapter_bytes(16)
    assert all(a.size_bytes == whole for a in adapters.values())  # not whole // 4
    cfg = memory_config(sc, lat)
    ctx = PolicyContext(lat, {a: 16 for a in adapters}, ReplicaConfig(16))
    pol = BATCH_POLICIES.create("vllm", {"max_models": 2}, "p", ctx)
    rep = ReplicaScheduler(0, ReplicaConfig(16, 4096), MemoryPool(cfg), pol, lat, adapters)
    model_bytes = lat.model.weight_bytes
    assert all(a.size_bytes == model_bytes for a in rep.adapters.values())
    pool = rep.memory.capacity_bytes
    assert 2 * model_bytes < pool < 4 * model_bytes  # 2 whole 70B models fit, 4 (552 GB) do not
    assert rep.memory.config.max_adapter_slots == 2


def _static_peft_latency():  # type: ignore[no-untyped-def]
    from dlora.latency import LatencyModel

    return LatencyModel(latency_model().profile, allow_extrapolation=True, baseline="peft", static_batches=True)


STATIC = {"static_batches": True}


def test_static_peft_batches_take_no_newcomer_and_end_when_their_last_request_does() -> None:
    """S-LoRA's PEFT loop (`static_batches`): a batch is one adapter's queued requests, formed
    once; later arrivals wait for it; the next forms when it has finished."""
    lat = _static_peft_latency()
    rep = make_replica("peft", STATIC, num_adapters=3, max_batch_size=6, max_batched_tokens=4096, latency=lat)
    assert rep.policy.static_batches  # type: ignore[attr-defined]
    ex = ScriptedExecutor()
    reqs = workload(n=50, adapters=3, seed=3)
    run_replica(rep, reqs, ex)
    assert all(r.is_done for r in reqs)
    by_id = {r.id: r for r in reqs}
    epochs = 0
    for prev, cur in zip(ex.batches, ex.batches[1:], strict=False):
        before, now = set(prev.request_ids), set(cur.request_ids)
        assert len({it.adapter_id for it in cur.items}) == 1
        if now <= before:
            continue  # the same static batch, fewer as its requests finish
        assert not now & before, "a request joined a static batch in flight"
        epochs += 1
        ended = max(by_id[i].finish_s for i in before)  # type: ignore[type-var]
        assert all(by_id[i].finish_s is not None and by_id[i].finish_s <= ended for i in before)
    assert epochs >= 5


def test_static_peft_keeps_the_admission_contract_under_memory_pressure() -> None:
    lat = _static_peft_latency()
    rep = make_replica("peft", STATIC, num_adapters=4, max_batch_size=8, capacity_blocks=40, latency=lat)
    reqs = workload(n=80, adapters=4, seed=5)
    run_replica(rep, reqs, ScriptedExecutor(), check_memory=True)
    assert all(r.is_done and r.generated_tokens == r.output_tokens for r in reqs)


def test_peft_by_default_batches_continuously() -> None:
    rep = make_replica("peft", num_adapters=3, max_batch_size=6, max_batched_tokens=4096)
    assert not rep.policy.static_batches  # type: ignore[attr-defined]  # the default: the dLoRA paper's
    ex = ScriptedExecutor()
    run_replica(rep, workload(n=50, adapters=3, seed=3), ex)
    joined = any(set(b.request_ids) - set(a.request_ids) and set(b.request_ids) & set(a.request_ids)
                 for a, b in zip(ex.batches, ex.batches[1:], strict=False))
    assert joined  # continuous batching: requests join a running batch


def test_merged_only_by_arrival_merges_the_oldest_requests_adapter_not_the_first_running_one() -> None:
    """`oldest: arrival` is the artifact's merge rule: the adapter of the oldest unfinished
    request by arrival, even when a later-arrived request of another adapter runs first in the
    replica's priority order (the default rule takes that one)."""
    from dlora.core.batching import MergedOnly, MergedOnlyParams, QueueView
    from dlora.types import Request, RequestStatus

    running = Request(1, adapter_id=3, arrival_s=5.0, prompt_tokens=8, output_tokens=4)
    running.status = RequestStatus.RUNNING
    old = [Request(2, adapter_id=7, arrival_s=1.0, prompt_tokens=8, output_tokens=4),
           Request(3, adapter_id=7, arrival_s=2.0, prompt_tokens=8, output_tokens=4)]
    queue = QueueView([running, *reversed(old)], merged_adapter=3, max_batch_size=16, step=0)
    default = MergedOnly(MergedOnlyParams(), None).plan(queue, 0.0)  # type: ignore[arg-type]
    artifact = MergedOnly(MergedOnlyParams(oldest="arrival"), None).plan(queue, 0.0)  # type: ignore[arg-type]
    assert (default.merged_adapter, [r.id for r in default.requests]) == (3, [1])
    assert (artifact.merged_adapter, [r.id for r in artifact.requests]) == (7, [2, 3])
