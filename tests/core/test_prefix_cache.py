"""Prefix caching (core/memory.py, core/prefix.py): hashed prompt blocks shared by reference,
kept after release, reused by requests of the same prefix and adapter, reclaimed oldest first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.core.memory import MemoryConfig, MemoryPool
from dlora.core.prefix import BlockRun, prompt_block_hashes
from dlora.testing import make_adapters, make_replica, make_request, run_replica
from dlora.types import RequestStatus, StepResult


def pool(blocks: int = 10) -> MemoryPool:
    return MemoryPool(MemoryConfig(capacity_bytes=blocks * 1024, block_tokens=4, block_bytes=1024,
                                   prefix_caching=True))


def test_released_hashed_blocks_stay_cached_and_count_as_free():
    m = pool()
    m.allocate(1, 3)
    m.register(1, ["a", "b"])
    assert m.kv_used_blocks == 3
    m.release(1)
    assert m.kv_used_blocks == 0 and list(m.cached) == ["b", "a"] and m.free_blocks == 10  # tail first
    assert m.cached_prefix_blocks(["a", "b", "c"]) == (2, 2)
    m.claim_prefix(2, ["a", "b"])
    assert m.kv_used_blocks == 2 and not m.cached
    m.claim_prefix(3, ["a"])  # shared: no new block
    assert m.kv_used_blocks == 2 and m.block_refs == {"a": 2, "b": 1}
    m.check()
    m.release(2)
    assert m.block_refs == {"a": 1} and list(m.cached) == ["b"]
    m.check()


def test_allocation_reclaims_the_oldest_cached_blocks():
    m = pool(4)
    m.allocate(1, 2)
    m.register(1, ["x", "y"])
    m.release(1)
    m.allocate(2, 3)  # 2 free + 2 cached: the oldest cached block goes, the chain's tail
    assert list(m.cached) == ["x"] and m.kv_used_blocks == 3
    m.check()
    assert m.cached_prefix_blocks(["x", "y"]) == (1, 1)  # the head survives
    m.allocate(3, 1)
    assert m.cached_prefix_blocks(["x", "y"]) == (0, 0)


def test_a_duplicate_block_stays_private():
    m = pool()
    m.allocate(1, 2)
    m.register(1, ["a", "b"])
    m.allocate(2, 2)
    m.register(2, ["a", "b"])  # computed concurrently: request 1's copy is the shared one
    assert m.block_refs == {"a": 1, "b": 1} and 2 not in m.shared
    m.check()


def test_hashes_are_salted_by_adapter_and_shared_only_within_a_group():
    a = make_request(0, adapter=0, prompt=40)
    b = make_request(1, adapter=0, prompt=40)
    c = make_request(2, adapter=1, prompt=40)
    for r in (a, b, c):
        r.prefix_group, r.prefix_tokens = 7, 32
    ha, hb, hc = (prompt_block_hashes(r, 16) for r in (a, b, c))
    assert ha[:2] == hb[:2] and ha[:2] != hc[:2]
    assert len(ha) == 2
    a.prompt_token_ids = b.prompt_token_ids = tuple(range(40))
    c.prompt_token_ids = tuple(range(40))
    assert prompt_block_hashes(a, 16) == prompt_block_hashes(b, 16) != prompt_block_hashes(c, 16)


def test_a_second_request_of_the_same_system_prompt_computes_only_its_own_part():
    rep = make_replica(prefix_caching=True, max_batch_size=4)
    first = make_request(0, adapter=0, prompt=100, output=2)
    first.prefix_group, first.prefix_tokens = 1, 64
    run_replica(rep, [first])
    second = make_request(1, adapter=0, prompt=90, output=2, arrival_s=1.0)
    second.prefix_group, second.prefix_tokens = 1, 64
    other = make_request(2, adapter=1, prompt=90, output=2, arrival_s=1.0)
    other.prefix_group, other.prefix_tokens = 1, 64
    rep.add(second, 1.0)
    rep.add(other, 1.0)
    b = rep.schedule(1.0)
    items = {it.request_id: it for it in b.items}
    assert items[1].computed_tokens == 64 and items[1].new_tokens == 26
    assert items[2].computed_tokens == 0 and items[2].new_tokens == 90  # another adapter: no share
    assert rep.stats.prefix_hit_tokens == 64 and rep.stats.prefix_query_tokens == 180 + 100
    rep.memory.check()


def test_recompute_after_preemption_reuses_the_prompt():
    rep = make_replica(capacity_blocks=14, block_tokens=4, max_batch_size=4, adapters={}, num_adapters=0,
                       prefix_caching=True)
    a = make_request(0, None, 0.0, prompt=16, output=24)
    b = make_request(1, None, 0.001, prompt=16, output=20)
    rep.add(a, 0.0)
    rep.add(b, 0.0)
    now = 0.0
    while b.num_preemptions == 0:
        batch = rep.schedule(now)
        now += 0.01
        rep.complete(batch, StepResult(0.01), now)
    assert b.status == RequestStatus.WAITING and b.computed_tokens == 0
    while b.status != RequestStatus.RUNNING:
        batch = rep.schedule(now)
        now += 0.01
        rep.complete(batch, StepResult(0.01), now)
    assert rep.stats.prefix_hit_tokens == 16  # its 4 prompt blocks were still cached
    rep.memory.check()


workload_st = st.lists(
    st.tuples(st.integers(0, 3), st.floats(0, 1.0), st.integers(1, 120), st.integers(1, 40),
              st.sampled_from([None, 0, 1]), st.integers(0, 64)),
    min_size=1, max_size=30,
)


@settings(max_examples=50, deadline=None)
@given(workload_st, st.sampled_from(["unmerged_only", "credit", "merged_only", "slora", "vllm"]),
       st.integers(20, 60), st.sampled_from(["recompute", "swap"]))
def test_memory_invariants_hold_with_prefix_caching(spec, policy, blocks, preemption) -> None:  # type: ignore[no-untyped-def]
    adapters = make_adapters(4, size_bytes=1024)
    rep = make_replica(policy, adapters=adapters, capacity_blocks=blocks, block_tokens=4, max_batch_size=6,
                       max_batched_tokens=64, preemption=preemption, swap_blocks=16, prefix_caching=True)
    reqs = []
    for i, (a, t, p, o, g, n) in enumerate(spec):
        r = make_request(i, a, t, p, o)
        r.prefix_group, r.prefix_tokens = g, min(n, p)
        try:
            rep.check_fits(r)
        except Exception:
            continue
        reqs.append(r)
    run_replica(rep, reqs, max_steps=50_000, check_memory=True)
    assert all(r.status == RequestStatus.FINISHED and r.generated_tokens == r.output_tokens for r in reqs)
    assert rep.memory.kv_used_blocks == 0 and not rep.memory.block_refs


class PerBlockPool:
    """The prefix cache block by block (every hash a dict entry, own blocks included): the
    reference `MemoryPool`'s runs of a request's own blocks must count exactly like."""

    def __init__(self, blocks: int) -> None:
        self.total, self.adapter_blocks, self.used = blocks, 0, 0
        self.kv: dict[int, int] = {}
        self.refs: dict[object, int] = {}
        self.cached: dict[object, None] = {}  # insertion-ordered, oldest first
        self.shared: dict[int, list[object]] = {}

    def free_blocks(self) -> int:
        return self.total - self.adapter_blocks - self.used

    def reclaim(self) -> None:
        over = self.used + len(self.cached) - (self.total - self.adapter_blocks)
        while over > 0 and self.cached:
            del self.cached[next(iter(self.cached))]
            over -= 1

    def allocate(self, rid: int, n: int) -> None:
        self.kv[rid] = self.kv.get(rid, 0) + n
        self.used += n
        self.reclaim()

    def release(self, rid: int) -> None:
        blocks, hashed = self.kv.pop(rid, 0), self.shared.pop(rid, [])
        freed = blocks - len(hashed)
        for h in reversed(hashed):
            self.refs[h] -= 1
            if not self.refs[h]:
                del self.refs[h]
                self.cached[h] = None
                freed += 1
        self.used -= freed

    def present(self, hashes) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        n = idle = 0
        for h in hashes:
            if h in self.refs:
                n += 1
            elif h in self.cached:
                n, idle = n + 1, idle + 1
            else:
                break
        return n, idle

    def claim(self, rid: int, hashes) -> None:  # type: ignore[no-untyped-def]
        for h in hashes:
            if h in self.refs:
                self.refs[h] += 1
            else:
                del self.cached[h]
                self.refs[h] = 1
                self.used += 1
        self.kv[rid], self.shared[rid] = len(hashes), list(hashes)

    def register(self, rid: int, hashes, start: int) -> None:  # type: ignore[no-untyped-def]
        mine = self.shared.setdefault(rid, [])
        for h in hashes[len(mine) - start:]:
            if h in self.refs or h in self.cached:
                break
            self.refs[h] = 1
            mine.append(h)
        if not mine:
            del self.shared[rid]


def _hashes(rid: int, group: int | None, group_blocks: int, blocks: int) -> tuple[object, ...]:
    """A simulated request's block hashes (`prefix.block_hashes`): its prefix group's, then its own."""
    return tuple(("g", 0, group, i) if group is not None and i < group_blocks else ("r", rid, i)
                 for i in range(blocks))


op_st = st.tuples(st.sampled_from(["compute", "compute", "release", "admit", "adapter"]),
                  st.integers(0, 5), st.integers(1, 12))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(op_st, max_size=60), st.lists(st.sampled_from([None, 0, 1]), min_size=6, max_size=6),
       st.integers(1, 4), st.integers(8, 40))
def test_runs_of_own_blocks_count_exactly_as_block_by_block(ops, groups, group_blocks, blocks) -> None:  # type: ignore[no-untyped-def]
    """Random allocations, registrations (as `RoomMaker.register_blocks` does), releases,
    prefix claims (as admission does) and adapter loads that shrink the pool: the pool, which
    keeps a request's own blocks as runs (`prefix.BlockRun`), shows at every step the same
    used, free and cached blocks, the same registered prefix per request and the same cache
    hits as the block-by-block reference."""
    m = pool(blocks)
    ref = PerBlockPool(blocks)
    sizes = [14] * 6
    adapters: list[int] = []
    for kind, rid, n in ops:
        full = _hashes(rid, groups[rid], group_blocks, sizes[rid])
        if kind == "compute":  # grow its KV by up to n blocks, then register what is full
            grow = min(n, m.free_blocks, sizes[rid] - m.held(rid))
            if grow > 0:
                m.allocate(rid, grow)
                ref.allocate(rid, grow)
            start = m.next_unshared(rid)
            upto = m.held(rid)
            if start < upto:
                if not (n % 2 and m.extend_own(rid, upto)):  # (the shortcut, where it applies)
                    m.register(rid, BlockRun.of(full[start:upto], start), start)
                ref.register(rid, full[start:upto], start)
        elif kind == "release":
            m.release(rid)
            ref.release(rid)
        elif kind == "admit" and rid not in m.kv_blocks:
            hits, idle = m.cached_prefix_blocks(BlockRun.of(full[:n]))
            assert (hits, idle) == ref.present(full[:n])
            if hits and idle <= m.free_blocks:
                m.claim_prefix(rid, BlockRun.of(full[:hits]))
                ref.claim(rid, full[:hits])
        elif kind == "adapter":
            if adapters and n % 2:
                m.evict_adapter(adapters.pop())
                ref.adapter_blocks -= 1
            elif m.adapter_fits(1024):
                adapters.append(len(adapters) + 100)
                m.load_adapter(adapters[-1], 1024)
                ref.adapter_blocks += 1
                ref.reclaim()
        m.check()
        assert (m.kv_used_blocks, m.free_blocks, m.cached_blocks) == (ref.used, ref.free_blocks(), len(ref.cached))
        assert m.block_refs == {h: c for h, c in ref.refs.items() if h[0] != "r"}
        for r in range(6):
            hashes = _hashes(r, groups[r], group_blocks, sizes[r])
            assert m.next_unshared(r) == len(ref.shared.get(r, ()))
            assert m.cached_prefix_blocks(hashes) == ref.present(hashes)
            assert m.cached_prefix_blocks(BlockRun.of(hashes)) == ref.present(hashes)


def test_own_blocks_still_cached_from_before_stay_private_when_computed_again():
    """A request released with 6 own blocks cached, back with 3 of them claimed: computing
    blocks 3 and 4 again finds them still cached (its old copies), so they stay private, as
    block by block; the shortcut (`extend_own`) declines."""
    m, ref = pool(16), PerBlockPool(16)
    hashes = _hashes(0, None, 0, 8)
    for p in (m, ref):
        p.allocate(0, 6)
    m.register(0, BlockRun.of(hashes[:6]))
    ref.register(0, hashes[:6], 0)
    m.release(0)
    ref.release(0)
    assert m.cached_prefix_blocks(BlockRun.of(hashes[:3])) == ref.present(hashes[:3]) == (3, 3)
    m.claim_prefix(0, BlockRun.of(hashes[:3]))
    ref.claim(0, hashes[:3])
    for p in (m, ref):
        p.allocate(0, 2)
    assert not m.extend_own(0, 5)
    m.register(0, BlockRun.of(hashes[3:5], 3), 3)
    ref.register(0, hashes[3:5], 3)
    assert m.next_unshared(0) == len(ref.shared[0]) == 3
    assert (m.kv_used_blocks, m.cached_blocks) == (ref.used, len(ref.cached)) == (5, 3)
    m.check()


def test_allocate_each_takes_back_the_same_cached_blocks_as_one_by_one():
    one, each = pool(8), pool(8)
    for m in (one, each):
        m.allocate(1, 4)
        m.register(1, ["a", "b", "c"])
        m.allocate(2, 2)
        m.register(2, BlockRun.of([("r", 2, 0), ("r", 2, 1)]))
        m.release(1)
        m.release(2)  # cached, oldest first: c, b, a, then request 2's two own blocks
    for rid, n in ((3, 3), (4, 2), (5, 1)):
        one.allocate(rid, n)
    each.allocate_each([(3, 3), (4, 2), (5, 1)])
    # 6 blocks taken, 8 in the pool: the three oldest cached go (c, b, a), request 2's stay
    assert list(map(repr, each.cached)) == list(map(repr, one.cached)) == ["own(2: 0..2)"]
    assert (each.kv_used_blocks, each.cached_blocks, each.kv_blocks) == (one.kv_used_blocks, one.cached_blocks, one.kv_blocks)
    each.check()
