"""Immutable per-request and per-replica snapshots for migrators (PAPER.md section 5).

`ClusterView` is cheap and built at every arrival; a `MigrationView` adds one `RequestSnapshot`
per unfinished request and each replica's memory limits, and is built only when a migrator has
decided to look (`Cluster.migration_view`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..types import RequestStatus
from ..views import ClusterView


class RequestSnapshot(NamedTuple):
    """One unfinished request as a migrator sees it (a named tuple: immutable, and built for
    every unfinished request at every migration check, several times cheaper than a frozen
    dataclass)."""

    id: int
    adapter_id: int | None
    replica: int
    status: RequestStatus
    arrival_s: float
    prompt_tokens: int
    generated_tokens: int
    computed_tokens: int  # KV tokens on the device, in swap, or arriving by transfer
    kv_blocks: int  # device blocks held now
    work_s: float  # estimated remaining seconds (shared expected output length)

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True, slots=True)
class ReplicaMemory:
    block_tokens: int
    block_bytes: int
    total_blocks: int  # blocks with no adapter resident
    max_adapter_slots: int | None
    adapter_budget_bytes: int | None  # static split; None: unified pool
    capacity_bytes: int


@dataclass(frozen=True, slots=True)
class MigrationView:
    cluster: ClusterView
    # per replica, FCFS order (a cluster builds a replica's on first read: `LazySnapshots`)
    requests: Sequence[tuple[RequestSnapshot, ...]]
    memory: tuple[ReplicaMemory, ...]  # per replica
    mean_output_tokens: float
    # replica -> the sum of its requests' `work_s` in FCFS order, without their snapshots
    work_index: Callable[[int], float] | None = None

    def work_s(self, replica: int) -> float:
        """The sum of the replica's requests' `work_s`, in FCFS order (a migrator weighs every
        replica by it and reads the requests of the few it chooses)."""
        if self.work_index is not None:
            return self.work_index(replica)
        return sum(q.work_s for q in self.requests[replica])
