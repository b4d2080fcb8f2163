"""What a replica shows the cluster: its `ReplicaView` (per arrival), per-request snapshots and
memory limits (for migrators) and the report's summary. A mixin of
`ReplicaScheduler`, kept apart for size; it reads the scheduler's state and changes nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from ..types import Request
from ..views import ReplicaView
from .snapshot import ReplicaMemory, RequestSnapshot

if TYPE_CHECKING:
    from .batching import BatchPolicy
    from .memory import MemoryPool
    from .stats import ReplicaStats
    from .work import WorkEstimator


# FCFS order: (arrival_s, id) of a request (an attrgetter: the sort key of every snapshot)
fcfs_key: Callable[[Request], tuple[float, int]] = attrgetter("arrival_s", "id")


class ReplicaViews:
    id: int
    is_alive: bool
    running: list[Request]
    waiting: list[Request]
    memory: MemoryPool
    merged_adapter: int | None
    outstanding: Counter[int | None]
    work: WorkEstimator
    stats: ReplicaStats
    policy: BatchPolicy
    _rpa: tuple[tuple[int | None, int], ...] | None
    _queue_counts: tuple[tuple[tuple[int | None, int], ...], Counter[int | None]] | None

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def unfinished(self) -> list[Request]:
        """Every request here in priority order: running (admission order), then waiting."""
        return self.running + self.waiting

    def view(self, now: float, pending_tokens: int = 0,
             pending_blocks: Callable[[], int] | None = None) -> ReplicaView:
        """The replica as decisions see it at `now`. `pending_tokens` / `pending_blocks()`:
        output tokens and KV blocks of decode iterations that the driver has not applied yet
        but that ran (or are in flight) by `now` (the simulator's fast path): the view is the
        one the replica will show once they are applied, without applying them. The blocks
        are counted only if a decision reads the view's KV fields (`ReplicaView.deferred`)."""
        # a request holds device KV blocks iff it is RUNNING, host blocks iff SWAPPED
        mem = self.memory
        running = len(self.running)
        swapped = len(mem.swapped_blocks)
        waiting = len(self.waiting) - swapped
        slots = mem.config.max_adapter_slots
        used = mem.kv_used_blocks
        cap, block, adapter_bytes = mem.capacity_bytes, mem.block_bytes, mem.adapter_bytes

        def kv() -> tuple[int, int]:  # from values taken now (a pure function)
            u = used + pending_blocks() if pending_blocks is not None else used
            return u, u + (cap - u * block - adapter_bytes) // block

        queued_s, backlog_s = self.work.drain_s(running + waiting + swapped, pending_tokens)
        return ReplicaView.deferred(
            (self.id, self.is_alive, waiting, running, swapped, mem.resident,
             self.merged_adapter, queued_s, self._requests_per_adapter(),
             (slots - len(mem.adapters)) if slots is not None else 1 << 30, backlog_s), kv)

    def _requests_per_adapter(self) -> tuple[tuple[int | None, int], ...]:
        """(adapter, unfinished requests) sorted by adapter (None last); cached until a request
        is added or leaves."""
        if self._rpa is None:
            self._rpa = tuple(sorted(((a, n) for a, n in self.outstanding.items() if n > 0),
                                     key=lambda x: (x[0] is None, x[0] or 0)))
        return self._rpa

    def queue_counts(self) -> Counter[int | None]:
        """Unfinished requests per adapter, positive counts only (`QueueView.counts`); the same
        object until a request is added or leaves (read-only)."""
        rpa = self._requests_per_adapter()
        cached = self._queue_counts
        if cached is None or cached[0] is not rpa:
            cached = self._queue_counts = (rpa, Counter(dict(rpa)))
        return cached[1]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats.as_dict())
        out["policy"] = self.policy.stats()
        return out

    # ---- snapshots for migrators (issue 4) ----
    def request_snapshots(self) -> tuple[RequestSnapshot, ...]:
        """Immutable per-request state of every unfinished request here (arrival order)."""
        out = []
        kv, swapped = self.memory.kv_blocks, self.memory.swapped_blocks
        reqs = sorted(self.unfinished, key=fcfs_key)
        for r, work_s in zip(reqs, self.work.seconds_for_each(reqs), strict=True):
            rid = r.id
            held = kv.get(rid, 0) or swapped.get(rid, 0)  # (`MemoryPool.held`, inlined)
            out.append(RequestSnapshot(
                rid, r.adapter_id, self.id, r.status, r.arrival_s, r.prompt_tokens,
                r.generated_tokens, r.computed_tokens, held, work_s))
        return tuple(out)

    def total_work_s(self) -> float:
        """The sum of `request_snapshots()`' `work_s`, in the same order, without building them."""
        return sum(self.work.seconds_for_each(sorted(self.unfinished, key=fcfs_key)))

    def memory_limits(self) -> ReplicaMemory:
        c = self.memory.config
        return ReplicaMemory(c.block_tokens, c.block_bytes, self.memory.total_blocks,
                             c.max_adapter_slots, c.adapter_budget_bytes, c.capacity_bytes)
