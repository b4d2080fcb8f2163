"""Request-adapter co-migration as a MILP with a greedy fallback (PAPER.md section 5).

Owns the pure decision: given the replicas involved, the candidate requests (the ones that may
move) and the adapters, where should each candidate run, which adapters must be loaded (or may
be evicted), and is each move a recompute or a KV transfer. No clock (only the solver's own
wall time is measured, and it decides nothing), no simpy, no torch. `dlora.core.migration`
wires it to the cluster.

Model (`x[i,j]` request i on replica j, `y[k,j]` adapter k on j, binary; `ov_j >= 0` KV blocks
over capacity and `T` continuous):

    minimise   T + move_penalty * #moves + load_penalty * #loads - keep_reward * #kept evictables
    s.t.       sum_j x[i,j] = 1                                          every request once
               x[i,j] <= y[k(i),j]                                       adapter present
               sum_k y[k,j] <= slots_j,  sum_k bytes_k y[k,j] <= memory_j
               kv_base_j + sum_i kv_i x[i,j] - ov_j <= kv_total_j      (ov_j <= today's if hard)
               T >= base_j + sum_i (work_i + c_ij) x[i,j] + sum_{k new on j} load_k y[k,j]
                         + swap_s_per_block_j * ov_j

with `c_ij = 0` at the request's own replica and otherwise `min(recompute_s, transfer_s)`, the
chosen mode reported per move. Resident adapters cost nothing; only `evictable_adapters` (which
no request outside the problem needs) may leave. Slot and memory limits are hard (never below
today's use, so doing nothing is always feasible and the result is never worse than that).
Beyond the artifact: any number of replicas, adapter load cost, memory and slot limits, KV
overflow priced at swap bandwidth, and the mode choice.

Strategy (deterministic, cheapest first): a plan from local search (`migration_greedy.improve`:
the greedy's moves and pairwise swaps, from the current layout and from the LP relaxation
rounded) is taken when the LP relaxation's bound proves it within `mip_rel_gap` of the optimum
(`WITHIN_GAP`: most instances, about 15 of 20 measured); else the MILP runs with HiGHS
(`scipy.optimize.milp`, one thread, silent) to that gap under a deterministic branch-and-bound
node limit, and the better of its plan and the local search's wins. The same problem gives the
same plan on any machine under any load. Only the greedy runs above `max_size`
(requests x replicas) or when the solver gives no solution. A wall-clock time limit
exists only as an opt-in safety cap: when it binds, plans depend on the machine.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from .migration_greedy import Layout, greedy_migration, improve
from .migration_problem import (  # noqa: F401  (the problem types, importable from here too)
    AdapterCost,
    CandidateRequest,
    MigrationPlan,
    MigrationProblem,
    Move,
    ReplicaState,
    SolveStatus,
)

log = logging.getLogger(__name__)
KEEP_REWARD_S = 1e-6


def _plan(
    problem: MigrationProblem,
    layout: Layout,
    before_s: float,
    status: SolveStatus,
    fallback: bool,
    t0: float,
) -> MigrationPlan:
    moves = []
    for i, q in enumerate(problem.requests):
        dst = problem.replicas[layout.dest[i]].id
        if dst != q.replica:
            cost, mode = problem.migration_cost(q, dst)
            moves.append(Move(q.id, q.replica, dst, mode, cost))
    return MigrationPlan(
        moves=tuple(moves),
        adapter_loads=layout.loads(),
        adapter_evictions=layout.evictions(),
        makespan_before_s=before_s,
        makespan_after_s=layout.makespan(),
        status=status,
        used_fallback=fallback,
        solve_s=time.perf_counter() - t0,
    )


def solve_migration(
    problem: MigrationProblem,
    time_limit_s: float | None = None,
    max_size: int = 4096,
    mip_rel_gap: float = 1e-2,
    node_limit: int | None = None,
) -> MigrationPlan:
    """Plan the co-migration: MILP of the module docstring, greedy when it cannot answer.

    `max_size` bounds `len(requests) * len(replicas)` for the MILP; above it only the greedy
    runs. The plan never has a larger makespan than doing nothing. `node_limit` bounds the
    branch-and-bound nodes: the same problem gives the same plan on every machine. The
    wall-clock `time_limit_s` (None: off) is a safety cap only; when it binds, the plan depends
    on the machine's speed and load. `solve_s` is measured but never decides anything.
    """
    t0 = time.perf_counter()
    stay = Layout(problem)
    before_s = stay.makespan()
    size = len(problem.requests) * len(problem.replicas)
    if len(problem.replicas) < 2 or not problem.requests:
        return _plan(problem, stay, before_s, SolveStatus.TRIVIAL, False, t0)
    if size > max_size:
        log.info("migration instance %d > max_size %d: greedy only", size, max_size)
        return _plan(problem, greedy_migration(problem), before_s, SolveStatus.TOO_LARGE, True, t0)
    model = _model(problem)
    heuristic, bound = _heuristic(problem, model)
    if heuristic is not None and bound is not None:
        obj = heuristic.objective(KEEP_REWARD_S)
        if obj - bound <= mip_rel_gap * max(abs(obj), 1e-12):  # proven within the gap: no B&B
            return _plan(problem, heuristic, before_s, SolveStatus.WITHIN_GAP, False, t0)
    status, layout = _solve_milp(problem, time_limit_s, mip_rel_gap, node_limit, model)
    if layout is None or not layout.feasible():
        log.info("migration MILP gave no usable solution (%s): greedy fallback", status)
        return _plan(problem, heuristic or greedy_migration(problem), before_s, status, True, t0)
    if heuristic is not None and heuristic.objective(KEEP_REWARD_S) < layout.objective(KEEP_REWARD_S) - 1e-12:
        return _plan(problem, heuristic, before_s, status, False, t0)  # the better of the two
    if layout.makespan() > before_s:  # a gap-limited answer worse than staying put
        layout = stay
    return _plan(problem, layout, before_s, status, False, t0)


def _heuristic(problem: MigrationProblem, model: _Model) -> tuple[Layout | None, float | None]:
    """The better of the greedy and the LP relaxation rounded (each request to its largest
    share), both improved by local search (`improve`), and the LP's bound on the objective."""
    plans = [Layout(problem), improve(greedy_migration(problem))]  # (staying put is a plan too)
    res = _run_highs(model, True, None, 1.0, None)
    bound = float(res.fun) if res.x is not None and res.status == 0 else None
    if res.x is not None:
        n, r = len(problem.requests), len(problem.replicas)
        x = res.x[: n * r].reshape(n, r)
        rounded = Layout(problem)
        for i in range(n):
            rounded.move(i, int(np.argmax(x[i])))
        if rounded.feasible():
            plans.append(improve(rounded))
    plans = [p for p in plans if p.feasible()]
    if not plans:
        return None, bound
    return min(plans, key=lambda p: p.objective(KEEP_REWARD_S)), bound


@dataclass(frozen=True)
class _Model:
    """The MILP of the module docstring in scipy's form."""

    cost: np.ndarray
    integrality: np.ndarray
    bounds: Bounds
    constraints: LinearConstraint
    adapter_index: dict[int, int]


def _model(problem: MigrationProblem) -> _Model:
    reqs, reps, ads = problem.requests, problem.replicas, problem.adapters
    n, r, k = len(reqs), len(reps), len(ads)
    kidx = {a.id: a_i for a_i, a in enumerate(ads)}
    xi = lambda i, j: i * r + j  # noqa: E731
    yi = lambda a, j: n * r + a * r + j  # noqa: E731
    oi = lambda j: n * r + k * r + j  # noqa: E731
    t_var = n * r + k * r + r
    nv = t_var + 1
    cost = np.zeros(nv)
    lb, ub = np.zeros(nv), np.ones(nv)
    integrality = np.ones(nv)
    integrality[oi(0) :] = 0
    cost[t_var] = 1.0
    ub[oi(0) :] = np.inf
    stay = Layout(problem)
    needed = {q.adapter for q in reqs if q.adapter is not None}
    rows: list[tuple[int, int, float]] = []
    row_lb: list[float] = []
    row_ub: list[float] = []

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(row_lb)
        rows.extend((row, c, v) for c, v in entries)
        row_lb.append(lo)
        row_ub.append(hi)

    for i, q in enumerate(reqs):
        add_row([(xi(i, j), 1.0) for j in range(r)], 1.0, 1.0)
        for j, rep in enumerate(reps):
            if rep.id != q.replica:
                cost[xi(i, j)] = problem.move_penalty_s
            if q.adapter is not None:
                add_row([(xi(i, j), 1.0), (yi(kidx[q.adapter], j), -1.0)], -np.inf, 0.0)
    for j, rep in enumerate(reps):
        for a_i, a in enumerate(ads):
            resident = a.id in rep.resident_adapters
            if resident and a.id not in rep.evictable_adapters:
                lb[yi(a_i, j)] = 1.0
            elif resident:
                cost[yi(a_i, j)] = -KEEP_REWARD_S
            elif a.id in needed and a.size_bytes <= rep.adapter_memory_bytes:
                cost[yi(a_i, j)] = problem.load_penalty_s
            else:
                ub[yi(a_i, j)] = 0.0
        add_row([(yi(a_i, j), 1.0) for a_i in range(k)], -np.inf, stay.slot_limit[j])
        add_row(
            [(yi(a_i, j), float(a.size_bytes)) for a_i, a in enumerate(ads)],
            -np.inf,
            stay.memory_limit[j],
        )
        kv = [(xi(i, j), float(q.kv_blocks)) for i, q in enumerate(reqs)]
        add_row(kv + [(oi(j), -1.0)], -np.inf, float(rep.kv_blocks_total - rep.kv_blocks_base))
        if problem.kv_hard_limit:
            ub[oi(j)] = stay.overflow(j)
        span = [
            (xi(i, j), q.work_s + problem.migration_cost(q, rep.id)[0]) for i, q in enumerate(reqs)
        ]
        span += [
            (yi(a_i, j), a.load_s)
            for a_i, a in enumerate(ads)
            if a.id not in rep.resident_adapters and ub[yi(a_i, j)] > 0
        ]
        span += [(oi(j), rep.swap_s_per_block), (t_var, -1.0)]
        add_row(span, -np.inf, -rep.base_work_s)
    r_idx, c_idx, vals = zip(*rows, strict=True)
    a_mat = coo_array((vals, (r_idx, c_idx)), shape=(len(row_lb), nv)).tocsr()
    return _Model(cost, integrality, Bounds(lb, ub), LinearConstraint(a_mat, row_lb, row_ub), kidx)


def _run_highs(model: _Model, relax: bool, time_limit_s: float | None, mip_rel_gap: float,
               node_limit: int | None) -> Any:
    options = _highs_options(time_limit_s, mip_rel_gap, node_limit)
    with warnings.catch_warnings(), quiet_stdout():  # scipy warns that it passes threads etc. to
        # HiGHS verbatim; HiGHS prints some debugging lines to the process's stdout whatever its
        # options say (scipy 1.17: "HighsMipSolverData::transformNewIntegerFeasibleSolution ...")
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        return milp(
            model.cost,
            integrality=np.zeros_like(model.integrality) if relax else model.integrality,
            bounds=model.bounds,
            constraints=model.constraints,
            options=options,
        )


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """File descriptor 1 points to /dev/null inside the block (what C code prints there is
    lost), on the main thread only: a server's other threads (uvicorn's access log) print to
    stdout, and a migration check on a worker thread keeps the process's stdout as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no stdout to protect
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_milp(
    problem: MigrationProblem,
    time_limit_s: float | None,
    mip_rel_gap: float,
    node_limit: int | None = None,
    model: _Model | None = None,
) -> tuple[SolveStatus, Layout | None]:
    model = model or _model(problem)
    reqs, reps = problem.requests, problem.replicas
    n, r, k = len(reqs), len(reps), len(problem.adapters)
    kidx = model.adapter_index
    res = _run_highs(model, False, time_limit_s, mip_rel_gap, node_limit)
    stopped = _stopped_by(res)
    if res.x is None:
        return (SolveStatus.FAILED if stopped is None else SolveStatus.NO_SOLUTION), None
    status = SolveStatus.OPTIMAL if res.status == 0 else stopped or SolveStatus.NODE_LIMIT
    x = res.x[: n * r].reshape(n, r)
    y = res.x[n * r : n * r + k * r].reshape(k, r)
    layout = Layout(problem)
    for i in range(n):
        layout.move(i, int(np.argmax(x[i])))
    for j, rep in enumerate(reps):
        for a_id in rep.evictable_adapters:
            if y[kidx[a_id], j] < 0.5 and layout.count.get((a_id, j), 0) == 0:
                layout.evict(a_id, j)
    return status, layout


def _highs_options(
    time_limit_s: float | None, mip_rel_gap: float, node_limit: int | None
) -> dict[str, object]:
    """HiGHS options: silent, one thread (the same search on every machine), the node limit,
    and the wall-clock limit only when asked for."""
    options: dict[str, object] = {
        "mip_rel_gap": mip_rel_gap, "disp": False, "output_flag": False, "threads": 1,
    }
    if node_limit is not None:
        options["node_limit"] = node_limit
    if time_limit_s is not None:
        options["time_limit"] = max(time_limit_s, 1e-3)
    return options


# HiGHS model statuses of a solve cut off by a limit (scipy reports them in `res.message`)
_HIGHS_LIMITS = {13: SolveStatus.TIME_LIMIT, 14: SolveStatus.NODE_LIMIT, 16: SolveStatus.NODE_LIMIT}


def _stopped_by(res: object) -> SolveStatus | None:
    """Which limit stopped the solve (None: it finished or failed)."""
    message = str(getattr(res, "message", ""))
    for code, status in _HIGHS_LIMITS.items():
        if f"HiGHS Status {code}:" in message:
            return status
    return SolveStatus.TIME_LIMIT if getattr(res, "status", None) == 1 else None


def choose_replicas(
    work_s: Mapping[int, float], max_replicas: int = 4, imbalance: float = 0.1
) -> tuple[int, ...]:
    """Replicas to include when migration triggers, most loaded first then least loaded.

    Empty when the busiest replica is within `imbalance` (relative) of the mean. Otherwise the
    busiest and the idlest, then, alternately, further replicas above `mean * (1 + imbalance)`
    and below `mean * (1 - imbalance)` while they exist and fewer than `max_replicas` are in:
    more than two replicas are worth solving for exactly when several are out of balance.
    """
    if len(work_s) < 2 or max_replicas < 2:
        return ()
    order = sorted(work_s, key=lambda rid: (-work_s[rid], rid))
    mean = sum(work_s.values()) / len(work_s)
    top, bottom = order[0], order[-1]
    if work_s[top] <= mean * (1 + imbalance) or math.isclose(work_s[top], work_s[bottom]):
        return ()
    hot = [rid for rid in order[1:-1] if work_s[rid] > mean * (1 + imbalance)]
    cold = [rid for rid in reversed(order[1:-1]) if work_s[rid] < mean * (1 - imbalance)]
    chosen_hot, chosen_cold = [top], [bottom]
    while len(chosen_hot) + len(chosen_cold) < max_replicas and (hot or cold):
        if hot and (len(chosen_hot) <= len(chosen_cold) or not cold):
            chosen_hot.append(hot.pop(0))
        else:
            chosen_cold.append(cold.pop(0))
    return tuple(chosen_hot + chosen_cold)
