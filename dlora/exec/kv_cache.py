"""Paged KV cache: one preallocated block pool per replica, a block table per request.

The pool is a tensor (layers, 2, num_blocks * block_size, kv_heads, head_dim); token `p` of a
request lives at slot `table[p // block_size] * block_size + p % block_size`. Owns block
allocation, swap to host and back, export / import of one request's KV (for migration), and
the physical side of prefix caching.

Prefix caching (vLLM's automatic prefix caching; the core's `MemoryPool` keeps the same books
in counts): a full, computed prompt block is registered under its hash
(`dlora.core.prefix.prompt_block_hashes`: chained over token ids, salted by adapter), and a
request whose prompt starts with the same blocks `claim`s them instead of computing them. A
request's table starts with its shared blocks (`shared_blocks[request]` of them, each with a
reference count); the rest of it is private. The first request to register a hash owns it; a
duplicate (someone registered the hash first) stays private, and so does every block after it,
as in `MemoryPool.register`. When the last holder frees a hashed block it stays cached (LRU)
until claimed again, or reclaimed, oldest first, when the free list is empty. Swapped-out and
exported KV is copied out whole; it comes back (swap-in, import) in private blocks.

A block handed out again is zeroed first: attention reads whole blocks and masks the positions
past a request's context, and a masked NaN left by an earlier owner (a request whose adapter
overflowed) would still turn the new owner's output into NaN (0 * NaN). A claimed cached block
is never zeroed (its KV is what the claimer reads); a reclaimed one is, like any block reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

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
        # prefix cache
        self.shared_blocks: dict[int, int] = {}  # request -> leading table blocks that are shared
        self.refs: dict[int, int] = {}  # shared block -> holders (>= 1)
        self.block_of: dict[Hashable, int] = {}  # hash -> block (held or cached)
        self.hash_of: dict[int, Hashable] = {}  # block -> hash
        self.salt_of: dict[int, int | None] = {}  # hashed block -> adapter it was computed with
        self.cached: OrderedDict[int, None] = OrderedDict()  # hashed blocks nobody holds, oldest first

    @property
    def free_blocks(self) -> int:
        """Blocks a request could get now (cached prefix blocks count as free)."""
        return len(self._free) + len(self.cached)

    @property
    def cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def has(self, request_id: int) -> bool:
        return request_id in self.tables

    def is_swapped(self, request_id: int) -> bool:
        return request_id in self._host

    def _take_block(self) -> int:
        """A free block, or the oldest cached one (its hash forgotten)."""
        if self._free:
            return self._free.pop()
        if not self.cached:
            raise KVCacheFullError(f"all {self.num_blocks} KV blocks are held")
        block, _ = self.cached.popitem(last=False)
        self._unhash(block)
        return block

    def _unhash(self, block: int) -> None:
        h = self.hash_of.pop(block)
        del self.block_of[h]
        self.salt_of.pop(block, None)

    def reserve(self, request_id: int, num_tokens: int) -> None:
        """Grow the request's table to hold `num_tokens` tokens (fresh private blocks)."""
        table = self.tables.setdefault(request_id, [])
        self.lengths.setdefault(request_id, 0)
        need = -(-num_tokens // self.block_size) - len(table)
        if need > self.free_blocks:
            raise KVCacheFullError(
                f"request {request_id} needs {need} more KV blocks but {self.free_blocks} of "
                f"{self.num_blocks} are free; admit fewer tokens or give the cache more blocks"
            )
        slots = self._slots.setdefault(request_id, [])
        reused: list[int] = []
        for _ in range(max(0, need)):
            block = self._take_block()
            table.append(block)
            slots.extend(range(block * self.block_size, (block + 1) * self.block_size))
            if self._used[block]:
                reused.append(block)
            self._used[block] = True
        if reused:
            self._blocks().index_fill_(2, torch.tensor(reused, dtype=torch.long, device=self.device), 0)

    def _blocks(self) -> torch.Tensor:
        """The pool viewed as (layers, 2, blocks, block_size, kv_heads, head_dim)."""
        return self.pool.view(*self.pool.shape[:2], self.num_blocks, self.block_size, *self.pool.shape[3:])

    def slots(self, request_id: int, start: int, stop: int) -> list[int]:
        """Flat slot indices of positions start..stop-1 (already reserved)."""
        return self._slots[request_id][start:stop]

    def mark_written(self, request_id: int, num_tokens: int) -> None:
        self.lengths[request_id] = num_tokens

    def _release(self, request_id: int) -> None:
        """Give back the request's device blocks: shared ones lose a holder (`_drop_ref`),
        private ones go to the free list."""
        table = self.tables.pop(request_id, [])
        n = self.shared_blocks.pop(request_id, 0)
        for block in table[:n]:
            self._drop_ref(block)
        self._free.extend(reversed(table[n:]))
        self.lengths.pop(request_id, None)
        self._slots.pop(request_id, None)

    def free(self, request_id: int) -> None:
        """Drop the request's KV on the device and on the host (finished, aborted, recompute)."""
        self._release(request_id)
        self._host.pop(request_id, None)

    def truncate(self, request_id: int, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens of the request's KV (the core counts fewer
        than this cache holds). A shared block the request would write into is copied into a
        private one first, so no other holder sees the write."""
        table = self.tables.get(request_id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        n = min(self.shared_blocks.pop(request_id, 0), len(table))
        kept, tail = table[:keep], table[keep:]
        for block in tail[: max(0, n - keep)]:
            self._drop_ref(block)
        self._free.extend(reversed(tail[max(0, n - keep):]))
        n = min(n, keep)
        if num_tokens % self.block_size and keep - 1 < n:  # copy on write
            old = kept[keep - 1]
            new = self._take_block()
            self._used[new] = True
            blocks = self._blocks()
            blocks[:, :, new] = blocks[:, :, old]
            kept[keep - 1] = new
            n = keep - 1
            self._drop_ref(old)
        self.tables[request_id] = kept
        if n:
            self.shared_blocks[request_id] = n
        self._slots[request_id] = [b * self.block_size + i for b in kept for i in range(self.block_size)]
        self.lengths[request_id] = min(self.lengths.get(request_id, 0), num_tokens)

    def _drop_ref(self, block: int) -> None:
        """One holder less; a block nobody holds stays cached if still hashed, else is free."""
        left = self.refs[block] - 1
        if left:
            self.refs[block] = left
            return
        del self.refs[block]
        if block in self.hash_of:
            self.cached[block] = None
        else:
            self._free.append(block)

    # ---- prefix caching ----
    def cached_prefix(self, hashes: Sequence[Hashable]) -> int:
        """How many leading blocks of `hashes` this cache holds (held or cached)."""
        n = 0
        for h in hashes:
            if h not in self.block_of:
                break
            n += 1
        return n

    def claim(self, request_id: int, hashes: Sequence[Hashable]) -> int:
        """Start a request without KV on the blocks of the leading `hashes` this cache holds;
        returns the tokens it now has (a multiple of the block size; fewer than asked when
        blocks are missing)."""
        assert self.lengths.get(request_id, 0) == 0, request_id
        self._release(request_id)
        table: list[int] = []
        for h in hashes:
            block = self.block_of.get(h)
            if block is None:
                break
            if block in self.cached:
                del self.cached[block]
                self.refs[block] = 1
            else:
                self.refs[block] += 1
            table.append(block)
        if not table:
            return 0
        self.tables[request_id] = table
        self.shared_blocks[request_id] = len(table)
        self._slots[request_id] = [b * self.block_size + i for b in table for i in range(self.block_size)]
        n = len(table) * self.block_size
        self.lengths[request_id] = n
        return n

    def register(self, request_id: int, hashes: Sequence[Hashable], salt: int | None = None) -> int:
        """The request's first `len(hashes)` blocks are full and computed: make them shareable.
        Blocks already shared are skipped; a block whose hash is registered already (another
        request computed it first) stays private, and so does every block after it. `salt`: the
        adapter (see `forget_salt`). Returns the request's shared blocks."""
        table = self.tables.get(request_id)
        if table is None:
            return 0
        n = self.shared_blocks.get(request_id, 0)
        full = min(len(hashes), len(table), self.lengths.get(request_id, 0) // self.block_size)
        while n < full:
            h = hashes[n]
            if h in self.block_of:
                break
            block = table[n]
            self.block_of[h] = block
            self.hash_of[block] = h
            self.salt_of[block] = salt
            self.refs[block] = 1
            n += 1
        if n:
            self.shared_blocks[request_id] = n
        return n

    def forget_salt(self, salt: int | None) -> int:
        """Forget every hash computed with adapter `salt` (its weights change or leave): cached
        blocks go back to the free list, held ones become unclaimable (their holders keep
        reading them). Returns the hashes forgotten."""
        blocks = [b for b, s in self.salt_of.items() if s == salt]
        for block in blocks:
            self._unhash(block)
            if block in self.cached:
                del self.cached[block]
                self._free.append(block)
        return len(blocks)

    def check(self) -> None:
        """Internal invariants (tests call this)."""
        holders: dict[int, int] = {}
        for rid, n in self.shared_blocks.items():
            assert 0 < n <= len(self.tables[rid]), (rid, n)
            for b in self.tables[rid][:n]:
                holders[b] = holders.get(b, 0) + 1
        assert holders == self.refs, (holders, self.refs)
        private = [b for rid, t in self.tables.items() for b in t[self.shared_blocks.get(rid, 0):]]
        assert len(private) == len(set(private)) and not set(private) & set(self.refs)
        assert set(self.cached) <= set(self.hash_of) and not set(self.cached) & set(self.refs)
        assert set(self.hash_of) <= set(self.cached) | set(self.refs), "a hashed block is held or cached"
        assert all(self.block_of[h] == b for b, h in self.hash_of.items())
        assert len(self.block_of) == len(self.hash_of)
        every = [*private, *self.refs, *self.cached, *self._free]
        assert sorted(every) == list(range(self.num_blocks)), "every block in exactly one place"

    # ---- copies: migration and swap ----
    def export(self, request_id: int) -> torch.Tensor:
        """The request's KV as a CPU tensor (layers, 2, tokens, kv_heads, head_dim)."""
        if request_id in self._host:
            return self._host[request_id][0].clone()
        n = self.lengths.get(request_id, 0)
        idx = torch.tensor(self.slots(request_id, 0, n), dtype=torch.long, device=self.device)
        return self.pool.index_select(2, idx).to("cpu")

    def import_(self, request_id: int, kv: torch.Tensor) -> None:
        """Write exported KV (layers, 2, tokens, kv_heads, head_dim) into fresh private blocks."""
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
        """Copy the request's KV to host memory and give back its blocks (shared ones stay
        with their other holders, or cached); returns the tokens moved."""
        if request_id not in self.tables:
            return 0
        kv = self.export(request_id)
        if self.device.type == "cuda":
            kv = kv.pin_memory()
        n = kv.shape[2]
        self._release(request_id)
        self._host[request_id] = (kv, n)
        return n

    def swap_in(self, request_id: int) -> int:
        """Bring swapped KV back into private device blocks; returns the tokens moved."""
        if request_id not in self._host:
            return 0
        kv, n = self._host.pop(request_id)
        self.import_(request_id, kv)
        return n
