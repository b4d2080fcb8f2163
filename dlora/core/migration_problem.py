"""The co-migration problem and its answer, as values (PAPER.md section 5): the replicas
involved (`ReplicaState`), the requests that may move (`CandidateRequest`), the adapters
(`AdapterCost`), the instance (`MigrationProblem`) and the plan (`Move`, `MigrationPlan`,
`SolveStatus`). `migration_solver` solves it (MILP, greedy fallback in `migration_greedy`);
`migration_dlora` builds it from the cluster. Pure values: no solver, no clock."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..types import MigrateMode
from ..views import Action, DropAdapter, LoadAdapter, MigrateRequest


@dataclass(frozen=True, slots=True)
class ReplicaState:
    id: int
    base_work_s: float  # estimated work of the requests NOT in the problem
    kv_blocks_total: int
    kv_blocks_base: int  # blocks held by requests not in the problem
    max_adapters: int  # adapter slots
    adapter_memory_bytes: int
    resident_adapters: frozenset[int]
    evictable_adapters: frozenset[int] = frozenset()  # resident, needed by no outside request
    swap_s_per_block: float = 0.0  # seconds per KV block over capacity (swap out and back in)


@dataclass(frozen=True, slots=True)
class CandidateRequest:
    id: int
    adapter: int | None  # None: base model, needs no adapter
    replica: int  # where it is now
    work_s: float  # estimated remaining work (the same on every replica)
    kv_blocks: int  # blocks it holds (or will need) wherever it runs
    recompute_s: float  # re-prefill prompt + generated tokens at a destination
    transfer_s: float  # move its KV over the link instead


@dataclass(frozen=True, slots=True)
class AdapterCost:
    id: int
    size_bytes: int
    load_s: float  # host -> device load time


@dataclass(frozen=True, slots=True)
class MigrationProblem:
    replicas: tuple[ReplicaState, ...]
    requests: tuple[CandidateRequest, ...]
    adapters: tuple[AdapterCost, ...]  # every candidate's and every resident adapter
    kv_hard_limit: bool = False  # True: no replica's KV overflow may grow
    move_penalty_s: float = 1e-3  # per migration, so pointless moves are avoided
    load_penalty_s: float = 1e-4  # per adapter load, on top of its load time

    def __post_init__(self) -> None:
        rids = {r.id for r in self.replicas}
        kids = {a.id for a in self.adapters}
        if len(rids) != len(self.replicas) or len(kids) != len(self.adapters):
            raise ValueError("replica and adapter ids must be unique")
        if len({q.id for q in self.requests}) != len(self.requests):
            raise ValueError("request ids must be unique")
        for r in self.replicas:
            if not r.resident_adapters <= kids:
                raise ValueError(f"replica {r.id}: resident adapters missing from `adapters`")
            if not r.evictable_adapters <= r.resident_adapters:
                raise ValueError(f"replica {r.id}: evictable adapters must be resident")
        by_id = {r.id: r for r in self.replicas}
        for q in self.requests:
            if q.replica not in rids:
                raise ValueError(f"request {q.id}: replica {q.replica} is not in the problem")
            if q.adapter is not None and q.adapter not in by_id[q.replica].resident_adapters:
                raise ValueError(
                    f"request {q.id}: adapter {q.adapter} is not resident on its replica "
                    f"{q.replica}; list it in resident_adapters"
                )

    def migration_cost(self, request: CandidateRequest, replica: int) -> tuple[float, MigrateMode]:
        """Seconds and mode of running `request` on `replica` (0 at its own replica)."""
        if replica == request.replica:
            return 0.0, MigrateMode.RECOMPUTE
        if request.transfer_s < request.recompute_s:
            return request.transfer_s, MigrateMode.TRANSFER
        return request.recompute_s, MigrateMode.RECOMPUTE


class SolveStatus(StrEnum):
    OPTIMAL = "optimal"
    NODE_LIMIT = "node_limit"  # stopped at the node limit with a feasible solution (deterministic)
    TIME_LIMIT = "time_limit"  # stopped at the opt-in wall-clock limit with one (machine-dependent)
    NO_SOLUTION = "no_solution"  # stopped at a limit without one
    FAILED = "failed"  # solver reported infeasible / error (should not happen)
    TOO_LARGE = "too_large"  # above max_size: solver skipped
    TRIVIAL = "trivial"  # fewer than two replicas or no candidates
    WITHIN_GAP = "within_gap"  # a local-search plan proven within mip_rel_gap by the LP bound


@dataclass(frozen=True, slots=True)
class Move:
    request_id: int
    source: int
    destination: int
    mode: MigrateMode
    cost_s: float


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    moves: tuple[Move, ...]
    adapter_loads: tuple[tuple[int, int], ...]  # (adapter, replica)
    adapter_evictions: tuple[tuple[int, int], ...]  # (adapter, replica)
    makespan_before_s: float
    makespan_after_s: float
    status: SolveStatus
    used_fallback: bool
    solve_s: float  # wall seconds spent in the solver and the fallback

    def actions(self) -> list[Action]:
        """Evictions, then loads, then migrations, as cluster actions."""
        out: list[Action] = [DropAdapter(r, k) for k, r in self.adapter_evictions]
        out += [LoadAdapter(r, k) for k, r in self.adapter_loads]
        out += [MigrateRequest(m.request_id, m.source, m.destination, m.mode) for m in self.moves]
        return out
