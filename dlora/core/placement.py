"""Adapter placement across replicas from popularity history (PAPER.md section 4, proactive).

Owns: `place_adapters` (the greedy that decides which replica holds which adapter, from the
popularity shares `popularity.DecayedRates` gives), `placement_ratios` (its objective),
`diff_placement` (old -> new as loads and drops) and the static `round_robin_placement`.
Pure: no simpy, no torch.

Objective. Let `s_k` be adapter k's share of requests (normalised to sum 1), `C_j` replica j's
capacity (KV memory, any unit shared by all replicas) and `n_k` the number of replicas holding
k. Dispatch is assumed to spread k's requests evenly over its holders, so each copy carries
`s_k / n_k` and replica j's load is `L_j = sum_{k on j} s_k / n_k`. Replica j's capacity is
split among its adapters in proportion to that load, so adapter k is served
`served_k = sum_{j holds k} C_j * (s_k / n_k) / L_j` and its ratio is

    ratio_k = served_k / s_k = (1 / n_k) * sum_{j holds k} C_j / L_j.

The placement maximises `min_k ratio_k` over adapters with a positive share (leximin on ties:
the sorted vector of ratios). Since `sum_k s_k ratio_k = sum_j C_j`, every ratio equal to
`C_total` is the ideal; replication is how a hot adapter whose share exceeds one replica's
capacity fraction gets there.

Greedy. (1) Plan `n_k = ceil(s_k / (C_max / C_total))` copies (capped by replicas and
`max_copies`). (2) Cover: place one copy of every adapter, in decreasing per-copy share, on the
replica with room whose resulting relative load `L_j / C_j` is lowest (first-fit-decreasing by
size as a fallback when memory makes that fail). (3) Place the planned extra copies the same
way while room remains. (4) Add the copy that most improves the leximin ratios while it does
and the worst ratio is below `target_fraction * C_total`. Ties prefer replicas that already hold
the adapter in `current`, then lower replica ids, to keep churn low.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

_TIE = 1e-9  # relative tolerance under which two scores count as equal


@dataclass(frozen=True, slots=True)
class AdapterDemand:
    id: int
    share: float  # expected share of requests (any non-negative scale; normalised inside)
    size_bytes: int


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    id: int
    capacity: float  # KV memory (blocks, tokens or bytes: the same unit for all replicas)
    adapter_memory_bytes: int  # budget for resident adapters
    max_adapters: int  # adapter slots


@dataclass(frozen=True, slots=True)
class Placement:
    """Which replica holds which adapter, as a set of `(replica, adapter)` pairs."""

    pairs: frozenset[tuple[int, int]]

    @classmethod
    def from_mapping(cls, mapping: Mapping[int, Iterable[int]]) -> Placement:
        """From `{replica: adapters}`."""
        return cls(frozenset((r, k) for r, ks in mapping.items() for k in ks))

    def adapters_on(self, replica: int) -> tuple[int, ...]:
        return tuple(sorted(k for r, k in self.pairs if r == replica))

    def holders(self, adapter: int) -> tuple[int, ...]:
        return tuple(sorted(r for r, k in self.pairs if k == adapter))


@dataclass(frozen=True, slots=True)
class PlacementProblem:
    adapters: tuple[AdapterDemand, ...]
    replicas: tuple[ReplicaCapacity, ...]
    current: Placement | None = None  # preferred on ties (less churn)
    max_copies: int | None = None  # per adapter; None: up to every replica
    target_fraction: float = 0.9  # stop replicating once min ratio >= this * ideal
    min_relative_gain: float = 1e-6  # a copy must improve the leximin ratios by this much

    def __post_init__(self) -> None:
        if len({a.id for a in self.adapters}) != len(self.adapters):
            raise ValueError("adapter ids must be unique")
        if len({r.id for r in self.replicas}) != len(self.replicas):
            raise ValueError("replica ids must be unique")
        if not self.replicas:
            raise ConfigError("placement needs at least one replica")
        if any(not (a.share >= 0 and math.isfinite(a.share)) for a in self.adapters):
            raise ValueError("adapter shares must be finite and >= 0")
        if any(not r.capacity > 0 for r in self.replicas):
            raise ValueError("replica capacities must be > 0")


class _State:
    """Mutable working state of one `place_adapters` call (matrix form for the objective)."""

    def __init__(self, problem: PlacementProblem) -> None:
        self.adapters = sorted(problem.adapters, key=lambda a: a.id)
        self.replicas = sorted(problem.replicas, key=lambda r: r.id)
        shares = np.array([a.share for a in self.adapters], dtype=float)
        total = shares.sum()
        self.share = (
            shares / total if total > 0 else np.full(len(shares), 1.0 / max(1, len(shares)))
        )
        self.size = np.array([a.size_bytes for a in self.adapters], dtype=float)
        self.cap = np.array([r.capacity for r in self.replicas], dtype=float)
        self.mem = np.array([r.adapter_memory_bytes for r in self.replicas], dtype=float)
        self.slots = np.array([r.max_adapters for r in self.replicas], dtype=int)
        self.x = np.zeros((len(self.adapters), len(self.replicas)), dtype=bool)
        self.kept = np.zeros(self.x.shape, dtype=bool)  # the current placement's pairs
        if problem.current:
            rid = {r.id: j for j, r in enumerate(self.replicas)}
            kid = {a.id: k for k, a in enumerate(self.adapters)}
            for r, a in problem.current.pairs:
                if r in rid and a in kid:
                    self.kept[kid[a], rid[r]] = True
        # what depends on `x` alone, computed once per layout (the greedy scores many candidates
        # against one): copies and adapter bytes per replica, copies per adapter (at least 1), loads
        self._of_x: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, k: int, j: int) -> None:
        """A copy of adapter `k` on replica `j` (every change of `x` goes through here or `clear`)."""
        self.x[k, j] = True
        self._of_x = None

    def clear(self) -> None:
        self.x[:] = False
        self._of_x = None

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._of_x is None:
            x = self.x
            n = np.maximum(x.sum(axis=1), 1)
            self._of_x = (x.sum(axis=0), self.size @ x, n, x.T.astype(float) @ (self.share / n))
        return self._of_x

    def fits_all(self, k: int | np.ndarray) -> np.ndarray:
        """Whether replica j has room for a copy of `k` (a free slot and adapter memory; not
        holding it yet), for every j (sizes are whole bytes: the sums are exact); for an array
        of adapters, one row each."""
        copies, used, *_ = self._layout()
        return ~self.x[k] & (copies < self.slots) & (used + self.size[k][..., None] <= self.mem)

    def pick(self, k: int, weight: float) -> int | None:
        """Replica with room for `k` whose relative load after adding `weight` is lowest: a scan
        in replica order where a score within `_TIE` of the best so far is a tie, won by a
        replica of the current placement (`kept`). The scan runs over the replicas whose score
        is near the lowest; the others (numpy's scores are the same IEEE operations as Python
        floats') cannot change its outcome when they are above the near ones by more than the
        tie tolerance: a far replica that is best so far loses to the first near one, and never
        beats a near one. Otherwise every fitting replica is scanned."""
        fits = self.fits_all(k)
        if not fits.any():
            return None
        score = (self.load() + float(weight)) / self.cap
        fit_scores = score[fits]
        low = fit_scores.min()
        near = score <= low * (1.0 + 1e-6)
        cand = fits & near
        far = fits & ~near
        if far.any() and not score[far].min() * (1.0 - 2 * _TIE) > score[cand].max():
            cand = fits  # a far replica could tie with a near one: scan them all
        idx = np.flatnonzero(cand).tolist()
        scores = score[idx].tolist()
        kept = self.kept[k, idx].tolist()
        best, best_score, best_kept = None, math.inf, False
        for j, sc, kj in zip(idx, scores, kept, strict=True):
            tie = abs(sc - best_score) <= _TIE * max(abs(best_score), 1e-300)
            if best is None or (sc < best_score and not tie) or (tie and kj and not best_kept):
                best, best_score, best_kept = j, sc, kj
        return best

    def load(self) -> np.ndarray:
        """Each replica's load `L_j` (module docstring)."""
        return self._layout()[3]

    def ratios(self) -> np.ndarray:
        """ratio_k for adapters with a positive share (module docstring)."""
        x, (_, _, n, load) = self.x, self._layout()
        with np.errstate(divide="ignore"):
            inv = np.where(load > 0, self.cap / np.where(load > 0, load, 1.0), np.inf)
        served = np.where(x, inv[None, :], 0.0).sum(axis=1)  # inf only off the holders
        return (served / n)[self.share > 0]

    def ratios_with(self, ks: np.ndarray, js: np.ndarray) -> np.ndarray:
        """`ratios()` with one extra copy of adapter `ks[i]` on replica `js[i]` (one row per
        pair, none of them held yet), for all pairs at once: only the loads of the adapter's
        holders and of the new one change, and each adapter's served capacity is a sum over
        its holders in replica order (`np.add.reduceat`, row by row: a row's values do not
        depend on the other rows, nor on the machine's BLAS). Every adapter has a holder."""
        x = self.x
        _, _, n, load0 = self._layout()
        rows = np.arange(len(ks))
        n_new = n[ks] + 1  # (a held adapter: n is its number of copies)
        new_per = self.share[ks] / n_new
        delta = new_per - self.share[ks] / n[ks]
        load = load0[None, :] + np.where(x[ks], delta[:, None], 0.0)  # (+0.0 off the holders: exact)
        load[rows, js] += new_per
        with np.errstate(divide="ignore"):
            inv = np.where(load > 0, self.cap[None, :] / np.where(load > 0, load, 1.0), np.inf)
        finite = np.where(np.isfinite(inv), inv, 0.0)  # inf only off the holders
        holder_k, holder_j = np.nonzero(x)  # by adapter, then replica
        starts = np.searchsorted(holder_k, np.arange(x.shape[0]))
        served = np.add.reduceat(finite[:, holder_j], starts, axis=1)  # (rows, adapters)
        served[rows, ks] += finite[rows, js]
        counts = np.repeat(n[None, :].astype(float), len(ks), axis=0)
        counts[rows, ks] = n_new
        return (served / counts)[:, self.share > 0]


def _leximin_better(new: np.ndarray, old: np.ndarray, tol: float) -> bool:
    diff = new - old
    differs = np.abs(diff) > tol * np.maximum(np.abs(old), 1e-300)
    return bool(differs.any() and diff[int(np.argmax(differs))] > 0)


def _leximin_better_rows(rows: np.ndarray, old: np.ndarray, tol: float) -> np.ndarray:
    """`_leximin_better(row, old, tol)` for every row."""
    diff = rows - old[None, :]
    differs = np.abs(diff) > tol * np.maximum(np.abs(old), 1e-300)[None, :]
    first = differs.argmax(axis=1)
    return differs.any(axis=1) & (diff[np.arange(len(rows)), first] > 0)


def _leximin_worse_rows(rows: np.ndarray, best: np.ndarray, tol: float) -> np.ndarray:
    """`_leximin_better(best, row, tol)` for every row."""
    diff = best[None, :] - rows
    differs = np.abs(diff) > tol * np.maximum(np.abs(rows), 1e-300)
    first = differs.argmax(axis=1)
    return differs.any(axis=1) & (diff[np.arange(len(rows)), first] > 0)


def _cover(st: _State, order: list[int], planned: np.ndarray) -> list[int]:
    """Place one copy of each adapter in `order`; return those that found no room."""
    missing = []
    for k in order:
        j = st.pick(k, st.share[k] / planned[k])
        if j is None:
            missing.append(k)
        else:
            st.add(k, j)
    return missing


def place_adapters(problem: PlacementProblem) -> Placement:
    """Decide which replica holds which adapter (greedy of the module docstring).

    Every adapter is placed at least once; raises `ConfigError` when slots or memory make
    that impossible for the greedy (including first-fit-decreasing by size).
    """
    st = _State(problem)
    num_k, num_r = st.x.shape
    total_slots = int(st.slots.sum())
    if num_k > total_slots:
        raise ConfigError(
            f"cannot place {num_k} adapters in {total_slots} adapter slots over {num_r} replicas: "
            "raise max_adapters per replica, add replicas or use fewer adapters"
        )
    too_big = [a.id for a in st.adapters if a.size_bytes > st.mem.max()]
    if too_big:
        raise ConfigError(
            f"adapters {too_big} are larger than every replica's adapter memory "
            f"({int(st.mem.max())} bytes): raise adapter memory or use smaller adapters"
        )
    max_copies = min(num_r, problem.max_copies or num_r)
    frac = st.cap.max() / st.cap.sum()
    planned = np.clip(np.ceil(st.share / frac - 1e-9), 1, max_copies)
    order = sorted(range(num_k), key=lambda k: (-st.share[k] / planned[k], st.adapters[k].id))
    if _cover(st, order, planned):
        st.clear()
        by_size = sorted(range(num_k), key=lambda k: (-st.size[k], -st.share[k], st.adapters[k].id))
        missing = _cover(st, by_size, planned)
        if missing:
            ids = [st.adapters[k].id for k in missing]
            raise ConfigError(
                f"cannot place adapters {ids}: adapter slots or memory are full on every "
                "replica; raise max_adapters or adapter memory, add replicas or use fewer adapters"
            )
    extra = [(k, c) for k in order for c in range(1, int(planned[k]))]
    for k, _ in sorted(extra, key=lambda kc: (-st.share[kc[0]] / planned[kc[0]], kc[1])):
        j = st.pick(k, st.share[k] / planned[k])
        if j is not None:
            st.add(k, j)
    _replicate(st, problem, max_copies)
    return Placement(
        frozenset(
            (st.replicas[j].id, st.adapters[k].id) for k, j in zip(*np.nonzero(st.x), strict=True)
        )
    )


def _replicate(st: _State, problem: PlacementProblem, max_copies: int) -> None:
    """Step (4): add leximin-improving copies until the target or no room."""
    positive = st.share > 0
    ideal = st.cap.sum()
    for _ in range(int(st.slots.sum())):
        ratios = st.ratios()
        if ratios.size == 0 or ratios.min() >= problem.target_fraction * ideal:
            return
        old = np.sort(ratios)
        # candidates: the worst-served adapters and those sharing a replica with one of them
        worst = np.flatnonzero(positive)[ratios <= ratios.min() * (1 + 1e-9)]
        on_worst = st.x[worst].any(axis=0)
        room = positive & (st.x.sum(axis=1) < max_copies)
        near = np.asarray(st.x[:, on_worst].any(axis=1))
        near[worst] = True
        cands = near & room
        best = _best_copy(st, problem, np.flatnonzero(cands), old)
        if best is None:  # a copy of an adapter elsewhere can still relieve the worst
            best = _best_copy(st, problem, np.flatnonzero(room & ~cands), old)
        if best is None:
            return
        st.add(*best)


def _best_copy(st: _State, problem: PlacementProblem, cands: np.ndarray,
               old: np.ndarray) -> tuple[int, int] | None:
    """The extra copy among adapters `cands` (ascending) that most improves the sorted ratios
    (leximin), if any: a scan over every (adapter, replica with room) pair, adapters in order,
    keeping the best so far (`_TIE`-close vectors are ties, won by a pair of the current
    placement). Every pair is evaluated in one batch (`_State.ratios_with`)."""
    rows_k, js = np.nonzero(st.fits_all(cands))  # (pairs in scan order)
    if not len(js):
        return None
    ks = cands[rows_k]
    vecs = np.sort(st.ratios_with(ks, js), axis=1)
    kept = st.kept[ks, js]
    lowest = vecs[:, 0]  # each row's worst ratio
    gain = problem.min_relative_gain
    best: int | None = None  # the best pair's row
    best_vec = old
    pos = 0  # the rows in order, as a scan that keeps the best so far would visit them
    while pos < len(js):
        # a row whose worst ratio is below the best's by more than twice the tolerance differs
        # from it there, downwards: neither better nor tied; only the others are compared
        tol = gain if best is None else _TIE
        rest = pos + np.flatnonzero(lowest[pos:] >= best_vec[0] - 2 * tol * max(abs(best_vec[0]), 1e-300))
        rows = vecs[rest]
        if best is None:
            better = _leximin_better_rows(rows, old, gain)
        else:
            not_worse = ~_leximin_worse_rows(rows, best_vec, _TIE)
            better = _leximin_better_rows(rows, best_vec, _TIE) | (not_worse & kept[rest] & (not kept[best]))
        hit = np.flatnonzero(better)
        if not hit.size:
            break
        best = int(rest[hit[0]])
        best_vec = vecs[best]
        pos = best + 1
    return None if best is None else (int(ks[best]), int(js[best]))


def placement_ratios(problem: PlacementProblem, placement: Placement) -> dict[int, float]:
    """`ratio_k` of the module docstring for every adapter with a positive share."""
    st = _State(problem)
    rid = {r.id: j for j, r in enumerate(st.replicas)}
    kid = {a.id: k for k, a in enumerate(st.adapters)}
    for r, a in placement.pairs:
        st.add(kid[a], rid[r])
    ids = [a.id for k, a in enumerate(st.adapters) if st.share[k] > 0]
    return dict(zip(ids, st.ratios().tolist(), strict=True))


def diff_placement(
    old: Placement, new: Placement
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """`(loads, drops)`: sorted `(replica, adapter)` pairs to load and to drop."""
    return sorted(new.pairs - old.pairs), sorted(old.pairs - new.pairs)


def round_robin_placement(num_adapters: int, num_replicas: int) -> Placement:
    """Static baseline: adapter k (ids 0..num_adapters-1) on replica k % num_replicas."""
    if num_replicas < 1:
        raise ConfigError(f"round-robin placement needs at least one replica, got {num_replicas}")
    return Placement(frozenset((k % num_replicas, k) for k in range(num_adapters)))
