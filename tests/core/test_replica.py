"""ReplicaScheduler: admission, token accounting, memory, preemption, merge transitions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.core.replica import AdmissionError
from dlora.testing import ScriptedExecutor, make_replica, make_request, run_replica
from dlora.types import BatchMode, RequestStatus, StepResult


def test_prefill_then_decode_counts_tokens_and_finishes():
    rep = make_replica()
    r = make_request(0, prompt=20, output=3)
    rep.add(r, 0.0)
    b = rep.schedule(0.0)
    assert b is not None and b.items[0].new_tokens == 20 and b.items[0].samples
    rep.complete(b, StepResult(0.1), 0.1)
    assert r.generated_tokens == 1 and r.first_token_s == 0.1 and r.computed_tokens == 20
    for t in (0.2, 0.3):
        b = rep.schedule(t)
        assert b.items[0].new_tokens == 1 and b.items[0].computed_tokens == r.computed_tokens
        rep.complete(b, StepResult(0.1), t + 0.1)
    assert r.status == RequestStatus.FINISHED and r.generated_tokens == 3
    assert rep.schedule(1.0) is None
    assert rep.memory.kv_used_blocks == 0


def test_batch_caps_sequences_and_chunks_prefill_to_token_cap():
    rep = make_replica(max_batch_size=2, max_batched_tokens=50)
    reqs = [make_request(i, prompt=40, output=2, arrival_s=i * 0.001) for i in range(3)]
    for r in reqs:
        rep.add(r, 0.0)
    b = rep.schedule(0.0)
    assert [it.request_id for it in b.items] == [0, 1]
    assert [it.new_tokens for it in b.items] == [40, 10]
    assert b.items[0].samples and not b.items[1].samples  # chunked prefill samples only when done


def test_fcfs_order_survives_out_of_order_adds():
    rep = make_replica(max_batch_size=1)
    late, early = make_request(0, arrival_s=2.0), make_request(1, arrival_s=1.0)
    rep.add(late, 2.0)
    rep.add(early, 2.0)
    assert rep.schedule(2.0).items[0].request_id == 1


def test_kv_shortage_preempts_latest_arrival_by_recompute_and_everyone_finishes():
    rep = make_replica(capacity_blocks=6, block_tokens=4, max_batch_size=4, preemption="recompute",
                       num_adapters=1, adapters={})
    reqs = [make_request(i, adapter=None, prompt=4, output=8, arrival_s=i * 0.01) for i in range(3)]
    run_replica(rep, reqs)
    assert all(r.status == RequestStatus.FINISHED and r.generated_tokens == 8 for r in reqs)
    assert rep.stats.recomputes > 0
    assert sum(r.num_preemptions for r in reqs) == rep.stats.recomputes
    assert reqs[0].num_preemptions == 0  # the oldest is never the victim
    rep.memory.check()


def test_swap_preemption_when_cheaper_and_space_exists():
    rep = make_replica(capacity_blocks=6, block_tokens=4, max_batch_size=4, preemption="swap",
                       swap_blocks=64, adapters={})
    reqs = [make_request(i, adapter=None, prompt=4, output=8, arrival_s=i * 0.01) for i in range(3)]
    run_replica(rep, reqs)
    assert rep.stats.swaps > 0 and all(r.status == RequestStatus.FINISHED for r in reqs)
    assert rep.memory.swap_used_blocks == 0


def test_request_too_large_is_rejected_at_add():
    rep = make_replica(capacity_blocks=4, block_tokens=4)
    with pytest.raises(AdmissionError, match="needs 24 tokens"):
        rep.add(make_request(0, prompt=20, output=4), 0.0)


def test_adapters_load_once_and_unified_pool_shrinks_kv():
    rep = make_replica(capacity_blocks=64)
    before = rep.memory.kv_capacity_blocks
    rep.add(make_request(0, adapter=1), 0.0)
    b = rep.schedule(0.0)
    assert b.load_adapters == (1,) and b.load_bytes == rep.adapters[1].size_bytes
    assert rep.memory.kv_capacity_blocks == before - rep.adapters[1].size_bytes // 1024
    rep.complete(b, StepResult(0.01), 0.01)
    assert rep.schedule(0.01).load_adapters == ()


def test_adapter_slots_evict_the_idle_adapter_never_a_running_one():
    rep = make_replica(max_adapter_slots=2, max_batch_size=2)
    ex = ScriptedExecutor()
    # adapter 0 keeps a running request; adapter 1 finishes (idle); adapter 2 needs a slot
    run_replica(rep, [make_request(0, adapter=1, output=1)], ex)
    rep.add(make_request(1, adapter=0, output=50, arrival_s=1.0), 1.0)
    b = rep.schedule(1.0)
    rep.complete(b, StepResult(0.01), 1.01)
    rep.add(make_request(2, adapter=2, arrival_s=0.5, output=1), 1.01)
    b = rep.schedule(1.01)
    assert [it.request_id for it in b.items] == [1, 2]  # running first, then the queue
    assert b.load_adapters == (2,) and b.evict_adapters == (1,)
    assert set(rep.memory.adapters) == {0, 2}


def test_a_slot_shortage_makes_the_request_wait_and_preempts_nobody():
    rep = make_replica(max_adapter_slots=1, max_batch_size=4)
    ex = ScriptedExecutor()
    rep.add(make_request(0, adapter=0, output=20), 0.0)
    b = rep.schedule(0.0)
    rep.complete(b, ex.execute(b), 0.01)
    rep.add(make_request(1, adapter=1, output=2), 0.01)
    rep.add(make_request(2, adapter=0, output=2, arrival_s=0.02), 0.02)
    b = rep.schedule(0.02)
    # request 1 waits for a slot; request 2 (adapter 0, resident) goes past it
    assert [it.request_id for it in b.items] == [0, 2]
    assert b.load_adapters == () and b.evict_adapters == () and not b.swap_out
    assert rep.stats.recomputes == 0 and rep.stats.swaps == 0


def test_merged_only_switches_and_merged_batches_hold_one_adapter():
    rep = make_replica(policy="merged_only", max_batch_size=8)
    reqs = [make_request(i, adapter=i % 2, arrival_s=i * 0.001, output=3) for i in range(6)]
    ex = ScriptedExecutor()
    run_replica(rep, reqs, ex)
    assert all(b.mode == BatchMode.MERGED for b in ex.batches)
    for b in ex.batches:
        assert {it.adapter_id for it in b.items} == {b.merged_adapter}
    assert rep.stats.switches >= 2 and ex.batches[0].merge_adapter == 0


def test_failed_step_requeues_requests_for_recompute():
    rep = make_replica()
    r = make_request(0, prompt=8, output=2)
    rep.add(r, 0.0)
    b = rep.schedule(0.0)
    rep.complete(b, StepResult(0.01, error="device lost"), 0.01)
    assert r.status == RequestStatus.WAITING and r.computed_tokens == 0 and rep.stats.failed_steps == 1
    run_replica(rep, [])
    assert r.status == RequestStatus.FINISHED


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 12), st.floats(0, 2)),
             min_size=1, max_size=25),
    st.sampled_from(["unmerged_only", "merged_only"]),
    st.sampled_from(["recompute", "swap", "auto"]),
    st.integers(8, 40),
)
def test_property_every_request_finishes_once_and_memory_stays_in_bounds(specs, policy, preemption, blocks):
    rep = make_replica(policy=policy, preemption=preemption, capacity_blocks=blocks, block_tokens=4,
                       swap_blocks=16, max_batch_size=4, max_batched_tokens=32)
    reqs = [make_request(i, adapter=a, prompt=p, output=o, arrival_s=t) for i, (a, p, o, t) in enumerate(specs)
            if -(-(p + o) // 4) * 1024 + 4096 <= blocks * 1024]
    seen: list[int] = []

    def script(batch):
        rep.memory.check()
        if batch.mode == BatchMode.MERGED:
            assert {it.adapter_id for it in batch.items} == {batch.merged_adapter}
        return StepResult(0.01)

    orig_finish = rep._finish

    def finish(r, now, status=RequestStatus.FINISHED):
        seen.append(r.id)
        orig_finish(r, now, status)

    rep._finish = finish  # type: ignore[method-assign]
    run_replica(rep, reqs, ScriptedExecutor(script=script))
    assert sorted(seen) == sorted(r.id for r in reqs)
    assert all(r.generated_tokens == r.output_tokens for r in reqs)
    rep.memory.check()
    assert rep.memory.kv_used_blocks == 0 and rep.memory.swap_used_blocks == 0
