"""Making room in a replica's memory pool during admission (PAPER.md section 3).

In order: adapters nobody is waiting for; requests outside the plan that hold KV (latest
arrival first), preempted by swap or recompute, whichever the profile says is cheaper; adapters
this batch does not need (fewest outstanding requests, then least recently used); and last,
later entries of the plan itself. A mixin of `ReplicaScheduler`, kept apart for size."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ..types import PreemptMode, Request, RequestStatus
from .preemption import choose_preempt_mode

if TYPE_CHECKING:
    from ..profile import LatencyModel
    from .memory import MemoryPool
    from .replica import ReplicaConfig
    from .stats import ReplicaStats
    from .work import WorkEstimator


class RoomMaker:
    memory: MemoryPool
    unfinished: list[Request]
    merged_adapter: int | None
    outstanding: Counter[int | None]
    adapter_last_used: dict[int, int]
    eviction_lru: bool
    stats: ReplicaStats
    config: ReplicaConfig
    latency: LatencyModel
    work: WorkEstimator
    _incoming_kv: dict[int, int]
    _pending_free: list[int]

    def _make_room(
        self, num_bytes: int, needs_slot: bool, protect: set[int], in_plan: set[int],
        candidates: list[Request], next_index: int, needed_adapters: set[int],
        evicts: list[int], swap_out: list[int], swap_tokens: list[int],
    ) -> bool:
        mem = self.memory
        slots = mem.config.max_adapter_slots

        def enough() -> bool:
            if needs_slot and slots is not None and len(mem.adapters) >= slots:
                return False
            budget = mem.config.adapter_budget_bytes
            if needs_slot and budget is not None and mem.adapter_bytes + num_bytes > budget:
                return False
            return mem.free_bytes >= num_bytes

        if enough():
            return True
        # 1. adapters nobody here is waiting for
        for a in self._eviction_order(needed_adapters, idle_only=True):
            self._evict(a, evicts)
            if enough():
                return True
        # 2. requests outside the plan holding KV, latest arrival first
        if not needs_slot or mem.free_bytes < num_bytes:
            for r in reversed(self.unfinished):
                if r.id in in_plan or r.id in protect or r.status != RequestStatus.RUNNING:
                    continue
                self._preempt(r, swap_out, swap_tokens)
                if enough():
                    return True
        # 3. adapters not needed by this batch, fewest outstanding requests first (LRU on ties)
        for a in self._eviction_order(needed_adapters, idle_only=False):
            self._evict(a, evicts)
            if enough():
                return True
        # 4. later entries of the plan, from the back
        for j in range(len(candidates) - 1, next_index - 1, -1):
            r = candidates[j]
            if r.status == RequestStatus.RUNNING and r.id not in protect:
                self._preempt(r, swap_out, swap_tokens)
                del candidates[j]
                in_plan.discard(r.id)
                if enough():
                    return True
        return False

    def _eviction_order(self, needed: set[int], idle_only: bool) -> list[int]:
        # the merged adapter may go too unless this batch keeps it merged (then it is in `needed`):
        # the executor unmerges before it evicts
        out = [a for a in self.memory.adapters if a not in needed]
        if idle_only:
            out = [a for a in out if self.outstanding[a] == 0]
        if self.eviction_lru:
            out.sort(key=lambda a: self.adapter_last_used.get(a, -1))
        else:
            out.sort(key=lambda a: (self.outstanding[a], self.adapter_last_used.get(a, -1)))
        return out

    def _evict(self, adapter: int, evicts: list[int]) -> None:
        self.memory.evict_adapter(adapter)
        evicts.append(adapter)
        self.stats.adapter_evictions += 1

    def _preempt(self, r: Request, swap_out: list[int], swap_tokens: list[int]) -> None:
        mem = self.memory
        self._incoming_kv.pop(r.id, None)
        mode = choose_preempt_mode(self.config.preemption, r, mem, self.latency)
        r.num_preemptions += 1
        if mode == PreemptMode.SWAP:
            mem.swap_out(r.id)
            r.status = RequestStatus.SWAPPED
            swap_out.append(r.id)
            swap_tokens[0] += r.computed_tokens
            self.stats.swaps += 1
        else:
            mem.release(r.id)
            self.work.remove(r)
            r.computed_tokens = 0
            self.work.add(r)
            r.status = RequestStatus.WAITING
            self._pending_free.append(r.id)
            self.stats.recomputes += 1

