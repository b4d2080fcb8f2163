"""Co-migration MILP and greedy fallback: constraints on random instances, hand-made optima."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.core import migration_solver
from dlora.core.migration_greedy import Layout
from dlora.core.migration_solver import (
    AdapterCost,
    CandidateRequest,
    MigrationPlan,
    MigrationProblem,
    ReplicaState,
    SolveStatus,
    _solve_milp,
    choose_replicas,
    solve_migration,
)
from dlora.types import MigrateMode
from dlora.views import DropAdapter, LoadAdapter, MigrateRequest


def replica(rid, base=0.0, resident=(), evictable=(), slots=4, memory=10_000, kv=1000, kv_base=0,
            swap=0.0):  # fmt: skip
    return ReplicaState(rid, base, kv, kv_base, slots, memory, frozenset(resident),
                        frozenset(evictable), swap)  # fmt: skip


def request(rid, replica_id, adapter=0, work=1.0, kv=1, recompute=0.1, transfer=0.2):
    return CandidateRequest(rid, adapter, replica_id, work, kv, recompute, transfer)


def adapters(n, size=100, load_s=0.05):
    return tuple(AdapterCost(k, size, load_s) for k in range(n))


def check_plan(p: MigrationProblem, plan: MigrationPlan) -> None:
    """Independent checker: every constraint of the model, and the reported makespans."""
    reps = {r.id: r for r in p.replicas}
    ads = {a.id: a for a in p.adapters}
    reqs = {q.id: q for q in p.requests}
    moved = [m.request_id for m in plan.moves]
    assert len(moved) == len(set(moved)), "a request moved twice"
    where = {q.id: q.replica for q in p.requests}
    for m in plan.moves:
        q = reqs[m.request_id]
        assert m.source == q.replica and m.destination != m.source and m.destination in reps
        cheaper = MigrateMode.TRANSFER if q.transfer_s < q.recompute_s else MigrateMode.RECOMPUTE
        assert m.mode == cheaper and m.cost_s == min(q.transfer_s, q.recompute_s)
        where[q.id] = m.destination
    present = {rid: set(r.resident_adapters) for rid, r in reps.items()}
    for k, rid in plan.adapter_evictions:
        assert k in reps[rid].evictable_adapters
        present[rid].discard(k)
    for k, rid in plan.adapter_loads:
        assert k not in reps[rid].resident_adapters and k not in present[rid]
        present[rid].add(k)
    for q in p.requests:  # every request once, its adapter where it runs
        assert q.adapter is None or q.adapter in present[where[q.id]]
    for k, rid in plan.adapter_evictions:
        assert all(where[q.id] != rid for q in p.requests if q.adapter == k)

    def totals(loc, pres, moves):
        out = {}
        for rid, r in reps.items():
            mine = [q for q in p.requests if loc[q.id] == rid]
            kv = r.kv_blocks_base + sum(q.kv_blocks for q in mine)
            work = r.base_work_s + sum(q.work_s for q in mine)
            work += sum(m.cost_s for m in moves if m.destination == rid)
            work += sum(ads[k].load_s for k in pres[rid] - r.resident_adapters)
            out[rid] = (work + r.swap_s_per_block * max(0, kv - r.kv_blocks_total), kv)
        return out

    start = {q.id: q.replica for q in p.requests}
    before = totals(start, {rid: set(r.resident_adapters) for rid, r in reps.items()}, [])
    after = totals(where, present, plan.moves)
    for rid, r in reps.items():
        resident_bytes = sum(ads[k].size_bytes for k in r.resident_adapters)
        assert len(present[rid]) <= max(r.max_adapters, len(r.resident_adapters))
        assert sum(ads[k].size_bytes for k in present[rid]) <= max(
            r.adapter_memory_bytes, resident_bytes
        )
        if p.kv_hard_limit:
            assert max(0, after[rid][1] - r.kv_blocks_total) <= max(
                0, before[rid][1] - r.kv_blocks_total
            )
    assert plan.makespan_before_s == pytest.approx(max(t for t, _ in before.values()))
    assert plan.makespan_after_s == pytest.approx(max(t for t, _ in after.values()))
    assert plan.makespan_after_s <= plan.makespan_before_s + 1e-9


@st.composite
def problems(draw):
    num_r = draw(st.integers(2, 4))
    num_k = draw(st.integers(1, 5))
    ads = tuple(
        AdapterCost(k, draw(st.integers(50, 300)), draw(st.floats(0.0, 0.5))) for k in range(num_k)
    )
    reps = []
    for j in range(num_r):
        slots = draw(st.integers(1, 3))
        resident = draw(st.sets(st.integers(0, num_k - 1), max_size=slots))
        evictable = draw(st.sets(st.sampled_from(sorted(resident)))) if resident else set()
        memory = sum(ads[k].size_bytes for k in resident) + draw(st.integers(0, 400))
        kv_total = draw(st.integers(5, 40))
        reps.append(
            ReplicaState(
                j, draw(st.floats(0.0, 5.0)), kv_total, draw(st.integers(0, kv_total)), slots,
                memory, frozenset(resident), frozenset(evictable), draw(st.floats(0.0, 0.05)),
            )
        )  # fmt: skip
    reqs = []
    for i in range(draw(st.integers(0, 10))):
        j = draw(st.integers(0, num_r - 1))
        choices = [None, *sorted(reps[j].resident_adapters)]
        reqs.append(
            CandidateRequest(
                i, draw(st.sampled_from(choices)), j, draw(st.floats(0.01, 3.0)),
                draw(st.integers(0, 8)), draw(st.floats(0.0, 0.5)), draw(st.floats(0.0, 0.5)),
            )
        )  # fmt: skip
    return MigrationProblem(tuple(reps), tuple(reqs), ads, kv_hard_limit=draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(problems())
def test_milp_plan_respects_every_constraint(p):
    plan = solve_migration(p, time_limit_s=10.0)
    check_plan(p, plan)
    if len(p.requests) > 0:
        assert plan.status in (SolveStatus.OPTIMAL, SolveStatus.WITHIN_GAP) and not plan.used_fallback


@settings(max_examples=30, deadline=None)
@given(problems())
def test_plan_is_within_the_gap_of_the_exact_optimum(p):
    """A plan accepted without branch and bound (`WITHIN_GAP`) or by the MILP is within
    `mip_rel_gap` of the exact optimum's objective (solved here at a 1e-9 gap)."""
    if len(p.replicas) < 2 or not p.requests:
        return
    gap = 0.02
    plan = solve_migration(p, mip_rel_gap=gap)
    status, exact = _solve_milp(p, None, 1e-9, None)
    assert exact is not None
    layout = Layout(p)
    for m in plan.moves:
        layout.move(next(i for i, q in enumerate(p.requests) if q.id == m.request_id),
                    next(j for j, r in enumerate(p.replicas) if r.id == m.destination))
    ours, best = layout.makespan(), exact.makespan()
    assert ours <= best * (1 + gap) + 1e-3 * (len(p.requests) + 1)  # (move penalties aside)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_greedy_fallback_above_max_size_respects_every_constraint(p):
    plan = solve_migration(p, max_size=0)
    check_plan(p, plan)
    if len(p.requests) > 0:
        assert plan.status == SolveStatus.TOO_LARGE and plan.used_fallback


@settings(max_examples=15, deadline=None)
@given(problems())
def test_milp_is_never_worse_than_greedy(p):
    milp_plan = solve_migration(p, time_limit_s=10.0, mip_rel_gap=0.0)
    greedy_plan = solve_migration(p, max_size=0)
    assert milp_plan.makespan_after_s <= greedy_plan.makespan_after_s + 1e-6


def test_fallback_engages_when_solver_hits_time_limit_without_solution(monkeypatch):
    p = MigrationProblem(
        (replica(0, resident=[0]), replica(1, resident=[0])),
        tuple(request(i, 0) for i in range(4)),
        adapters(1),
    )
    monkeypatch.setattr(migration_solver, "milp", lambda *a, **k: SimpleNamespace(status=1, x=None))
    plan = solve_migration(p, time_limit_s=0.01)
    assert plan.status == SolveStatus.NO_SOLUTION and plan.used_fallback
    check_plan(p, plan)
    assert plan.makespan_after_s == pytest.approx(2.2)  # two moves, recompute 0.1 each


def test_tiny_time_limit_still_gives_a_valid_plan():
    reps = tuple(replica(j, resident=[0, 1], base=float(j)) for j in range(4))
    reqs = tuple(
        request(i, i % 2, adapter=i % 2, work=0.5 + (i * 7919 % 13) / 7) for i in range(120)
    )
    p = MigrationProblem(reps, reqs, adapters(2))
    plan = solve_migration(p, time_limit_s=1e-3)
    check_plan(p, plan)
    assert plan.makespan_after_s < plan.makespan_before_s


def test_balances_two_replicas_exactly():
    p = MigrationProblem(
        (replica(0, resident=[0]), replica(1, resident=[0])),
        tuple(request(i, 0) for i in range(4)),
        adapters(1),
    )
    plan = solve_migration(p)
    assert plan.status == SolveStatus.OPTIMAL
    assert plan.makespan_before_s == 4.0 and plan.makespan_after_s == pytest.approx(2.2)
    assert len(plan.moves) == 2 and {m.mode for m in plan.moves} == {MigrateMode.RECOMPUTE}


def test_loads_adapter_and_picks_kv_transfer_when_cheaper():
    p = MigrationProblem(
        (replica(0, resident=[0]), replica(1, resident=[])),
        tuple(request(i, 0, recompute=0.3, transfer=0.05) for i in range(4)),
        adapters(1, load_s=0.2),
    )
    plan = solve_migration(p)
    check_plan(p, plan)
    assert plan.adapter_loads == ((0, 1),)
    assert [m.mode for m in plan.moves] == [MigrateMode.TRANSFER] * 2
    assert plan.makespan_after_s == pytest.approx(2.3)  # 2 work + 0.2 load + 2 x 0.05
    acts = plan.actions()
    assert isinstance(acts[0], LoadAdapter) and all(isinstance(a, MigrateRequest) for a in acts[1:])


def test_full_slots_block_migration_unless_an_adapter_is_evictable():
    reqs = tuple(request(i, 0) for i in range(4))
    full = MigrationProblem(
        (replica(0, resident=[0]), replica(1, resident=[1], slots=1)), reqs, adapters(2)
    )
    plan = solve_migration(full)
    assert plan.moves == () and plan.makespan_after_s == plan.makespan_before_s
    freeable = MigrationProblem(
        (replica(0, resident=[0]), replica(1, resident=[1], evictable=[1], slots=1)),
        reqs,
        adapters(2),
    )
    for plan in (solve_migration(freeable), solve_migration(freeable, max_size=0)):
        check_plan(freeable, plan)
        assert plan.adapter_evictions == ((1, 1),) and plan.adapter_loads == ((0, 1),)
        assert isinstance(plan.actions()[0], DropAdapter)


def test_hard_kv_limit_keeps_requests_off_a_full_replica():
    reqs = tuple(request(i, 0, kv=10) for i in range(4))
    reps = (replica(0, resident=[0], kv=100), replica(1, resident=[0], kv=10, kv_base=5))
    hard = MigrationProblem(reps, reqs, adapters(1), kv_hard_limit=True)
    assert solve_migration(hard).moves == () and solve_migration(hard, max_size=0).moves == ()
    soft = MigrationProblem(reps, reqs, adapters(1))  # overflow priced at swap_s_per_block = 0
    assert len(solve_migration(soft).moves) == 2


def test_base_model_requests_need_no_adapter():
    p = MigrationProblem(
        (replica(0), replica(1), replica(2)),
        tuple(request(i, 0, adapter=None, work=2.0) for i in range(3)),
        (),
    )
    plan = solve_migration(p)
    check_plan(p, plan)
    assert plan.makespan_after_s == pytest.approx(2.1) and plan.adapter_loads == ()


def test_request_on_replica_without_its_adapter_is_rejected():
    with pytest.raises(ValueError, match="resident_adapters"):
        MigrationProblem((replica(0), replica(1)), (request(0, 0, adapter=0),), adapters(1))


def test_choose_replicas():
    assert choose_replicas({0: 1.0, 1: 1.05, 2: 0.98}) == ()
    assert choose_replicas({0: 10.0, 1: 1.0, 2: 5.0, 3: 5.0}) == (0, 1)
    assert choose_replicas({0: 10.0, 1: 9.0, 2: 1.0, 3: 2.0, 4: 5.5}) == (0, 1, 2, 3)
    assert choose_replicas({0: 10.0, 1: 9.0, 2: 1.0, 3: 2.0}, max_replicas=3) == (0, 1, 2)


def test_node_limit_is_deterministic_and_highs_is_silent(capfd):
    reps = tuple(replica(j, resident=[0, 1], base=float(j)) for j in range(4))
    reqs = tuple(
        request(i, i % 2, adapter=i % 2, work=0.5 + (i * 7919 % 13) / 7) for i in range(120)
    )
    p = MigrationProblem(reps, reqs, adapters(2))
    plans = [solve_migration(p, node_limit=1, mip_rel_gap=1e-6) for _ in range(2)]
    assert plans[0].status in (SolveStatus.NODE_LIMIT, SolveStatus.OPTIMAL, SolveStatus.WITHIN_GAP)
    assert [m.destination for m in plans[0].moves] == [m.destination for m in plans[1].moves]
    check_plan(p, plans[0])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_what_highs_prints_to_the_process_stdout_is_dropped(monkeypatch, capfd):
    """HiGHS prints some debugging lines straight to file descriptor 1 whatever its options
    (scipy 1.17: "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();"):
    a solve drops them, and stdout works again after it."""
    import os

    real_milp = migration_solver.milp

    def noisy_milp(*a, **k):  # type: ignore[no-untyped-def]
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        return real_milp(*a, **k)

    monkeypatch.setattr(migration_solver, "milp", noisy_milp)
    p = MigrationProblem((replica(0, resident=[0]), replica(1, resident=[0])),
                         tuple(request(i, 0) for i in range(4)), adapters(1))
    plan = solve_migration(p, time_limit_s=10.0, mip_rel_gap=0.0)
    check_plan(p, plan)
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"
