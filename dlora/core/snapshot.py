"""Immutable per-request and per-replica snapshots for migrators (PAPER.md section 5).

`ClusterView` is cheap and built at every arrival; a `MigrationView` adds one `RequestSnapshot`
per unfinished request and each replica's memory limits, and is built only when a migrator has
decided to look (`Cluster.migration_view`).
"""

from __future__ import annotations

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
    requests: tuple[tuple[RequestSnapshot, ...], ...]  # per replica, FCFS order
    memory: tuple[ReplicaMemory, ...]  # per replica
    mean_output_tokens: float
