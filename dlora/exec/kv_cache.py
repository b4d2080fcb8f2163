"""Paged KV cache: one preallocated block pool per replica, a block table per request.

The pool is a tensor (layers, 2, num_blocks * block_size, kv_heads, head_dim); token `p` of a
request lives at slot `table[p // block_size] * block_size + p % block_size`. Owns block
allocation, swap to host and back, and export / import of one request's KV (for migration).

A block handed out again is zeroed first: attention reads whole blocks and masks the positions
past a request's context, and a masked NaN left by an earlier owner (a request whose adapter
overflowed) would still turn the new owner's output into NaN (0 * NaN).
"""

from __future__ import annotations

import torch

from dlora.errors import DloraError


class KVCacheFullError(DloraError):
    """The block pool cannot hold the batch; the scheduler admitted more than fits."""


class PagedKVCache:
    """A preallocated block pool and the block tables of the requests that hold KV."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.pool = torch.zeros(
            (num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=self.device,
        )
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used = [False] * num_blocks  # held before: zeroed when handed out again
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # tokens whose KV is present per request
        self._slots: dict[int, list[int]] = {}  # flat slots of every reserved position
        self._host: dict[int, tuple[torch.Tensor, int]] = {}  # swapped-out KV

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def has(self, request_id: int) -> bool:
        return request_id in self.tables

    def is_swapped(self, request_id: int) -> bool:
        return request_id in self._host

    def reserve(self, request_id: int, num_tokens: int) -> None:
        """Grow the request's table to hold `num_tokens` tokens."""
        table = self.tables.setdefault(request_id, [])
        self.lengths.setdefault(request_id, 0)
        need = -(-num_tokens // self.block_size) - len(table)
        if need > len(self._free):
            raise KVCacheFullError(
                f"request {request_id} needs {need} more KV blocks but {len(self._free)} of "
                f"{self.num_blocks} are free; admit fewer tokens or give the cache more blocks"
            )
        slots = self._slots.setdefault(request_id, [])
        reused: list[int] = []
        for _ in range(max(0, need)):
            block = self._free.pop()
            table.append(block)
            slots.extend(range(block * self.block_size, (block + 1) * self.block_size))
            if self._used[block]:
                reused.append(block)
            self._used[block] = True
        if reused:
            blocks = self.pool.view(*self.pool.shape[:2], self.num_blocks, self.block_size,
                                    *self.pool.shape[3:])
            blocks.index_fill_(2, torch.tensor(reused, dtype=torch.long, device=self.device), 0)

    def slots(self, request_id: int, start: int, stop: int) -> list[int]:
        """Flat slot indices of positions start..stop-1 (already reserved)."""
        return self._slots[request_id][start:stop]

    def mark_written(self, request_id: int, num_tokens: int) -> None:
        self.lengths[request_id] = num_tokens

    def free(self, request_id: int) -> None:
        """Drop the request's KV on the device and on the host (finished, aborted, recompute)."""
        self._free.extend(reversed(self.tables.pop(request_id, [])))
        self.lengths.pop(request_id, None)
        self._slots.pop(request_id, None)
        self._host.pop(request_id, None)

    def export(self, request_id: int) -> torch.Tensor:
        """The request's KV as a CPU tensor (layers, 2, tokens, kv_heads, head_dim)."""
        if request_id in self._host:
            return self._host[request_id][0].clone()
        n = self.lengths.get(request_id, 0)
        idx = torch.tensor(self.slots(request_id, 0, n), dtype=torch.long, device=self.device)
        return self.pool.index_select(2, idx).to("cpu")

    def import_(self, request_id: int, kv: torch.Tensor) -> None:
        """Write exported KV (layers, 2, tokens, kv_heads, head_dim) into fresh blocks."""
        expected = (self.pool.shape[0], 2, kv.shape[2], *self.pool.shape[3:])
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit this cache {expected}")
        self.free(request_id)
        n = kv.shape[2]
        self.reserve(request_id, n)
        idx = torch.tensor(self.slots(request_id, 0, n), dtype=torch.long, device=self.device)
        self.pool.index_copy_(2, idx, kv.to(self.device, self.pool.dtype))
        self.lengths[request_id] = n

    def swap_out(self, request_id: int) -> int:
        """Move the request's KV to host memory, freeing its blocks; returns the tokens moved."""
        if request_id not in self.tables:
            return 0
        kv = self.export(request_id)
        if self.device.type == "cuda":
            kv = kv.pin_memory()
        n = kv.shape[2]
        self._free.extend(reversed(self.tables.pop(request_id)))
        self.lengths.pop(request_id, None)
        self._slots.pop(request_id, None)
        self._host[request_id] = (kv, n)
        return n

    def swap_in(self, request_id: int) -> int:
        """Bring swapped KV back into device blocks; returns the tokens moved."""
        if request_id not in self._host:
            return 0
        kv, n = self._host.pop(request_id)
        self.import_(request_id, kv)
        return n
