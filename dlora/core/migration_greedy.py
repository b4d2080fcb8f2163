"""Greedy co-migration and the layout bookkeeping the MILP shares (PAPER.md section 5).

`Layout` tracks one assignment of a `MigrationProblem`'s candidate requests: per replica its
work (base + requests + migration costs + adapter loads), KV blocks, adapters present (resident
minus evicted plus loaded) and slot and memory use. `greedy_migration` is the fallback of
`solve_migration`: repeatedly take a most loaded replica and apply the single move of one of
its requests (to any replica, loading the adapter there if needed and room allows, evicting
only evictable adapters with no requests) that most lowers the larger of the two replicas'
totals, while that stays below the source's total. Each move strictly decreases the sorted
vector of replica totals, so the makespan never grows and the loop ends.
"""

from __future__ import annotations

import numpy as np

from .migration_problem import MigrationProblem

_EPS = 1e-12


class Layout:
    """A mutable assignment of candidates to replicas, starting where they are now."""

    def __init__(self, problem: MigrationProblem) -> None:
        self.problem = problem
        reps = problem.replicas
        self.index = {r.id: j for j, r in enumerate(reps)}
        self.adapter = {a.id: a for a in problem.adapters}
        self.dest = [self.index[q.replica] for q in problem.requests]
        self.count: dict[tuple[int, int], int] = {}
        self.present = [set(r.resident_adapters) for r in reps]
        self.evicted: set[tuple[int, int]] = set()
        self.work = [r.base_work_s for r in reps]
        self.kv = [r.kv_blocks_base for r in reps]
        for i, q in enumerate(problem.requests):
            j = self.dest[i]
            self.work[j] += q.work_s
            self.kv[j] += q.kv_blocks
            if q.adapter is not None:
                self.count[q.adapter, j] = self.count.get((q.adapter, j), 0) + 1
        self.slots = [len(p) for p in self.present]
        self.mem = [sum(self.adapter[a].size_bytes for a in p) for p in self.present]
        self.slot_limit = [max(r.max_adapters, self.slots[j]) for j, r in enumerate(reps)]
        self.memory_limit = [max(r.adapter_memory_bytes, self.mem[j]) for j, r in enumerate(reps)]
        self.overflow_limit = [self.overflow(j) for j in range(len(reps))]

    def overflow(self, j: int, kv: int | None = None) -> int:
        return max(0, (self.kv[j] if kv is None else kv) - self.problem.replicas[j].kv_blocks_total)

    def total(self, j: int, work: float | None = None, kv: int | None = None) -> float:
        rep = self.problem.replicas[j]
        return (self.work[j] if work is None else work) + rep.swap_s_per_block * self.overflow(
            j, kv
        )

    def makespan(self) -> float:
        return max(self.total(j) for j in range(len(self.work)))

    def cost(self, i: int, j: int) -> float:
        q = self.problem.requests[i]
        return self.problem.migration_cost(q, self.problem.replicas[j].id)[0]

    def is_loaded(self, a: int, j: int) -> bool:
        return a in self.present[j] and a not in self.problem.replicas[j].resident_adapters

    def move(self, i: int, d: int) -> None:
        """Move candidate i to replica index d (loading its adapter there if absent)."""
        q, s = self.problem.requests[i], self.dest[i]
        if s == d:
            return
        self.work[s] -= q.work_s + self.cost(i, s)
        self.kv[s] -= q.kv_blocks
        self.work[d] += q.work_s + self.cost(i, d)
        self.kv[d] += q.kv_blocks
        self.dest[i] = d
        a = q.adapter
        if a is None:
            return
        self.count[a, s] -= 1
        if self.count[a, s] == 0 and self.is_loaded(a, s):
            self._set_present(a, s, False)
            self.work[s] -= self.adapter[a].load_s
        self.count[a, d] = self.count.get((a, d), 0) + 1
        if a not in self.present[d]:
            if (a, d) in self.evicted:
                self.evicted.discard((a, d))
            else:
                self.work[d] += self.adapter[a].load_s
            self._set_present(a, d, True)

    def evict(self, a: int, j: int) -> None:
        assert a in self.problem.replicas[j].evictable_adapters and not self.count.get((a, j))
        if a in self.present[j]:
            self._set_present(a, j, False)
            self.evicted.add((a, j))

    def _set_present(self, a: int, j: int, on: bool) -> None:
        sign = 1 if on else -1
        (self.present[j].add if on else self.present[j].discard)(a)
        self.slots[j] += sign
        self.mem[j] += sign * self.adapter[a].size_bytes

    def room_for(self, a: int, d: int) -> list[int] | None:
        """Evictions needed so adapter `a` fits on d ([] if it does), or None if impossible."""
        size = self.adapter[a].size_bytes
        slots, mem, out = self.slots[d], self.mem[d], []
        spare = sorted(
            (
                e
                for e in self.problem.replicas[d].evictable_adapters
                if e in self.present[d] and not self.count.get((e, d))
            ),
            key=lambda e: (-self.adapter[e].size_bytes, e),
        )
        while slots + 1 > self.slot_limit[d] or mem + size > self.memory_limit[d]:
            if not spare:
                return None
            e = spare.pop(0)
            out.append(e)
            slots, mem = slots - 1, mem - self.adapter[e].size_bytes
        return out

    def feasible(self) -> bool:
        reps = self.problem.replicas
        for j in range(len(reps)):
            if self.slots[j] > self.slot_limit[j] or self.mem[j] > self.memory_limit[j]:
                return False
            if self.problem.kv_hard_limit and self.overflow(j) > self.overflow_limit[j]:
                return False
        return all(
            q.adapter is None or q.adapter in self.present[self.dest[i]]
            for i, q in enumerate(self.problem.requests)
        )

    def loads(self) -> tuple[tuple[int, int], ...]:
        reps = self.problem.replicas
        return tuple(
            sorted(
                (a, reps[j].id)
                for j, p in enumerate(self.present)
                for a in p
                if a not in reps[j].resident_adapters
            )
        )

    def objective(self, keep_reward_s: float) -> float:
        """The MILP's objective for this layout: makespan plus the move and load penalties,
        less the reward for each evictable adapter kept."""
        p = self.problem
        moves = sum(1 for i, q in enumerate(p.requests) if p.replicas[self.dest[i]].id != q.replica)
        kept = sum(len(r.evictable_adapters) for r in p.replicas) - len(self.evicted)
        return (self.makespan() + p.move_penalty_s * moves + p.load_penalty_s * len(self.loads())
                - keep_reward_s * kept)

    def evictions(self) -> tuple[tuple[int, int], ...]:
        reps = self.problem.replicas
        return tuple(sorted((a, reps[j].id) for a, j in self.evicted))


def _best_move(layout: Layout, s: int) -> tuple[float, int, int, list[int]] | None:
    """Best single move out of replica index s: (pair total, request, destination, evictions)."""
    p, num_r = layout.problem, len(layout.work)
    idx = [i for i, d in enumerate(layout.dest) if d == s]
    if not idx:
        return None
    reqs = [p.requests[i] for i in idx]
    work = np.array([q.work_s for q in reqs])
    kv = np.array([q.kv_blocks for q in reqs])
    cost = np.array([[layout.cost(i, d) for d in range(num_r)] for i in idx])
    unload = np.array(
        [
            layout.adapter[q.adapter].load_s
            if q.adapter is not None
            and layout.count[q.adapter, s] == 1
            and layout.is_loaded(q.adapter, s)
            else 0.0
            for q in reqs
        ]
    )
    total_kv = np.array([r.kv_blocks_total for r in p.replicas])
    swap = np.array([r.swap_s_per_block for r in p.replicas])
    src_kv = layout.kv[s] - kv
    src_total = (
        layout.work[s] - work - cost[:, s] - unload + swap[s] * np.maximum(0, src_kv - total_kv[s])
    )
    extra = np.zeros((len(idx), num_r))
    evict: dict[tuple[int, int], list[int]] = {}
    for a in {q.adapter for q in reqs if q.adapter is not None}:
        rows = [n for n, q in enumerate(reqs) if q.adapter == a]
        for d in range(num_r):
            if a in layout.present[d]:
                continue
            room = layout.room_for(a, d)
            if room is None:
                extra[rows, d] = np.inf
                continue
            evict[a, d] = room
            extra[rows, d] = 0.0 if (a, d) in layout.evicted else layout.adapter[a].load_s
    dst_kv = np.array(layout.kv)[None, :] + kv[:, None]
    over = np.maximum(0, dst_kv - total_kv[None, :])
    if p.kv_hard_limit:
        extra[over > np.array(layout.overflow_limit)[None, :]] = np.inf
    dst_total = np.array(layout.work)[None, :] + work[:, None] + cost + extra + swap[None, :] * over
    pair = np.maximum(src_total[:, None], dst_total)
    pair[:, s] = np.inf
    n, dst = divmod(int(np.argmin(pair)), num_r)
    if not np.isfinite(pair[n, dst]):
        return None
    adapter = reqs[n].adapter
    evictions = evict.get((adapter, dst), []) if adapter is not None else []
    return float(pair[n, dst]), idx[n], dst, evictions


def greedy_migration(problem: MigrationProblem) -> Layout:
    """The fallback plan (module docstring) as a `Layout`."""
    layout = Layout(problem)
    num_r = len(problem.replicas)
    for _ in range(len(problem.requests) * num_r + 1):
        top = layout.makespan()
        order = sorted(range(num_r), key=lambda j: (-layout.total(j), j))
        for s in (j for j in order if layout.total(j) >= top - 1e-9 * max(1.0, top)):
            best = _best_move(layout, s)
            if best is not None and best[0] < layout.total(s) - _EPS:
                _, i, d, evictions = best
                for e in evictions:
                    layout.evict(e, d)
                layout.move(i, d)
                break
        else:
            return layout
    return layout


class _Static:
    """A problem's per-request and per-replica arrays, built once per local search."""

    def __init__(self, layout: Layout) -> None:
        p = layout.problem
        reps = p.replicas
        self.work = np.array([q.work_s for q in p.requests])
        self.kv = np.array([q.kv_blocks for q in p.requests])
        self.cost = np.array([[layout.cost(i, j) for j in range(len(reps))] for i in range(len(p.requests))])
        self.total_kv = np.array([r.kv_blocks_total for r in reps])
        self.swap = np.array([r.swap_s_per_block for r in reps])


def _best_swap(layout: Layout, s: int, static: _Static) -> tuple[float, int, int] | None:
    """Best exchange of a request on replica index s with one elsewhere whose adapters are
    present at both ends and neither is the last user of an adapter the layout loaded (so no
    load or unload changes): (pair total, request on s, the other)."""
    p = layout.problem
    mine = [i for i, d in enumerate(layout.dest) if d == s]
    other = [i for i, d in enumerate(layout.dest) if d != s]
    if not mine or not other:
        return None

    def movable(i: int) -> bool:
        q = p.requests[i]
        a = q.adapter
        return a is None or not (layout.count.get((a, layout.dest[i]), 0) == 1 and layout.is_loaded(a, layout.dest[i]))

    mine = [i for i in mine if movable(i)]
    other = [i for i in other if movable(i)]
    if not mine or not other:
        return None
    w, kvb, cost, total_kv, swap = static.work, static.kv, static.cost, static.total_kv, static.swap
    d = np.array([layout.dest[k] for k in other])
    rows_i, cols_k = np.array(mine)[:, None], np.array(other)[None, :]
    ws = layout.work[s] - w[rows_i] - cost[rows_i, s] + w[cols_k] + cost[cols_k, s]
    kvs = layout.kv[s] - kvb[rows_i] + kvb[cols_k]
    wd = np.array(layout.work)[d][None, :] - w[cols_k] - cost[cols_k, d[None, :]] + w[rows_i] + cost[rows_i, d[None, :]]
    kvd = np.array(layout.kv)[d][None, :] - kvb[cols_k] + kvb[rows_i]
    over_s, over_d = np.maximum(0, kvs - total_kv[s]), np.maximum(0, kvd - total_kv[d][None, :])
    pair = np.maximum(ws + swap[s] * over_s, wd + swap[d][None, :] * over_d)
    ok = np.ones(pair.shape, dtype=bool)
    for a_n, i in enumerate(mine):
        ai = p.requests[i].adapter
        for b_n, k in enumerate(other):
            ak = p.requests[k].adapter
            if (ai is not None and ai not in layout.present[layout.dest[k]]) or (
                    ak is not None and ak not in layout.present[s]):
                ok[a_n, b_n] = False
    if p.kv_hard_limit:
        lim = np.array(layout.overflow_limit)
        ok &= (over_s <= lim[s]) & (over_d <= lim[d][None, :])
    pair = np.where(ok, pair, np.inf)
    a_n, b_n = divmod(int(np.argmin(pair)), pair.shape[1])
    if not np.isfinite(pair[a_n, b_n]):
        return None
    return float(pair[a_n, b_n]), mine[a_n], other[b_n]


def improve(layout: Layout) -> Layout:
    """Local search from a layout: the greedy's best move out of a most loaded replica, else
    its best swap (`_best_swap`), while either lowers that replica's total. Each step strictly
    decreases the sorted vector of replica totals, so the makespan never grows."""
    num_r = len(layout.problem.replicas)
    static = _Static(layout)
    for _ in range(4 * len(layout.problem.requests) * num_r + 1):
        s = min(range(num_r), key=lambda j: (-layout.total(j), j))
        top = layout.total(s)
        best = _best_move(layout, s)
        if best is not None and best[0] < top - _EPS:
            _, i, d, evictions = best
            for e in evictions:
                layout.evict(e, d)
            layout.move(i, d)
            continue
        sw = _best_swap(layout, s, static)
        if sw is None or sw[0] >= top - _EPS:
            break
        _, i, k = sw
        a, b = layout.dest[i], layout.dest[k]
        layout.move(i, b)
        layout.move(k, a)
    return _unmove(layout)


def _unmove(layout: Layout) -> Layout:
    """Send moved requests home again where that does not raise the makespan (a move costs
    a migration for nothing otherwise)."""
    p = layout.problem
    for i, q in enumerate(p.requests):
        home = layout.index[q.replica]
        away = layout.dest[i]
        if away == home or (q.adapter is not None and q.adapter not in layout.present[home]):
            continue
        top = layout.makespan()
        layout.move(i, home)
        if layout.makespan() > top + _EPS or not layout.feasible():
            layout.move(i, away)
    return layout
