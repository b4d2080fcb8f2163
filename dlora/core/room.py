"""Room in a replica's memory pool during admission, under the admission contract
(`ReplicaScheduler` docstring; DESIGN.md section 3; PAPER.md section 3).

- Adapters are evicted in this order: adapters no request here needs (least recently used
  first), then adapters only queued requests need (fewest outstanding requests, then least
  recently used). An adapter that a running request needs, or the one this batch keeps merged,
  is never evicted during admission.
- A running request that needs its next KV block may preempt; it takes the lowest-priority
  running request (the last admitted) that this iteration has not scheduled yet, by swap or
  recompute (whichever the profile says is cheaper), and preempts itself when it is that one.
- A waiting or preempted request never preempts anyone: it is admitted only into room that
  free memory and evictable adapters give.

A mixin of `ReplicaScheduler`, kept apart for size."""

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
    running: list[Request]
    waiting: list[Request]
    merged_adapter: int | None
    outstanding: Counter[int | None]
    running_adapters: Counter[int | None]
    adapter_last_used: dict[int, int]
    eviction_lru: bool
    stats: ReplicaStats
    config: ReplicaConfig
    latency: LatencyModel
    work: WorkEstimator
    _incoming_kv: dict[int, int]
    _pending_free: list[int]

    # ---- adapters ----
    def _room_fits(self, num_bytes: int, adapter_bytes: int) -> bool:
        """Whether `num_bytes` (KV blocks plus `adapter_bytes` of a new adapter, 0 when none
        is loaded) fit now, slots and the static adapter budget included."""
        mem = self.memory
        if adapter_bytes:
            slots = mem.config.max_adapter_slots
            if slots is not None and len(mem.adapters) >= slots:
                return False
            budget = mem.config.adapter_budget_bytes
            if budget is not None and mem.adapter_bytes + adapter_bytes > budget:
                return False
        return mem.free_bytes >= num_bytes

    def _evict_until(self, num_bytes: int, adapter_bytes: int, keep: set[int], evicts: list[int]) -> bool:
        """Evict adapters (contract order) until `num_bytes` fit; evicts nothing and returns
        False when even evicting every evictable adapter would not make them fit."""
        if self._room_fits(num_bytes, adapter_bytes):
            return True
        order = self._eviction_order(keep)
        if not order or not self._fits_after(num_bytes, adapter_bytes, order):
            return False
        for a in order:
            self._evict(a, evicts)
            if self._room_fits(num_bytes, adapter_bytes):
                return True
        raise AssertionError("eviction made less room than counted")

    def _fits_after(self, num_bytes: int, adapter_bytes: int, order: list[int]) -> bool:
        """Whether the room fits once every adapter in `order` is gone (the constraints only
        loosen with each eviction, so this decides whether some prefix of `order` is enough)."""
        mem = self.memory
        freed = sum(mem.adapters[a] for a in order)
        if adapter_bytes:
            slots = mem.config.max_adapter_slots
            if slots is not None and len(mem.adapters) - len(order) >= slots:
                return False
            budget = mem.config.adapter_budget_bytes
            if budget is not None and mem.adapter_bytes - freed + adapter_bytes > budget:
                return False
        return mem.free_bytes + freed >= num_bytes

    def _eviction_order(self, keep: set[int]) -> list[int]:
        """Evictable adapters: none a running request needs, nor any in `keep`; idle ones first
        (least recently used), then those only queued requests need (fewest outstanding, then
        least recently used; the `eviction_lru` policies use recency alone)."""
        running = self.running_adapters
        out = [a for a in self.memory.adapters if a not in keep and not running[a]]
        last = self.adapter_last_used
        if self.eviction_lru:
            out.sort(key=lambda a: (self.outstanding[a] > 0, last.get(a, -1)))
        else:
            out.sort(key=lambda a: (self.outstanding[a] > 0, self.outstanding[a], last.get(a, -1)))
        return out

    def _evict(self, adapter: int, evicts: list[int]) -> None:
        self.memory.evict_adapter(adapter)
        evicts.append(adapter)
        self.stats.adapter_evictions += 1

    # ---- preemption ----
    def _victim(self, scheduled: set[int]) -> Request | None:
        """The lowest-priority running request this iteration has not scheduled."""
        for r in reversed(self.running):
            if r.id not in scheduled:
                return r
        return None

    def _preempt(self, r: Request, swap_out: list[int], swap_tokens: list[int]) -> None:
        """Take a running request off the device (swap or recompute) and put it at the front
        of the waiting queue."""
        mem = self.memory
        self._incoming_kv.pop(r.id, None)
        mode = choose_preempt_mode(self.config.preemption, r, mem, self.latency)
        r.num_preemptions += 1
        self._leave_running(r)
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
        self.waiting.insert(0, r)

    def _leave_running(self, r: Request) -> None:
        self.running.remove(r)
        self.running_adapters[r.adapter_id] -= 1
