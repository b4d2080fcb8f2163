"""The prefix cache of a replica's `MemoryPool` (vLLM's automatic prefix caching; the pool's
module docstring says what it does): hashed blocks shared by reference, cached once nobody
holds them, reclaimed oldest first. A mixin of `MemoryPool`, kept apart by concern: the pool
owns the sizes, the KV blocks each request holds, swap and adapters.

A request's own blocks (hashed by request and index, `prefix.BlockRun`: only it can ever hold
them) are kept as index ranges, held (`own`) and cached (`_OwnRun` entries of `cached`), so
registering, releasing and reclaiming them costs the same whatever their number; they count
exactly as one entry per block would (tests/core/test_prefix_cache.py compares the two)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from .prefix import BlockRun

if TYPE_CHECKING:
    from .memory import MemoryConfig


class PrefixCache:
    config: MemoryConfig
    kv_blocks: dict[int, int]
    kv_used_blocks: int

    if TYPE_CHECKING:  # provided by MemoryPool
        @property
        def total_kv_blocks_now(self) -> int: ...

    def _init_prefix_cache(self) -> None:
        self.block_refs: dict[Hashable, int] = {}  # hash -> holders of a shared block
        self.cached: OrderedDict[Hashable | _OwnRun, None] = OrderedDict()  # freed, oldest first
        self.shared: dict[int, list[Hashable]] = {}  # request id -> its blocks hashed by content,
        # in order; then its own blocks (`prefix.BlockRun`), held: request id -> [lo, hi), and
        # cached: runs in `cached` (each counts hi - lo blocks), indexed by request
        self.own: dict[int, list[int]] = {}
        self.cached_runs: dict[int, list[_OwnRun]] = {}
        self.cached_blocks = 0  # blocks in `cached`

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

    def _uncache_released(self, request_id: int) -> int:
        """`MemoryPool.release`'s side of the cache: the request's hashed blocks that nobody
        holds any more become cached, its own ones as a run, the rest tail first (a chain's tail
        is reclaimed before its head, as vLLM does). Returns how many of its hashed blocks
        others still hold (they stay used)."""
        hashed = self.shared.pop(request_id, ())
        own = self.own.pop(request_id, None)
        if own is not None:  # its own blocks (the tail of its hashed ones): cached, a run
            run = _OwnRun(request_id, own[0], own[1])
            self.cached[run] = None
            self.cached_runs.setdefault(request_id, []).append(run)
            self.cached_blocks += own[1] - own[0]
        if not hashed:
            return 0
        refs = self.block_refs
        idle = []  # blocks nobody holds any more, tail first
        for h in reversed(hashed):
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
                idle.append(h)
        self.cached.update(dict.fromkeys(idle))  # (none is cached: appended in this order)
        self.cached_blocks += len(idle)
        return len(hashed) - len(idle)

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

    def _check_prefix_cache(self) -> tuple[int, int]:
        """The cache's invariants (`MemoryPool.check`); returns (the requests' hashed blocks,
        summed over requests; the distinct hashed blocks held)."""
        shared = {h for hs in self.shared.values() for h in hs}
        assert shared == set(self.block_refs)
        own = sum(hi - lo for lo, hi in self.own.values())
        assert all(lo < hi for lo, hi in self.own.values())
        assert not (set(self.cached) & set(self.block_refs))
        runs = [k for k in self.cached if type(k) is _OwnRun]
        assert all(r.lo < r.hi and r in self.cached_runs[r.request_id] for r in runs)
        assert sum(len(v) for v in self.cached_runs.values()) == len(runs)
        assert self.cached_blocks == len(self.cached) - len(runs) + sum(r.hi - r.lo for r in runs)
        return sum(len(hs) for hs in self.shared.values()) + own, len(self.block_refs) + own


class _OwnRun:
    """Cached own blocks `lo .. hi - 1` of one request (`prefix.BlockRun`), released together;
    reclaimed tail first, claimed head first (so they stay one stretch). A key of
    `MemoryPool.cached` (by identity)."""

    __slots__ = ("request_id", "lo", "hi")

    def __init__(self, request_id: int, lo: int, hi: int) -> None:
        self.request_id, self.lo, self.hi = request_id, lo, hi

    def __repr__(self) -> str:
        return f"own({self.request_id}: {self.lo}..{self.hi})"
