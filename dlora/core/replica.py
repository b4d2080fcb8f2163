"""ReplicaScheduler: one replica's queue, admission and memory, iteration by iteration.

`schedule(now)` asks the batching policy for a plan, admits its requests subject to the batch
caps (sequences, tokens; prefill is chunked to fit the token cap) and the memory pool (loading
adapters, evicting idle ones, preempting lower-priority requests by swap or recompute), and
returns a frozen `Batch`. `complete(batch, result, now)` advances token counters, finishes
requests and feeds the policy. No clock is read: `now` is always an argument.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..profile import LatencyModel
from ..types import (
    Adapter,
    Batch,
    BatchItem,
    BatchMode,
    ReplicaView,
    Request,
    RequestStatus,
    StepResult,
)
from .batching import BatchPolicy, Plan, QueueView
from .memory import MemoryPool
from .room import RoomMaker
from .snapshot import ReplicaMemory, RequestSnapshot
from .stats import ReplicaStats
from .work import WorkEstimator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    max_batch_size: int = 16
    max_batched_tokens: int = 4096
    preemption: str = "auto"  # recompute | swap | auto (cheaper by the profile's estimate)


class AdmissionError(Exception):
    """A request can never fit this replica (raised at `add`)."""


def _fcfs_key(r: Request) -> tuple[float, int]:
    return (r.arrival_s, r.id)


class ReplicaScheduler(RoomMaker):
    def __init__(
        self,
        replica_id: int,
        config: ReplicaConfig,
        memory: MemoryPool,
        policy: BatchPolicy,
        latency: LatencyModel,
        adapters: dict[int, Adapter],
        work: WorkEstimator | None = None,
    ) -> None:
        self.id = replica_id
        self.config = config
        # optional policy hooks (baselines.py): memory layout, adapter sizes, switch and
        # eviction rules of the system the policy models
        shape_memory = getattr(policy, "memory_config", None)
        if shape_memory is not None:
            memory = MemoryPool(shape_memory(memory.config))
        size_of = getattr(policy, "adapter_size_bytes", None)
        if size_of is not None:
            adapters = {i: dataclasses.replace(a, size_bytes=size_of(a)) for i, a in adapters.items()}
        self.switch_free: bool = getattr(policy, "switch_free", False)
        self.eviction_lru: bool = getattr(policy, "eviction_lru", False)
        self.memory = memory
        self.policy = policy
        self.latency = latency
        self.adapters = adapters
        self.work = work or WorkEstimator(latency, config.max_batch_size)
        self.unfinished: list[Request] = []  # FCFS order
        self._keys: list[tuple[float, int]] = []
        self.merged_adapter: int | None = None
        self.step = 0
        self.is_alive = True
        self.outstanding: Counter[int | None] = Counter()
        self.adapter_last_used: dict[int, int] = {}
        self.stats = ReplicaStats()
        self._pending_free: list[int] = []
        self._rpa: tuple[tuple[int | None, int], ...] | None = None
        self._pending_loads: list[int] = []
        self._pending_evicts: list[int] = []
        self._incoming_kv: dict[int, int] = {}  # request id -> KV tokens arriving by transfer

    # ---- queue ----
    def check_fits(self, request: Request) -> None:
        """Raise AdmissionError if the request could never run here."""
        need_tokens = request.prompt_tokens + request.output_tokens
        adapter_bytes = 0
        if request.adapter_id is not None:
            adapter_bytes = self.adapters[request.adapter_id].size_bytes
        need = self.memory.blocks_for(need_tokens) * self.memory.block_bytes + adapter_bytes
        if need > self.memory.capacity_bytes:
            raise AdmissionError(
                f"request {request.id} needs {need_tokens} tokens of KV cache plus its adapter, "
                f"more than replica {self.id} can hold ({self.memory.total_blocks} blocks of "
                f"{self.memory.block_tokens} tokens)"
            )

    def add(self, request: Request, now: float) -> None:
        self.check_fits(request)
        request.replica = self.id
        if request.status == RequestStatus.PENDING:
            request.status = RequestStatus.WAITING
        if request.dispatch_s is None:
            request.dispatch_s = now
        key = _fcfs_key(request)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self.unfinished.insert(i, request)
        self.outstanding[request.adapter_id] += 1
        self._rpa = None
        self.work.add(request)

    def remove(self, request: Request) -> None:
        """Take an unfinished request off this replica (migration, abort), freeing its memory."""
        i = bisect.bisect_left(self._keys, _fcfs_key(request))
        assert self.unfinished[i] is request
        del self.unfinished[i]
        del self._keys[i]
        self.outstanding[request.adapter_id] -= 1
        self._rpa = None
        self.work.remove(request)
        if self.memory.release(request.id) or self.memory.drop_swapped(request.id):
            self._pending_free.append(request.id)
        self._incoming_kv.pop(request.id, None)

    def expect_transfer(self, request: Request, kv_tokens: int) -> None:
        """The request's KV (`kv_tokens`) is copied here from its old replica; it is charged
        in the batch that admits it."""
        self.work.remove(request)
        request.computed_tokens = kv_tokens
        self.work.add(request)
        self._incoming_kv[request.id] = kv_tokens

    def prefetch_adapter(self, adapter: int) -> bool:
        """Load an adapter ahead of demand (placement); only into free room."""
        size = self.adapters[adapter].size_bytes
        if self.memory.is_resident(adapter) or not self.memory.adapter_fits(size):
            return False
        self.memory.load_adapter(adapter, size)
        self._pending_loads.append(adapter)
        self.adapter_last_used.setdefault(adapter, self.step)
        return True

    def drop_adapter(self, adapter: int) -> bool:
        """Evict an adapter placement no longer wants here, unless it is merged or in use."""
        if not self.memory.is_resident(adapter) or adapter == self.merged_adapter or self.outstanding[adapter]:
            return False
        self._evict(adapter, self._pending_evicts)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.unfinished)

    # ---- one iteration ----
    def schedule(self, now: float) -> Batch | None:
        """Plan with the policy, admit in priority order, return the batch (None when idle).

        Admission walks the plan: each request needs its uncomputed tokens (chunked to the
        token cap), KV blocks for them and, unmerged, its adapter resident. Room comes from
        free memory, then idle adapters, then preempting requests outside the plan (latest
        arrival first), then adapters not needed now, then later plan entries."""
        if not self.unfinished:
            return None
        queue = QueueView(self.unfinished, self.merged_adapter, self.config.max_batch_size, self.step)
        plan = self.policy.plan(queue, now)
        return self._admit(plan, now)

    def _admit(self, plan: Plan, now: float) -> Batch:
        mem = self.memory
        candidates = list(plan.requests)
        in_plan = {r.id for r in candidates}
        admitted: list[Request] = []
        items: list[BatchItem] = []
        needed_adapters: set[int] = set()
        if plan.mode == BatchMode.MERGED and plan.merged_adapter is not None:
            needed_adapters.add(plan.merged_adapter)
        loads: list[int] = self._pending_loads
        evicts: list[int] = self._pending_evicts
        self._pending_loads, self._pending_evicts = [], []
        transfer_in: list[int] = []
        transfer_tokens = 0
        swap_in: list[int] = []
        swap_out: list[int] = []
        swap_tokens = [0, 0]  # out, in
        tokens_left = self.config.max_batched_tokens
        protect: set[int] = set()  # admitted requests (never preempted for later ones)
        block_tokens, block_bytes, kv_blocks = mem.block_tokens, mem.block_bytes, mem.kv_blocks
        resident = mem.adapters
        free_bytes = mem.free_bytes  # kept in step with allocations below (hot path)
        i = 0
        while i < len(candidates) and tokens_left > 0:
            r = candidates[i]
            i += 1
            computed = r.computed_tokens
            new = r.prompt_tokens + r.generated_tokens - computed
            if new > tokens_left:
                new = tokens_left
            held = 0 if r.status == RequestStatus.SWAPPED else kv_blocks.get(r.id, 0)
            blocks = -(-(computed + new) // block_tokens) - held
            adapter = r.adapter_id
            adapter_bytes = 0
            if adapter is not None and adapter not in resident:
                adapter_bytes = self.adapters[adapter].size_bytes
            need_bytes = blocks * block_bytes + adapter_bytes
            fits = free_bytes >= need_bytes and (not adapter_bytes or mem.adapter_fits(adapter_bytes))
            if not fits:
                protect.add(r.id)
                needed_now = needed_adapters | ({adapter} if adapter is not None else set())
                ok = self._make_room(need_bytes, adapter_bytes > 0, protect, in_plan, candidates, i,
                                     needed_now, evicts, swap_out, swap_tokens)
                free_bytes = mem.free_bytes
                if not ok:
                    protect.discard(r.id)
                    continue
            if adapter_bytes:
                mem.load_adapter(adapter, adapter_bytes)  # type: ignore[arg-type]
                loads.append(adapter)  # type: ignore[arg-type]
            if adapter is not None:
                needed_adapters.add(adapter)
                self.adapter_last_used[adapter] = self.step
            if r.id in self._incoming_kv:
                transfer_tokens += self._incoming_kv.pop(r.id)
                transfer_in.append(r.id)
            if r.status == RequestStatus.SWAPPED:
                mem.swap_in(r.id)
                swap_in.append(r.id)
                swap_tokens[1] += r.computed_tokens
                blocks = mem.blocks_for(r.computed_tokens + new) - mem.held(r.id)
            if blocks:
                mem.allocate(r.id, blocks)
            if blocks or adapter_bytes or swap_in:
                free_bytes = mem.free_bytes
            r.status = RequestStatus.RUNNING
            protect.add(r.id)
            if r.first_scheduled_s is None:
                r.first_scheduled_s = now
            admitted.append(r)
            items.append(BatchItem(r.id, adapter, computed, new,
                                   computed + new == r.prompt_tokens + r.generated_tokens))
            tokens_left -= new
        assert admitted, "the first planned request always fits (checked at add)"
        merge = unmerge = None
        target = plan.merged_adapter if plan.mode == BatchMode.MERGED else None
        if target != self.merged_adapter:
            if not self.switch_free:
                unmerge, merge = self.merged_adapter, target
            self.merged_adapter = target
        load_bytes = sum(self.adapters[a].size_bytes for a in loads)
        free = tuple(self._pending_free)
        self._pending_free.clear()
        batch = Batch(
            replica=self.id, step=self.step, mode=plan.mode, merged_adapter=plan.merged_adapter if plan.mode == BatchMode.MERGED else None,
            items=tuple(items), requests=tuple(admitted), merge_adapter=merge, unmerge_adapter=unmerge,
            load_adapters=tuple(loads), evict_adapters=tuple(evicts), swap_out=tuple(swap_out),
            swap_in=tuple(swap_in), swap_out_tokens=swap_tokens[0], swap_in_tokens=swap_tokens[1],
            free_requests=free, transfer_in=tuple(transfer_in), transfer_in_tokens=transfer_tokens,
            load_bytes=load_bytes, forced_by_credit=plan.forced_by_credit,
        )
        self.step += 1
        return batch

    def complete(self, batch: Batch, result: StepResult, now: float) -> list[Request]:
        """Apply a finished step: token counters, first tokens, finishes, policy feedback."""
        self.stats.record_step(batch, result)
        if result.error is not None:
            self._requeue(batch, result.error)
            return []
        finished: list[Request] = []
        token_ids = iter(result.token_ids) if result.token_ids is not None else None
        eos_flags = iter(result.eos) if result.eos is not None else None
        for item, r in zip(batch.items, batch.requests, strict=True):
            r.executing_s += result.elapsed_s
            self.work.remove(r)
            r.computed_tokens += item.new_tokens
            if item.samples:
                r.generated_tokens += 1
                if r.first_token_s is None:
                    r.first_token_s = now
                is_eos = False
                if token_ids is not None:
                    r.output_token_ids.append(next(token_ids))
                if eos_flags is not None:
                    is_eos = next(eos_flags)
                if is_eos or r.generated_tokens >= r.output_tokens:
                    r.finish_reason = "length" if r.generated_tokens >= r.output_tokens else "stop"
                    finished.append(r)
                    continue
            self.work.add(r)
        for r in finished:
            self._finish(r, now)
        self.policy.observe(batch, result)
        return finished

    def _finish(self, r: Request, now: float, status: RequestStatus = RequestStatus.FINISHED) -> None:
        i = bisect.bisect_left(self._keys, _fcfs_key(r))
        assert self.unfinished[i] is r
        del self.unfinished[i]
        del self._keys[i]
        self.outstanding[r.adapter_id] -= 1
        self._rpa = None
        self.memory.release(r.id)
        self.memory.drop_swapped(r.id)
        self._pending_free.append(r.id)
        r.status = status
        r.finish_s = now
        self.stats.finished += 1

    def abort(self, r: Request, now: float) -> None:
        """Cancel an unfinished request (client gone); frees its memory."""
        if r.is_done:
            return
        self.work.remove(r)
        self._finish(r, now, RequestStatus.ABORTED)
        r.finish_reason = "abort"

    def _requeue(self, batch: Batch, error: str) -> None:
        log.warning("replica %d step %d failed (%s); requeueing %d requests", self.id, batch.step, error, len(batch.requests))
        for r in batch.requests:
            if r.is_done:
                continue
            self.memory.release(r.id)
            self.work.remove(r)
            r.computed_tokens = 0
            r.status = RequestStatus.WAITING
            self.work.add(r)
            self._pending_free.append(r.id)
        # the device state is unknown after a failure: assume clean weights, reload adapters
        self.merged_adapter = None
        for a in list(self.memory.adapters):
            self.memory.evict_adapter(a)

    # ---- views ----
    def view(self, now: float) -> ReplicaView:
        # a request holds device KV blocks iff it is RUNNING, host blocks iff SWAPPED
        running = len(self.memory.kv_blocks)
        swapped = len(self.memory.swapped_blocks)
        waiting = len(self.unfinished) - running - swapped
        slots = self.memory.config.max_adapter_slots
        return ReplicaView(
            id=self.id, is_alive=self.is_alive, num_waiting=waiting, num_running=running,
            num_swapped=swapped, kv_blocks_used=self.memory.kv_used_blocks,
            kv_blocks_total=self.memory.kv_capacity_blocks,
            resident_adapters=frozenset(self.memory.adapters), merged_adapter=self.merged_adapter,
            queued_work_s=self.work.seconds(len(self.unfinished)),
            requests_per_adapter=self._requests_per_adapter(),
            backlog_s=self.backlog_s(),
            adapter_slots_free=(slots - len(self.memory.adapters)) if slots is not None else 1 << 30,
        )

    def _requests_per_adapter(self) -> tuple[tuple[int | None, int], ...]:
        """(adapter, unfinished requests) sorted by adapter (None last); cached until a request
        is added or leaves."""
        if self._rpa is None:
            self._rpa = tuple(sorted(((a, n) for a, n in self.outstanding.items() if n > 0),
                                     key=lambda x: (x[0] is None, x[0] or 0)))
        return self._rpa

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats.as_dict())
        out["policy"] = self.policy.stats()
        return out

    # ---- snapshots for migrators (issue 4) ----
    def request_snapshots(self) -> tuple[RequestSnapshot, ...]:
        """Immutable per-request state of every unfinished request here (FCFS order)."""
        out = []
        for r in self.unfinished:
            held = self.memory.held(r.id) or self.memory.swapped_blocks.get(r.id, 0)
            out.append(RequestSnapshot(
                r.id, r.adapter_id, self.id, r.status, r.arrival_s, r.prompt_tokens,
                r.generated_tokens, r.computed_tokens, held, self.work.seconds_for(r)))
        return tuple(out)

    def backlog_s(self) -> float:
        """Seconds to drain at full-batch throughput (`ReplicaView.backlog_s`)."""
        w = self.work
        if w.count <= 0:
            return 0.0
        remaining = max(w.count * w.lengths.mean_output_tokens - w.generated_tokens, w.count)
        return w.prefill_tokens * w.prefill_s_per_token + remaining * w.decode_s_per_token(w.max_batch_size)

    def memory_limits(self) -> ReplicaMemory:
        c = self.memory.config
        return ReplicaMemory(c.block_tokens, c.block_bytes, self.memory.total_blocks,
                             c.max_adapter_slots, c.adapter_budget_bytes, c.capacity_bytes)
