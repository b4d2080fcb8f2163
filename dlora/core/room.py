"""Room in a replica's memory pool during admission, under the admission contract
(`admission.py`'s docstring; DESIGN.md section 3; PAPER.md section 3).

- Adapters are evicted in this order: adapters no request here needs (least recently used
  first), then adapters only queued requests need (fewest outstanding requests, then least
  recently used). An adapter that a running request needs, or the one this batch keeps merged,
  is never evicted during admission.
- A running request that needs its next KV block may preempt; it takes the lowest-priority
  running request (the last admitted) that this iteration has not scheduled yet, by swap or
  recompute (whichever the profile says is cheaper), and preempts itself when it is that one.
- A waiting or preempted request never preempts anyone: it is admitted only into room that
  free memory and evictable adapters give.
- Prefix caching: a new or recomputed request's cached leading blocks (`prefix.py`) are room it
  claims instead of computing; blocks that became full are registered after each step.
- S-LoRA's admission (`reserve_output`): room for the whole output of every admitted request.

A mixin of `ReplicaScheduler`, kept apart for size."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from ..types import PreemptMode, Request, RequestStatus
from .preemption import choose_preempt_mode
from .prefix import BlockRun, block_hash_run

if TYPE_CHECKING:
    from ..latency import LatencyModel
    from .batching import PolicyTraits
    from .context import ReplicaConfig
    from .memory import MemoryPool
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
    traits: PolicyTraits
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

    def _evict_until(self, num_bytes: int, adapter_bytes: int, keep: set[int], evicts: list[int],
                     adapter: int | None = None) -> bool:
        """Evict adapters (contract order, never those in `keep` nor `adapter`) until `num_bytes`
        fit; evicts nothing and returns False when even evicting every evictable adapter would
        not make them fit."""
        if self._room_fits(num_bytes, adapter_bytes):
            return True
        order = self._eviction_order(keep if adapter is None else keep | {adapter})
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
        if self.traits.eviction_lru:
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

    # ---- prefix caching (memory.py, prefix.py) ----
    def _hashes_of(self, r: Request, tokens: int) -> BlockRun:
        """Hashes of the full blocks of the request's first `tokens` context tokens."""
        return block_hash_run(r, self.memory.block_tokens, tokens)

    def _prefix_hits(self, r: Request) -> tuple[Sequence[Hashable], int]:
        """The cached leading blocks of a request's context (at least one token is left to
        compute, as vLLM does) and how many of them are unheld (they take free room)."""
        hashes = self._hashes_of(r, r.prompt_tokens + r.generated_tokens - 1)
        n, _ = self.memory.cached_prefix_blocks(hashes)
        if n <= 0:
            return (), 0
        hits = hashes[:n]
        return hits, self.memory.cached_prefix_blocks(hits)[1]

    def register_blocks(self, r: Request, computed_before: int, computed_after: int | None = None) -> None:
        """After a step took the request's computed tokens from `computed_before` to
        `computed_after` (default: its computed tokens now): share the blocks that became full.
        `complete` calls it for every item; the simulator's fast path for each iteration it
        applies, before the next one allocates (so both reclaim cached blocks alike)."""
        bt = self.memory.block_tokens
        full = (r.computed_tokens if computed_after is None else computed_after) // bt
        if full > computed_before // bt:
            if r.prompt_token_ids is None and self.memory.extend_own(r.id, full):
                return  # (a simulated request's blocks after its prefix group's are its own)
            start = self.memory.next_unshared(r.id)
            if start < full:
                self.memory.register(r.id, block_hash_run(r, bt, full * bt, start), start)

    def _evictable_bytes(self, keep: set[int], adapter: int | None = None) -> int:
        order = self._eviction_order(keep if adapter is None else keep | {adapter})
        return sum(self.memory.adapters[a] for a in order)

    # ---- S-LoRA admission (reserve_output) ----
    def _reserved_tokens(self) -> list[tuple[int, int]]:
        """(tokens now, output tokens still to come) of every running request."""
        return [(r.prompt_tokens + r.generated_tokens, r.remaining_output_tokens) for r in self.running]

    def _reservation_fits(self, r: Request, reserved: list[tuple[int, int]], adapter_bytes: int) -> bool:
        """S-LoRA's check: with the running requests and `r` sorted by output still to come
        (longest first), the KV they hold when the j-th of them finishes (the first j all
        still alive, each grown by the j-th's remaining output) fits the pool at every j, with
        a block of rounding per request. Idle adapters count as free (they can be evicted)."""
        if not reserved:
            return True  # the first request always fits (checked at add)
        mem = self.memory
        cand = sorted([*reserved, (r.prompt_tokens + r.generated_tokens, r.remaining_output_tokens)],
                      key=lambda x: -x[1])
        idle = sum(b for a, b in mem.adapters.items() if not self.running_adapters[a] and a != r.adapter_id)
        kv_bytes = mem.capacity_bytes - (mem.adapter_bytes - idle) - adapter_bytes
        capacity_tokens = (kv_bytes // mem.block_bytes - len(cand)) * mem.block_tokens
        total = 0
        for j, (now_tokens, left) in enumerate(cand):
            total += now_tokens
            if total + left * (j + 1) > capacity_tokens:
                return False
        return True
