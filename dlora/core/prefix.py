"""Block hashes for prefix caching (vLLM's automatic prefix caching; `MemoryPool`).

The hash of a request's block `i` names its content: the tokens of blocks 0..i and the adapter
(a salt, so that different adapters never share KV, whose values depend on the adapter's
weights). With token ids (live requests) it is chained over the ids of the prompt and of the
output generated so far, as vLLM does (blocks of output whose ids are unknown, as with a
scripted executor, are the request's own). A simulated request has no token ids: its first
`prefix_tokens` tokens are those of its `prefix_group` (a system prompt), so those blocks hash
by (adapter, group, index), and every other block is its own (request id, index). Full blocks
of output are hashed too, as vLLM caches them: a request preempted by recompute finds its own
prompt and output again while they are cached. The live executor registers the same hashes.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..types import Request


def prompt_block_hashes(r: Request, block_tokens: int) -> tuple[Hashable, ...]:
    """Hashes of the request's full prompt blocks, in order (module docstring)."""
    return block_hashes(r, block_tokens, r.prompt_tokens)


def block_hashes(r: Request, block_tokens: int, tokens: int, start: int = 0) -> tuple[Hashable, ...]:
    """Hashes of the full blocks among the request's first `tokens` context tokens, in order
    (with token ids: as far as the ids are known), from block `start` on."""
    return tuple(block_hash_run(r, block_tokens, tokens, start))


def block_hash_run(r: Request, block_tokens: int, tokens: int, start: int = 0) -> BlockRun:
    """`block_hashes` as a `BlockRun` (the request's own blocks by index, not one by one)."""
    salt = -1 if r.adapter_id is None else r.adapter_id
    full = min(tokens, r.prompt_tokens + r.output_tokens) // block_tokens
    if r.prompt_token_ids is not None:
        ids = r.prompt_token_ids
        if tokens > len(ids) and r.output_token_ids:
            ids = ids + tuple(r.output_token_ids)
        out: list[Hashable] = []
        h: int = hash((-2, salt))
        known = min(tokens, len(ids)) // block_tokens
        for i in range(known):  # a chain: every block's hash needs the ones before it
            h = hash((h, ids[i * block_tokens:(i + 1) * block_tokens]))
            if i >= start:
                out.append(h)
        # output whose ids are not known (a scripted executor, or the simulator replaying a live
        # request): the request's own blocks, as for simulated requests
        return BlockRun(start, tuple(out), r.id, full)
    shared = min(r.prefix_tokens // block_tokens if r.prefix_group is not None else 0, full)
    if shared <= start:  # only its own blocks (the common case: no generator to run)
        return BlockRun(start, (), r.id, full)
    return BlockRun(start, tuple(("g", salt, r.prefix_group, i) for i in range(start, shared)), r.id, full)


class BlockRun(Sequence[Hashable]):
    """The hashes of a request's consecutive blocks `start ..`, kept symbolic where they are
    the request's own (`MemoryPool` counts those by index, never block by block): `head`, the
    hashes by content of blocks `start .. lo - 1` (a prefix group's or chained over token ids),
    then the request's own blocks `lo .. hi - 1`, whose hashes are `("r", request_id, i)`.
    As a sequence it is those hashes in order (`block_hashes` gives them as a tuple)."""

    __slots__ = ("start", "head", "request_id", "lo", "hi")

    def __init__(self, start: int, head: tuple[Hashable, ...], request_id: int, hi: int) -> None:
        self.start = start
        self.head = head
        self.request_id = request_id
        self.lo = start + len(head)
        self.hi = max(hi, self.lo)

    @classmethod
    def of(cls, hashes: Sequence[Hashable], start: int = 0) -> BlockRun:
        """`hashes` (of blocks `start ..`, in order) as a run: as far as they are hashes by
        content followed by one request's own blocks in index order (the form `block_hash_run`
        gives); a hash by content after an own block, or a gap, ends it."""
        if isinstance(hashes, BlockRun):
            return hashes
        head: list[Hashable] = []
        rid, hi = -1, start
        for k, h in enumerate(hashes):
            own = h if type(h) is tuple and len(h) == 3 and h[0] == "r" else None
            if rid < 0 and own is None:
                head.append(h)
                hi += 1
                continue
            if own is None or own[2] != start + k or (rid >= 0 and own[1] != rid):
                break
            rid = own[1]
            hi += 1
        return cls(start, tuple(head), rid, hi)

    def __len__(self) -> int:
        return self.hi - self.start

    def __getitem__(self, i):
        n = self.hi - self.start
        if isinstance(i, slice):
            lo, stop, step = i.indices(n)
            if lo == 0 and step == 1:  # a leading part stays a run
                stop = max(stop, 0)
                return BlockRun(self.start, self.head[:stop], self.request_id, self.start + stop)
            return tuple(self)[i]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        if i < len(self.head):
            return self.head[i]
        return ("r", self.request_id, self.start + i)

    def __iter__(self):
        yield from self.head
        rid = self.request_id
        for i in range(self.lo, self.hi):
            yield ("r", rid, i)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (BlockRun, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"BlockRun(start={self.start}, head={self.head!r}, own={self.request_id}:{self.lo}..{self.hi})"
