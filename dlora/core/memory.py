"""Device memory of one replica: KV blocks and adapter weights in one pool (PAPER.md section 3).

Counts and bytes only, no tensors. The device budget left after the base weights is shared:
every KV block and every resident adapter takes bytes from the same pool, so an adapter takes
room the KV cache could use and gives it back when evicted (the split moves with demand).
`adapter_budget_bytes` caps the adapters' share (a static split, as in the dLoRA artifact);
None means no cap beyond the pool. Swapped-out KV lives in a bounded host swap space.

Prefix caching (vLLM's automatic prefix caching; `prefix_caching`): a full KV block of a
prompt is registered under a hash chained over its tokens and salted by the adapter
(`prefix.py`), so requests of different adapters never share KV. Hashed blocks are shared by
reference count; when the last holder releases one it stays cached as an evictable block,
counted as free (any allocation may take it back, least recently freed first) until a request
with the same prefix claims it again. So recomputing a preempted request's prompt, or a system
prompt many requests share, costs only the blocks that were evicted meanwhile. A request's own
blocks (hashed by request and index, `prefix.BlockRun`: only it can ever hold them) are kept as
index ranges, held and cached, so registering, releasing and reclaiming them costs the same
whatever their number; they count exactly as one entry per block would
(tests/core/test_prefix_cache.py compares the two).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .prefix import BlockRun


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    capacity_bytes: int  # device bytes for KV blocks and adapters together
    block_tokens: int  # tokens per KV block
    block_bytes: int  # bytes of one KV block on this replica
    max_adapter_slots: int | None = None  # resident adapters at most (None: only memory bounds)
    adapter_budget_bytes: int | None = None  # static cap on adapter bytes (None: unified pool)
    swap_capacity_bytes: int = 0  # host memory for swapped KV
    prefix_caching: bool = False  # keep hashed prompt blocks for reuse (vLLM's prefix caching)


class MemoryPool:
    """Accounting of one replica's device memory. Invariant: 0 <= used <= capacity."""

    def __init__(self, config: MemoryConfig) -> None:
        if config.block_bytes <= 0 or config.block_tokens <= 0:
            raise ConfigError("memory: block size must be positive")
        if config.capacity_bytes < config.block_bytes:
            raise ConfigError(
                f"memory: {config.capacity_bytes} bytes left for the KV cache hold not even one "
                "block; use a larger device or a smaller model"
            )
        self.config = config
        self.block_tokens = config.block_tokens
        self.block_bytes = config.block_bytes
        self.kv_blocks: dict[int, int] = {}  # request id -> device blocks held
        self.swapped_blocks: dict[int, int] = {}  # request id -> host blocks held
        self.adapters: dict[int, int] = {}  # resident adapter id -> bytes (change through
        # load_adapter / evict_adapter only)
        self._resident: frozenset[int] | None = None
        self.kv_used_blocks = 0  # physical blocks held (a shared block counts once)
        self.adapter_bytes = 0
        self.swap_used_blocks = 0
        # prefix cache: hash -> holders of a shared block; freed hashed blocks, oldest first
        self.block_refs: dict[Hashable, int] = {}
        self.cached: OrderedDict[Hashable | _OwnRun, None] = OrderedDict()
        self.shared: dict[int, list[Hashable]] = {}  # request id -> its blocks hashed by content,
        # in order; then its own blocks (`prefix.BlockRun`), held: request id -> [lo, hi), and
        # cached: runs in `cached` (each counts hi - lo blocks), indexed by request
        self.own: dict[int, list[int]] = {}
        self.cached_runs: dict[int, list[_OwnRun]] = {}
        self.cached_blocks = 0  # blocks in `cached`
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- sizes ----
    @property
    def capacity_bytes(self) -> int:
        return self.config.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.kv_used_blocks * self.block_bytes + self.adapter_bytes

    @property
    def free_bytes(self) -> int:
        """Bytes neither KV nor adapters hold (cached prefix blocks count as free)."""
        return self.capacity_bytes - self.used_bytes

    @property
    def free_blocks(self) -> int:
        return self.free_bytes // self.block_bytes

    @property
    def kv_capacity_blocks(self) -> int:
        """Blocks the KV cache could hold now (used + free), given resident adapters."""
        return self.kv_used_blocks + self.free_blocks

    @property
    def total_blocks(self) -> int:
        """Blocks with no adapter resident."""
        return self.capacity_bytes // self.block_bytes

    @property
    def swap_capacity_blocks(self) -> int:
        return self.config.swap_capacity_bytes // self.block_bytes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def held(self, request_id: int) -> int:
        return self.kv_blocks.get(request_id, 0)

    # ---- KV ----
    def allocate(self, request_id: int, blocks: int) -> None:
        """Give a request `blocks` new private blocks (cached blocks are taken back if needed)."""
        assert 0 <= blocks <= self.free_blocks, (blocks, self.free_blocks)
        if blocks:
            self.kv_blocks[request_id] = self.kv_blocks.get(request_id, 0) + blocks
            self.kv_used_blocks += blocks
            self._reclaim()

    def allocate_each(self, needs: list[tuple[int, int]]) -> None:
        """`allocate(request, blocks)` for each pair in turn, cached blocks taken back once at
        the end (the same ones: reclaiming takes the oldest first until the pool fits)."""
        total = sum(n for _, n in needs)
        assert 0 <= total <= self.free_blocks, (total, self.free_blocks)
        kv = self.kv_blocks
        for rid, n in needs:
            kv[rid] = kv.get(rid, 0) + n
        self.kv_used_blocks += total
        self._reclaim()

    def _reclaim(self) -> None:
        """Drop cached blocks (oldest first) while used and cached blocks overfill the pool."""
        over = self.kv_used_blocks + self.cached_blocks - self.total_kv_blocks_now
        cached = self.cached
        while over > 0 and cached:
            oldest = next(iter(cached))
            if type(oldest) is _OwnRun:  # a request's own blocks: its tail first
                take = min(over, oldest.hi - oldest.lo)
                oldest.hi -= take
                self.cached_blocks -= take
                over -= take
                if oldest.hi == oldest.lo:
                    del cached[oldest]
                    self._forget(oldest)
            else:
                cached.popitem(last=False)
                self.cached_blocks -= 1
                over -= 1

    def _forget(self, run: _OwnRun) -> None:
        runs = self.cached_runs[run.request_id]
        runs.remove(run)
        if not runs:
            del self.cached_runs[run.request_id]

    @property
    def total_kv_blocks_now(self) -> int:
        """Blocks the pool holds besides the resident adapters."""
        return (self.capacity_bytes - self.adapter_bytes) // self.block_bytes

    def release(self, request_id: int) -> int:
        """Free a request's blocks; its hashed blocks stay cached once nobody holds them.
        Returns the blocks it held."""
        blocks = self.kv_blocks.pop(request_id, 0)
        hashed = self.shared.pop(request_id, ())
        freed = blocks - len(hashed)
        own = self.own.pop(request_id, None)
        if own is not None:  # its own blocks (the tail of its hashed ones): cached, a run
            run = _OwnRun(request_id, own[0], own[1])
            self.cached[run] = None
            self.cached_runs.setdefault(request_id, []).append(run)
            self.cached_blocks += own[1] - own[0]
        if hashed:
            refs = self.block_refs
            idle = []  # blocks nobody holds any more, tail first: a chain's tail is reclaimed
            for h in reversed(hashed):  # before its head (as vLLM does)
                n = refs[h] - 1
                if n:
                    refs[h] = n
                else:
                    del refs[h]
                    idle.append(h)
            self.cached.update(dict.fromkeys(idle))  # (none is cached: appended in this order)
            self.cached_blocks += len(idle)
            freed += len(idle)
        self.kv_used_blocks -= freed
        return blocks

    # ---- prefix cache ----
    def _own_present(self, request_id: int, lo: int, hi: int) -> tuple[int, int]:
        """(blocks of the request's own `lo .. hi - 1` present, a leading run; of them, how many
        are cached but unheld)."""
        i, idle = lo, 0
        held = self.own.get(request_id)
        runs = self.cached_runs.get(request_id, ())
        while i < hi:
            if held is not None and held[0] <= i < held[1]:
                i = min(held[1], hi)
                continue
            for run in runs:
                if run.lo <= i < run.hi:
                    step = min(run.hi, hi) - i
                    i += step
                    idle += step
                    break
            else:
                break
        return i - lo, idle

    def cached_prefix_blocks(self, hashes: Sequence[Hashable]) -> tuple[int, int]:
        """(blocks of `hashes` (from block 0) present, leading run; of them, how many are cached
        but unheld and so take free room when claimed)."""
        if not self.config.prefix_caching:
            return 0, 0
        run = BlockRun.of(hashes)
        n = idle = 0
        for h in run.head:
            if h in self.block_refs:
                n += 1
            elif h in self.cached:
                n += 1
                idle += 1
            else:
                return n, idle
        own, own_idle = self._own_present(run.request_id, run.lo, run.hi)
        return n + own, idle + own_idle

    def claim_prefix(self, request_id: int, hashes: Sequence[Hashable]) -> None:
        """Give a request without blocks the cached blocks of `hashes` (from block 0; all
        present)."""
        run = BlockRun.of(hashes)
        assert request_id not in self.kv_blocks and len(run)
        for h in run.head:
            if h in self.block_refs:
                self.block_refs[h] += 1
            else:
                del self.cached[h]
                self.cached_blocks -= 1
                self.block_refs[h] = 1
                self.kv_used_blocks += 1
        if run.hi > run.lo:  # its own blocks, cached (it holds none): each run's leading part
            assert run.request_id == request_id
            claimed = 0
            for c in list(self.cached_runs.get(request_id, ())):
                lo, hi = max(c.lo, run.lo), min(c.hi, run.hi)
                if lo < hi:
                    assert lo == c.lo
                    c.lo = hi
                    claimed += hi - lo
                    if c.lo == c.hi:
                        del self.cached[c]
                        self._forget(c)
            assert claimed == run.hi - run.lo
            self.cached_blocks -= claimed
            self.kv_used_blocks += claimed
            self.own[request_id] = [run.lo, run.hi]
        self.kv_blocks[request_id] = len(run)
        if run.head:
            self.shared[request_id] = list(run.head)

    def next_unshared(self, request_id: int) -> int:
        """Index of the request's first block not yet registered as shareable."""
        own = self.own.get(request_id)
        return len(self.shared.get(request_id, ())) + (own[1] - own[0] if own is not None else 0)

    def extend_own(self, request_id: int, hi: int) -> bool:
        """`register` of the request's own blocks up to block `hi`, when what it registered
        already ends in its own blocks and none of them is cached from before (then nothing
        can stop them: only this request ever holds its own blocks). False when that is not
        so (and nothing changed): call `register`."""
        own = self.own.get(request_id)
        if own is None or request_id in self.cached_runs:
            return False
        if hi > own[1]:
            own[1] = hi
        return True

    def register(self, request_id: int, hashes: Sequence[Hashable], start: int = 0) -> None:
        """The request's blocks `start .. start + len(hashes) - 1` are full and computed (their
        hashes, in order): make them shareable. `start` is at most `next_unshared` (blocks
        already registered are skipped); a block whose hash another holder registered first
        stays private (and so does every block after it), and so does a block hashed by
        content after one of the request's own."""
        if not self.config.prefix_caching:
            return
        run = BlockRun.of(hashes, start)
        head = self.shared.get(request_id)
        own = self.own.get(request_id)
        i = self.next_unshared(request_id)
        assert run.start <= i, (run.start, i)
        if i < run.lo:  # blocks hashed by content
            if own is not None:
                return
            mine = head if head is not None else []
            refs, cached = self.block_refs, self.cached
            for h in run.head[i - run.start:]:
                if h in refs or h in cached:
                    break
                refs[h] = 1
                mine.append(h)
                i += 1
            if mine and head is None:
                self.shared[request_id] = mine
            if i < run.lo:
                return
        if i < run.hi:  # its own blocks: up to the first one still cached from before
            assert run.request_id == request_id
            stop = run.hi
            for c in self.cached_runs.get(request_id, ()):
                if c.lo <= i < c.hi:
                    return
                if i < c.lo < stop:
                    stop = c.lo
            if own is not None:
                own[1] = stop
            else:
                self.own[request_id] = [i, stop]

    def can_swap_out(self, blocks: int) -> bool:
        return self.swap_used_blocks + blocks <= self.swap_capacity_blocks

    def swap_out(self, request_id: int) -> int:
        blocks = self.release(request_id)  # its hashed blocks stay cached; it comes back private
        assert self.can_swap_out(blocks)
        self.swapped_blocks[request_id] = blocks
        self.swap_used_blocks += blocks
        return blocks

    def swap_in(self, request_id: int) -> int:
        blocks = self.swapped_blocks.pop(request_id)
        self.swap_used_blocks -= blocks
        self.allocate(request_id, blocks)
        return blocks

    def drop_swapped(self, request_id: int) -> int:
        blocks = self.swapped_blocks.pop(request_id, 0)
        self.swap_used_blocks -= blocks
        return blocks

    # ---- adapters ----
    def is_resident(self, adapter_id: int) -> bool:
        return adapter_id in self.adapters

    def adapter_fits(self, num_bytes: int) -> bool:
        """Whether an adapter of this size fits now without evicting anything."""
        slots = self.config.max_adapter_slots
        if slots is not None and len(self.adapters) >= slots:
            return False
        budget = self.config.adapter_budget_bytes
        if budget is not None and self.adapter_bytes + num_bytes > budget:
            return False
        return num_bytes <= self.free_bytes

    def load_adapter(self, adapter_id: int, num_bytes: int) -> None:
        assert adapter_id not in self.adapters and self.adapter_fits(num_bytes)
        self.adapters[adapter_id] = num_bytes
        self.adapter_bytes += num_bytes
        self._resident = None
        self._reclaim()

    def evict_adapter(self, adapter_id: int) -> int:
        num_bytes = self.adapters.pop(adapter_id)
        self.adapter_bytes -= num_bytes
        self._resident = None
        return num_bytes

    @property
    def resident(self) -> frozenset[int]:
        """The resident adapters' ids (kept until one is loaded or evicted)."""
        if self._resident is None:
            self._resident = frozenset(self.adapters)
        return self._resident

    def check(self) -> None:
        """Internal invariants (tests call this)."""
        shared = {h for hs in self.shared.values() for h in hs}
        assert shared == set(self.block_refs)
        own = sum(hi - lo for lo, hi in self.own.values())
        assert all(lo < hi for lo, hi in self.own.values())
        hashed = sum(len(hs) for hs in self.shared.values()) + own
        private = sum(self.kv_blocks.values()) - hashed
        assert 0 <= self.kv_used_blocks == private + len(self.block_refs) + own
        assert not (set(self.cached) & set(self.block_refs))
        runs = [k for k in self.cached if type(k) is _OwnRun]
        assert all(r.lo < r.hi and r in self.cached_runs[r.request_id] for r in runs)
        assert sum(len(v) for v in self.cached_runs.values()) == len(runs)
        assert self.cached_blocks == len(self.cached) - len(runs) + sum(r.hi - r.lo for r in runs)
        assert self.kv_used_blocks + self.cached_blocks <= self.total_kv_blocks_now
        assert 0 <= self.adapter_bytes == sum(self.adapters.values())
        assert 0 <= self.used_bytes <= self.capacity_bytes
        assert 0 <= self.swap_used_blocks <= max(self.swap_capacity_blocks, 0)


class _OwnRun:
    """Cached own blocks `lo .. hi - 1` of one request (`prefix.BlockRun`), released together;
    reclaimed tail first, claimed head first (so they stay one stretch). A key of
    `MemoryPool.cached` (by identity)."""

    __slots__ = ("request_id", "lo", "hi")

    def __init__(self, request_id: int, lo: int, hi: int) -> None:
        self.request_id, self.lo, self.hi = request_id, lo, hi

    def __repr__(self) -> str:
        return f"own({self.request_id}: {self.lo}..{self.hi})"
