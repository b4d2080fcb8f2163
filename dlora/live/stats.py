"""Counters of a live run: the scheduler's own time against the executors', failures,
dead replicas, deferred migrations and KV transfers (report extra `live`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..types import Batch

MAX_ERRORS = 20


@dataclass(slots=True)
class LiveStats:
    iterations: int = 0
    schedule_s: float = 0.0  # inside ReplicaScheduler.schedule
    complete_s: float = 0.0  # inside ReplicaScheduler.complete
    executor_s: float = 0.0  # inside executor.execute (wall)
    scheduler_cpu_s: float = 0.0  # CPU time of schedule + complete (no waiting for the GIL)
    failed_steps: int = 0
    executor_exceptions: int = 0
    requeued_requests: int = 0
    dead_replicas: list[int] = field(default_factory=list)
    moved_from_dead: int = 0
    deferred_migrations: int = 0  # waited for their request's step to end
    dropped_migrations: int = 0  # the request's KV was still on its way
    kv_transfers: int = 0
    kv_transfer_failures: int = 0
    aborted: int = 0
    failed_requests: int = 0  # failed alone (a fault of the request, not of its replica)
    restarts: int = 0  # dead replicas rebuilt and revived
    errors: list[str] = field(default_factory=list)

    def record_failure(self, replica: int, batch: Batch, error: str, kind: str) -> None:
        self.failed_steps += 1
        self.executor_exceptions += int(kind == "raised")
        self.kv_transfer_failures += int(kind == "transfer")
        self.requeued_requests += sum(not r.is_done for r in batch.requests)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"replica {replica} step {batch.step}: {error}")

    @property
    def scheduler_s(self) -> float:
        return self.schedule_s + self.complete_s

    @property
    def iteration_s(self) -> float:
        return self.scheduler_s + self.executor_s

    @property
    def scheduler_share(self) -> float:
        """The scheduler's own wall time as a share of the iterations (scheduler + executor)."""
        return self.scheduler_s / self.iteration_s if self.iteration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        n = max(1, self.iterations)
        out["scheduler_s"] = self.scheduler_s
        out["scheduler_share"] = self.scheduler_share
        out["scheduler_cpu_share"] = self.scheduler_cpu_s / self.iteration_s if self.iteration_s > 0 else 0.0
        out["scheduler_us_per_iteration"] = 1e6 * self.scheduler_s / n
        out["scheduler_cpu_us_per_iteration"] = 1e6 * self.scheduler_cpu_s / n
        out["executor_ms_per_iteration"] = 1e3 * self.executor_s / n
        return out
