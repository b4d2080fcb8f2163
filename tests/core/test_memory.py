"""The replica's memory (PAPER.md section 3): one pool for KV blocks and adapters whose split
moves with demand, eviction order, swap vs recompute by the profile's cost, and a property test
that memory never exceeds the budget or goes negative over random workloads."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.core.memory import MemoryConfig, MemoryPool
from dlora.core.preemption import choose_preempt_mode, recompute_s, swap_round_trip_s
from dlora.latency import LatencyModel
from dlora.profile import Transfer
from dlora.testing import ScriptedExecutor, latency_model, make_adapters, make_replica, make_request
from dlora.types import PreemptMode, RequestStatus


def test_adapter_takes_room_from_kv_and_gives_it_back() -> None:
    pool = MemoryPool(MemoryConfig(capacity_bytes=100 * 1024, block_tokens=16, block_bytes=1024))
    assert pool.kv_capacity_blocks == 100
    pool.load_adapter(0, 10 * 1024)
    assert pool.kv_capacity_blocks == 90
    pool.allocate(1, 90)
    assert not pool.adapter_fits(1024)
    pool.release(1)
    pool.evict_adapter(0)
    assert pool.kv_capacity_blocks == 100
    pool.check()


def test_heterogeneous_ranks_are_not_padded() -> None:
    lat = latency_model()
    assert lat.model.adapter_bytes(8) * 8 == lat.model.adapter_bytes(64)
    ads = make_adapters(2, ranks=[8, 64], size_bytes=1024)
    assert ads[1].size_bytes == 8 * ads[0].size_bytes


def test_eviction_fewest_outstanding_then_lru() -> None:
    rep = make_replica(num_adapters=3)
    rep.memory.load_adapter(0, 4096)
    rep.memory.load_adapter(1, 4096)
    rep.memory.load_adapter(2, 4096)
    rep.adapter_last_used.update({0: 5, 1: 2, 2: 9})
    rep.add(make_request(0, 2), 0.0)
    rep.add(make_request(1, 2), 0.0)
    rep.add(make_request(2, 0), 0.0)
    assert rep._eviction_order(set()) == [1, 0, 2]  # idle first, then fewest outstanding


def with_swap_bandwidth(lat: LatencyModel, bw: float) -> LatencyModel:
    prof = lat.profile
    latency = dataclasses.replace(prof.latency, swap=Transfer(bandwidth_bytes_per_s=bw))
    return LatencyModel(dataclasses.replace(prof, latency=latency), allow_extrapolation=True)


def test_swap_or_recompute_follows_the_cost_estimate() -> None:
    lat = latency_model()
    pool = MemoryPool(MemoryConfig(capacity_bytes=1 << 30, block_tokens=16, block_bytes=1024,
                                   swap_capacity_bytes=1 << 30))
    r = make_request(0, 0, prompt=1000)
    r.computed_tokens = 1000
    pool.allocate(0, pool.blocks_for(1000))
    for bw in (1e8, 1e9, 25e9, 1e12):
        m = with_swap_bandwidth(lat, bw)
        cheaper = PreemptMode.SWAP if swap_round_trip_s(m, 1000) < recompute_s(m, 1000) else PreemptMode.RECOMPUTE
        assert choose_preempt_mode("auto", r, pool, m) == cheaper
    assert choose_preempt_mode("auto", r, pool, with_swap_bandwidth(lat, 1e8)) == PreemptMode.RECOMPUTE
    assert choose_preempt_mode("auto", r, pool, with_swap_bandwidth(lat, 1e12)) == PreemptMode.SWAP
    # without host swap space it recomputes whatever the cost
    small = MemoryPool(MemoryConfig(capacity_bytes=1 << 30, block_tokens=16, block_bytes=1024))
    small.allocate(0, 63)
    assert choose_preempt_mode("swap", r, small, with_swap_bandwidth(lat, 1e12)) == PreemptMode.RECOMPUTE


requests_st = st.lists(
    st.tuples(st.integers(0, 5), st.floats(0, 1.0), st.integers(1, 120), st.integers(1, 40)),
    min_size=1, max_size=30,
)


@settings(max_examples=30, deadline=None)
@given(requests_st, st.sampled_from(["unmerged_only", "merged_only", "credit", "peft", "slora"]),
       st.sampled_from(["recompute", "swap", "auto"]), st.integers(24, 64), st.sampled_from([None, 2, 3]))
def test_memory_stays_within_budget(spec, policy, preemption, blocks, slots) -> None:  # type: ignore[no-untyped-def]
    adapters = make_adapters(6, ranks=[4, 8, 16, 32], size_bytes=2 * 1024)
    rep = make_replica(policy, adapters=adapters, capacity_blocks=blocks, block_tokens=4, max_batch_size=6,
                       max_batched_tokens=64, preemption=preemption, max_adapter_slots=slots, swap_blocks=16)
    reqs = [make_request(i, a, t, p, o) for i, (a, t, p, o) in enumerate(spec)]
    reqs = [r for r in reqs if _fits(rep, r)]
    ex = ScriptedExecutor()
    pending = sorted(reqs, key=lambda r: (r.arrival_s, r.id))
    now, i, finished = 0.0, 0, []
    for _ in range(20_000):
        while i < len(pending) and pending[i].arrival_s <= now:
            rep.add(pending[i], now)
            i += 1
        b = rep.schedule(now)
        rep.memory.check()
        if b is None:
            if i >= len(pending):
                break
            now = pending[i].arrival_s
            continue
        now += 0.01
        finished += rep.complete(b, ex.execute(b), now)
        rep.memory.check()
        assert rep.memory.free_bytes >= 0 and rep.memory.swap_used_blocks >= 0
    assert sorted(r.id for r in finished) == sorted(r.id for r in reqs)  # each finishes once
    assert all(r.status == RequestStatus.FINISHED for r in reqs)
    assert rep.memory.kv_used_blocks == 0 and rep.memory.swap_used_blocks == 0


def _fits(rep, r) -> bool:  # type: ignore[no-untyped-def]
    try:
        rep.check_fits(r)
    except Exception:
        return False
    return True
