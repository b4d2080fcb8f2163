"""PagedKVCache: block allocation across block boundaries, freeing, exhaustion, swap."""

from __future__ import annotations

import pytest
import torch

from dlora.exec.kv_cache import KVCacheFullError, PagedKVCache


def _cache(num_blocks: int = 6, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(
        num_layers=2,
        num_kv_heads=1,
        head_dim=2,
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=torch.float32,
        device="cpu",
    )


def test_slots_follow_block_tables_and_blocks_are_reused():
    kv = _cache()
    kv.reserve(1, 5)  # two blocks
    kv.reserve(2, 3)  # one block
    kv.reserve(1, 8)  # still two blocks
    assert kv.used_blocks == 3 and len(kv.tables[1]) == 2
    t = kv.tables[1]
    assert kv.slots(1, 0, 8) == [t[p // 4] * 4 + p % 4 for p in range(8)]
    assert set(kv.slots(1, 0, 8)).isdisjoint(kv.slots(2, 0, 3))
    kv.free(1)
    assert kv.free_blocks == 5 and not kv.has(1)
    kv.reserve(3, 24 - 4)  # five blocks: everything that is free
    with pytest.raises(KVCacheFullError, match="needs 1 more KV blocks but 0"):
        kv.reserve(3, 21)


def test_swap_and_export_round_trip_keep_values():
    kv = _cache()
    kv.reserve(1, 6)
    slots = torch.tensor(kv.slots(1, 0, 6))
    kv.pool[:, :, slots] = torch.randn(2, 2, 6, 1, 2)
    kv.mark_written(1, 6)
    before = kv.export(1)
    assert kv.swap_out(1) == 6 and kv.free_blocks == 6 and kv.is_swapped(1)
    kv.reserve(2, 24)  # someone else takes every block meanwhile
    kv.free(2)
    assert kv.swap_in(1) == 6 and not kv.is_swapped(1)
    assert torch.equal(kv.export(1), before)
    other = _cache(block_size=2)
    other.import_(9, before)
    assert torch.equal(other.export(9), before) and other.lengths[9] == 6
