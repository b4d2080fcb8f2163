"""Prefix caching in the live executor (kv_cache.py, executor.py): the block pool's books
(reference counts, LRU reclaim, no zeroing of a claimed block, copy on write), and greedy
outputs with caching on equal outputs with caching off, token for token, when the core's
ReplicaScheduler drives the TorchExecutor: requests sharing a system prompt, the same prompt
under two adapters (never shared), preemption by recompute and by swap, and a cache that
diverged from the core's books (the executor computes what it lacks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from exec_helpers import make_request

from dlora.core.prefix import prompt_block_hashes
from dlora.exec import TorchExecutor
from dlora.exec.kv_cache import PagedKVCache
from dlora.testing import make_replica, run_replica
from dlora.types import Batch, BatchItem, BatchMode, Request, StepResult

BS = 4
SYSTEM = [1, 396, 285, 451, 78, 70, 14, 267, 391, 297, 90, 44]  # three full blocks


def _cache(num_blocks: int = 8) -> PagedKVCache:
    return PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=num_blocks,
                        block_size=BS, dtype=torch.float32, device="cpu")


def _fill(kv: PagedKVCache, rid: int, n: int, value: float) -> None:
    kv.reserve(rid, n)
    kv.pool[:, :, torch.tensor(kv.slots(rid, 0, n))] = value
    kv.mark_written(rid, n)


# ---- the block pool ----
def test_shared_blocks_are_reference_counted_and_stay_cached_after_release():
    kv = _cache()
    _fill(kv, 1, 10, 7.0)  # blocks 0, 1 full, 2 partial
    assert kv.register(1, ("a", "b"), salt=0) == 2
    assert kv.claim(2, ("a", "b", "c")) == 8  # "c" is unknown: two blocks
    assert kv.tables[2] == kv.tables[1][:2] and kv.refs == {kv.tables[1][0]: 2, kv.tables[1][1]: 2}
    kv.reserve(2, 9)  # its own third block, private
    assert kv.tables[2][2] != kv.tables[1][2] and kv.used_blocks == 4
    kv.check()
    kv.free(1)
    kv.check()
    assert kv.refs == {kv.tables[2][0]: 1, kv.tables[2][1]: 1} and kv.cached_blocks == 0
    kv.free(2)
    kv.check()
    assert kv.cached_blocks == 2 and kv.free_blocks == 8 and kv.used_blocks == 0
    assert kv.claim(3, ("a", "b")) == 8  # claimed back, not zeroed
    assert torch.all(kv.export(3) == 7.0)
    kv.check()


def test_first_writer_wins_a_duplicate_stays_private_with_every_block_after_it():
    kv = _cache()
    _fill(kv, 1, 8, 1.0)
    _fill(kv, 2, 8, 2.0)
    assert kv.register(1, ("a",)) == 1
    assert kv.register(2, ("a", "b")) == 0  # "a" is 1's: 2 keeps both blocks private
    assert kv.block_of == {"a": kv.tables[1][0]}
    kv.check()


def test_cached_blocks_are_reclaimed_oldest_first_and_zeroed_when_reused():
    kv = _cache(num_blocks=4)
    for rid, h in ((1, "old"), (2, "new")):
        _fill(kv, rid, 4, float(rid))
        kv.register(rid, (h,))
    kv.free(1)
    kv.free(2)  # cached, oldest first: old, new
    kv.reserve(3, 12)  # three blocks: the two never-hashed ones, then the oldest cached one
    kv.mark_written(3, 12)
    assert "old" not in kv.block_of and "new" in kv.block_of
    assert torch.all(kv.export(3) == 0)  # the reclaimed block was zeroed
    assert kv.claim(4, ("new",)) == BS and torch.all(kv.export(4) == 2.0)  # a claimed one is not
    kv.check()
    kv.free(4)
    kv.reserve(3, 16)  # the last block: "new" is reclaimed too
    assert not kv.block_of and kv.free_blocks == 0
    kv.check()


def test_truncating_into_a_shared_block_copies_it_first():
    kv = _cache()
    _fill(kv, 1, 8, 5.0)
    kv.register(1, ("a", "b"))
    kv.claim(2, ("a", "b"))
    kv.truncate(2, 6)  # 2 will rewrite positions 6, 7 (in block "b")
    kv.check()
    assert kv.tables[2][0] == kv.tables[1][0] and kv.tables[2][1] != kv.tables[1][1]
    assert kv.shared_blocks[2] == 1 and kv.lengths[2] == 6
    assert torch.all(kv.export(2) == 5.0)  # the copy holds the same KV
    kv.pool[:, :, torch.tensor(kv.slots(2, 6, 8))] = 9.0
    assert torch.all(kv.export(1) == 5.0)  # 1's block untouched


def test_forgetting_an_adapter_makes_its_blocks_unclaimable():
    kv = _cache()
    _fill(kv, 1, 8, 1.0)
    kv.register(1, ("a", "b"), salt=3)
    kv.free(1)
    assert kv.forget_salt(3) == 2 and kv.cached_blocks == 0 and kv.claim(2, ("a",)) == 0
    kv.check()


def test_swap_out_copies_shared_blocks_and_swap_in_is_private():
    kv = _cache()
    _fill(kv, 1, 8, 3.0)
    kv.register(1, ("a", "b"))
    kv.claim(2, ("a", "b"))
    assert kv.swap_out(2) == 8 and kv.refs == {b: 1 for b in kv.tables[1]}
    assert kv.swap_in(2) == 8 and 2 not in kv.shared_blocks
    assert set(kv.tables[2]).isdisjoint(kv.tables[1]) and torch.all(kv.export(2) == 3.0)
    kv.check()


# ---- the executor driven by the core ----
class _Fixed:
    """A TorchExecutor whose steps take a fixed virtual time (a deterministic schedule) and
    whose KV books are checked after every step."""

    def __init__(self, ex: TorchExecutor) -> None:
        self.ex = ex

    def execute(self, batch: Batch) -> StepResult:
        res = self.ex.execute(batch)
        assert res.error is None and not res.faults, (res.error, res.faults)
        self.ex.kv.check()
        return replace(res, elapsed_s=0.01)


def _requests(spec: list[tuple[int | None, list[int], float]], output: int = 6) -> list[Request]:
    out = []
    for i, (adapter, prompt, at) in enumerate(spec):
        r = make_request(i, prompt, adapter, output)
        r.arrival_s = at
        out.append(r)
    return out


def _run(demo_dir: Path, adapter_paths, spec, *, core: bool, executor: bool, **replica):
    rep = make_replica(block_tokens=BS, prefix_caching=core, **replica)
    ex = TorchExecutor(demo_dir, adapter_paths, block_size=BS, prefix_caching=executor,
                       num_kv_blocks=rep.memory.total_blocks)
    reqs = _requests(spec)
    run_replica(rep, reqs, _Fixed(ex))  # type: ignore[arg-type]
    assert all(r.generated_tokens == r.output_tokens for r in reqs)
    return {r.id: list(r.output_token_ids) for r in reqs}, rep, ex, reqs


SHARED = [(0, SYSTEM + [5, 6, 7], 0.0), (0, SYSTEM + [8, 9], 0.05), (0, SYSTEM + [10, 11, 12, 13, 14], 0.05),
          (1, SYSTEM + [5, 6, 7], 0.1), (None, SYSTEM + [5], 0.1), (0, SYSTEM[:8], 0.2)]


def test_requests_sharing_a_system_prompt_equal_their_outputs_without_caching(demo_dir, adapter_paths):
    off, *_ = _run(demo_dir, adapter_paths, SHARED, core=False, executor=False)
    on, rep, ex, _ = _run(demo_dir, adapter_paths, SHARED, core=True, executor=True)
    assert on == off
    assert rep.stats.prefix_hit_tokens > 0 and ex.prefix_hit_tokens == rep.stats.prefix_hit_tokens
    assert ex.prefix_missed_tokens == 0


def test_the_same_prompt_under_two_adapters_is_never_shared(demo_dir, adapter_paths):
    spec = [(0, SYSTEM + [5, 6], 0.0), (1, SYSTEM + [5, 6], 0.2), (None, SYSTEM + [5, 6], 0.4)]
    off, *_ = _run(demo_dir, adapter_paths, spec, core=False, executor=False)
    on, rep, ex, _ = _run(demo_dir, adapter_paths, spec, core=True, executor=True)
    assert on == off and rep.stats.prefix_hit_tokens == 0 and ex.prefix_hit_tokens == 0
    hashes = [prompt_block_hashes(r, BS) for r in _requests(spec)]
    assert not set(hashes[0]) & set(hashes[1]) and not set(hashes[1]) & set(hashes[2])


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preempted_requests_come_back_with_the_same_tokens(demo_dir, adapter_paths, preemption):
    # 14 blocks of 4 tokens: three requests of 16-19 prompt tokens and 6 outputs cannot all fit
    spec = [(0, SYSTEM + [5, 6, 7, 8], 0.0), (0, SYSTEM + [9, 10, 11], 0.0), (0, SYSTEM + [12, 13, 14, 15, 16, 17, 18], 0.0)]
    kw = dict(capacity_blocks=14, adapters={}, preemption=preemption, swap_blocks=64)
    spec = [(None, p, t) for _, p, t in spec]
    off, rep_off, *_ = _run(demo_dir, adapter_paths, spec, core=False, executor=False, **kw)
    on, rep, ex, reqs = _run(demo_dir, adapter_paths, spec, core=True, executor=True, **kw)
    assert on == off
    assert sum(r.num_preemptions for r in reqs) > 0
    if preemption == "swap":
        assert rep.stats.swaps > 0
    else:
        assert rep.stats.prefix_hit_tokens > 0
    assert ex.prefix_missed_tokens == 0


def test_an_executor_without_the_blocks_computes_them_and_stays_correct(demo_dir, adapter_paths):
    # the core claims cached blocks; the executor keeps no cache (as after a replica restart)
    off, *_ = _run(demo_dir, adapter_paths, SHARED, core=False, executor=False)
    on, rep, ex, _ = _run(demo_dir, adapter_paths, SHARED, core=True, executor=False)
    assert on == off
    assert rep.stats.prefix_hit_tokens > 0 and ex.prefix_missed_tokens == rep.stats.prefix_hit_tokens


def test_a_batch_that_claims_blocks_the_cache_lost_recomputes_them(demo_dir, adapter_paths):
    ex = TorchExecutor(demo_dir, adapter_paths, block_size=BS, num_kv_blocks=64)
    a = make_request(1, SYSTEM + [5, 6], 0, 2)
    ex.execute(Batch(0, 0, BatchMode.UNMERGED, None, (BatchItem(1, 0, 0, 14, True),), (a,)))
    assert ex.kv.shared_blocks[1] == 3
    b = make_request(2, SYSTEM + [8], 0, 2)
    ex.kv.forget_salt(0)  # the cache loses them; the batch still says 12 tokens are computed
    res = ex.execute(Batch(0, 1, BatchMode.UNMERGED, None, (BatchItem(2, 0, 12, 1, True),), (b,)))
    assert res.error is None and ex.prefix_missed_tokens == 12
    ref = TorchExecutor(demo_dir, adapter_paths, block_size=BS, num_kv_blocks=64)
    c = make_request(2, SYSTEM + [8], 0, 2)
    want = ref.execute(Batch(0, 0, BatchMode.UNMERGED, None, (BatchItem(2, 0, 0, 13, True),), (c,)))
    assert res.token_ids == want.token_ids
    torch.testing.assert_close(ex.last_logits, ref.last_logits, rtol=1e-5, atol=1e-5)
