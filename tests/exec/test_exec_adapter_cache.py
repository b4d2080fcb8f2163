"""The host adapter store as an LRU cache (vLLM's --max-cpu-loras): at most `capacity`
validated copies, the least recently used dropped and read again from its folder on next use,
with the same outputs as an unbounded store."""

from __future__ import annotations

from pathlib import Path

import torch
from exec_helpers import PROMPTS, first_logits

from dlora.exec import TorchExecutor


def test_lru_host_cache_drops_and_rereads(demo_dir: Path, adapter_paths: dict[int, Path]):
    unbounded = TorchExecutor(demo_dir, adapter_paths, block_size=4, num_kv_blocks=64)
    cached = TorchExecutor(demo_dir, adapter_paths, block_size=4, num_kv_blocks=64,
                           max_device_adapters=1, max_host_adapters=1)
    assert not cached.adapter_errors and len(cached.store.cached) == 1
    for aid in [*adapter_paths, *reversed(list(adapter_paths))]:
        cached.slots.evict(next(iter(cached.slots.resident), -1))  # the one slot goes round
        torch.testing.assert_close(first_logits(cached, PROMPTS[0], aid),
                                   first_logits(unbounded, PROMPTS[0], aid), rtol=0, atol=0)
        assert cached.store.cached == (aid,)
    assert all(cached.has_adapter(aid) for aid in adapter_paths)
