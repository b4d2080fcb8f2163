"""ReplicaScheduler: one replica's queues, admission and memory, iteration by iteration.

`schedule(now)` asks the batching policy for a plan and admits it under the admission contract
below; `complete(batch, result, now)` advances token counters, finishes requests and feeds the
policy. No clock is read: `now` is always an argument.

The admission contract (vLLM v1's, with dLoRA's policies deciding inside it; DESIGN.md
section 3). A replica keeps `running` (requests holding device KV, in the order they were
admitted) and `waiting` (queued or preempted requests; new arrivals join in arrival order,
preempted requests go back to the front). Policies see `running + waiting`, in that order, as
the priority order, and plan at most `max_batch_size` requests from it. Admission walks the
plan under the token cap (prefill is chunked to fit):

- a running request gets the KV blocks for its new tokens from free memory, then from adapters
  nobody running needs, and only then by preempting the lowest-priority running request not
  yet scheduled this iteration (the last admitted), itself when it is that one;
- a waiting or preempted request never preempts: it is admitted only into free memory and
  evictable adapters; when its KV does not fit, no later waiting request is admitted (FCFS),
  and when only its adapter slot is short it waits while later requests may go;
- an iteration that preempted admits no waiting request;
- an adapter that a running request needs is never evicted; one only queued requests need is
  evicted after the idle ones;
- a policy may leave running requests out of an iteration (a merged batch does) and they keep
  their KV; a plan of which nothing can be admitted falls back to the running requests in order;
- with prefix caching on, a new or recomputed request first claims the cached blocks of its
  prompt (memory.py) and computes only the rest;
- with `reserve_output` (the `slora` baseline), a waiting request is admitted only if every
  admitted request's whole output still fits when it finishes (S-LoRA's admission), so nobody
  is ever preempted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from ..profile import LatencyModel
from ..types import (
    Adapter,
    Batch,
    BatchItem,
    BatchMode,
    Request,
    RequestStatus,
    StepResult,
)
from .batching import BatchPolicy, Plan, QueueView
from .context import ReplicaConfig
from .memory import MemoryPool
from .replica_repeat import RepeatedDecode
from .replica_views import ReplicaViews, fcfs_key
from .room import RoomMaker
from .stats import ReplicaStats
from .work import WorkEstimator

log = logging.getLogger(__name__)


class AdmissionError(Exception):
    """A request can never fit this replica (raised at `add`)."""


class ReplicaScheduler(RoomMaker, ReplicaViews, RepeatedDecode):
    def __init__(
        self,
        replica_id: int,
        config: ReplicaConfig,
        memory: MemoryPool,
        policy: BatchPolicy,
        latency: LatencyModel,
        adapters: Mapping[int, Adapter],
        work: WorkEstimator | None = None,
    ) -> None:
        self.id = replica_id
        self.config = config
        # the policy's traits and hooks (batching.py; the baselines set them): memory layout,
        # adapter sizes, switch and eviction rules and admission of the system it models
        shaped = policy.memory_config(memory.config)
        if shaped is not memory.config:
            memory = MemoryPool(shaped)
        self.traits = policy.traits
        self.memory = memory
        self.policy = policy
        self.latency = latency
        # this replica's adapter table, sized as its policy counts them (grows by `add_adapter`)
        self.adapters: dict[int, Adapter] = {}
        for a in adapters.values():
            self.add_adapter(a)
        self.work = work or WorkEstimator(latency, config)
        self.running: list[Request] = []  # hold device KV, in admission order
        self.waiting: list[Request] = []  # queued or preempted (front first)
        self.merged_adapter: int | None = None
        self.step = 0
        self.is_alive = True
        self.outstanding: Counter[int | None] = Counter()
        self.running_adapters: Counter[int | None] = Counter()
        self.adapter_last_used: dict[int, int] = {}
        self.stats = ReplicaStats()
        self._pending_free: list[int] = []
        self._rpa: tuple[tuple[int | None, int], ...] | None = None
        self._queue_counts: tuple[tuple[tuple[int | None, int], ...], Counter[int | None]] | None = None
        self._pending_loads: list[int] = []
        self._pending_evicts: list[int] = []
        self._incoming_kv: dict[int, int] = {}  # request id -> KV tokens arriving by transfer

    def add_adapter(self, adapter: Adapter) -> None:
        """Serve one more adapter here, sized as the policy counts it (`Cluster.register_adapter`)."""
        size = self.policy.adapter_size_bytes(adapter)
        if size != adapter.size_bytes:
            adapter = dataclasses.replace(adapter, size_bytes=size)
        self.adapters[adapter.id] = adapter

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
        budget = self.memory.config.adapter_budget_bytes
        if budget is not None and adapter_bytes > budget:
            raise AdmissionError(
                f"request {request.id}'s adapter needs {adapter_bytes} bytes, more than replica "
                f"{self.id}'s static adapter budget ({budget} bytes; cluster.adapter_memory_fraction)"
            )

    def add(self, request: Request, now: float) -> None:
        """Queue a request: it joins the waiting queue in arrival order (behind preempted
        requests, which sit at the front)."""
        self.check_fits(request)
        request.replica = self.id
        if request.status in (RequestStatus.PENDING, RequestStatus.RUNNING):
            request.status = RequestStatus.WAITING
        if request.dispatch_s is None:
            request.dispatch_s = now
        key = fcfs_key(request)
        w = self.waiting
        j = len(w)
        while j > 0 and fcfs_key(w[j - 1]) > key:
            j -= 1
        w.insert(j, request)
        self.outstanding[request.adapter_id] += 1
        self._rpa = None
        self.work.add(request)

    def _take(self, request: Request) -> None:
        """Take a request off the queues (finish, abort, migration)."""
        if request.status == RequestStatus.RUNNING:
            self._leave_running(request)
        else:
            self.waiting.remove(request)
        self.outstanding[request.adapter_id] -= 1
        self._rpa = None

    def remove(self, request: Request) -> None:
        """Take an unfinished request off this replica (migration, abort), freeing its memory."""
        self._take(request)
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
        return bool(self.running or self.waiting)

    # ---- one iteration ----
    def schedule(self, now: float) -> Batch | None:
        """Plan with the policy over the priority order, admit under the contract (module
        docstring), return the batch (None when idle)."""
        if not self.running and not self.waiting:
            return None
        queue = QueueView(self.unfinished, self.merged_adapter, self.config.max_batch_size, self.step,
                          self.queue_counts())
        plan = self.policy.plan(queue, now)
        return self._admit(plan, now)

    def _fallback_plan(self) -> Plan:
        """The running requests in order: what runs when nothing of a plan can be admitted."""
        reqs = self.running[: self.config.max_batch_size]
        m = self.merged_adapter
        if m is not None and reqs and all(r.adapter_id == m for r in reqs):
            return Plan(BatchMode.MERGED, m, reqs)
        return Plan(BatchMode.UNMERGED, None, reqs)

    def _admit(self, plan: Plan, now: float) -> Batch:
        mem = self.memory
        block_tokens, block_bytes = mem.block_tokens, mem.block_bytes
        keep: set[int] = set()  # adapters this batch needs (never evicted for it)
        if plan.mode == BatchMode.MERGED and plan.merged_adapter is not None:
            keep.add(plan.merged_adapter)
        loads: list[int] = self._pending_loads
        evicts: list[int] = self._pending_evicts
        self._pending_loads, self._pending_evicts = [], []
        transfer_in: list[int] = []
        transfer_tokens = 0
        swap_in: list[int] = []
        swap_out: list[int] = []
        swap_tokens = [0, 0]  # out, in
        admitted: list[Request] = []
        items: list[BatchItem] = []
        scheduled: set[int] = set()
        tokens_left = self.config.max_batched_tokens
        preempted = False
        waiting_blocked = False  # a waiting request's KV did not fit: FCFS stops admitting
        reserved = self._reserved_tokens() if self.traits.reserve_output else None
        caching = mem.config.prefix_caching
        for attempt in (plan, None):
            if attempt is None:
                if admitted:
                    break
                plan = self._fallback_plan()
                keep = {plan.merged_adapter} if plan.merged_adapter is not None else set()
            for r in plan.requests:
                if tokens_left <= 0:
                    break
                if r.id in scheduled or r.is_done or r.replica != self.id:
                    continue
                waiting = r.status != RequestStatus.RUNNING
                if waiting and (preempted or waiting_blocked):
                    continue  # a preempting iteration admits nothing new; FCFS stops at a KV shortage
                computed = r.computed_tokens
                hits: Sequence[Hashable] = ()
                idle_hits = 0
                if caching and r.status == RequestStatus.WAITING and not computed \
                        and r.id not in mem.kv_blocks and r.id not in self._incoming_kv:
                    hits, idle_hits = self._prefix_hits(r)
                    computed = len(hits) * block_tokens
                new = min(r.prompt_tokens + r.generated_tokens - computed, tokens_left)
                adapter = r.adapter_id
                adapter_bytes = 0
                if adapter is not None and adapter not in mem.adapters:
                    adapter_bytes = self.adapters[adapter].size_bytes
                blocks = -(-(computed + new) // block_tokens) - mem.held(r.id) - len(hits)
                need = (blocks + idle_hits) * block_bytes + adapter_bytes
                if not waiting:
                    ok = self._evict_until(need, adapter_bytes, keep, evicts, adapter)
                    if not ok and adapter_bytes:
                        continue  # its adapter was dropped (a failed step) and no slot is free: wait
                    while not ok:  # preempt from the lowest-priority end, itself last
                        victim = self._victim(scheduled)
                        assert victim is not None
                        self._preempt(victim, swap_out, swap_tokens)
                        preempted = True
                        if victim is r:
                            break
                        ok = self._evict_until(need, 0, keep, evicts, adapter)
                    if not ok:
                        continue
                else:
                    if reserved is not None and not self._reservation_fits(r, reserved, adapter_bytes):
                        waiting_blocked = True
                        continue
                    if not self._evict_until(need, adapter_bytes, keep, evicts, adapter):
                        if mem.free_bytes + self._evictable_bytes(keep, adapter) < need:
                            waiting_blocked = True  # KV short: FCFS admits nobody behind it
                        continue  # only a slot (or the adapter budget) is short: it waits
                    if caching:
                        self.stats.prefix_query_tokens += r.prompt_tokens
                    if hits:
                        mem.claim_prefix(r.id, hits)
                        self.work.remove(r)
                        r.computed_tokens = computed
                        self.work.add(r)
                        self.stats.prefix_hit_tokens += computed
                    if r.status == RequestStatus.SWAPPED:
                        mem.swap_in(r.id)
                        swap_in.append(r.id)
                        swap_tokens[1] += r.computed_tokens
                        blocks = mem.blocks_for(r.computed_tokens + new) - mem.held(r.id)
                    self.waiting.remove(r)
                    self.running.append(r)
                    self.running_adapters[adapter] += 1
                    r.status = RequestStatus.RUNNING
                    if reserved is not None:
                        reserved.append((r.prompt_tokens + r.generated_tokens, r.remaining_output_tokens))
                if adapter_bytes:
                    mem.load_adapter(adapter, adapter_bytes)  # type: ignore[arg-type]
                    loads.append(adapter)  # type: ignore[arg-type]
                if adapter is not None:
                    keep.add(adapter)
                    self.adapter_last_used[adapter] = self.step
                if r.id in self._incoming_kv:
                    transfer_tokens += self._incoming_kv.pop(r.id)
                    transfer_in.append(r.id)
                if blocks > 0:
                    mem.allocate(r.id, blocks)
                if r.first_scheduled_s is None:
                    r.first_scheduled_s = now
                scheduled.add(r.id)
                admitted.append(r)
                items.append(BatchItem(r.id, adapter, computed, new,
                                       computed + new == r.prompt_tokens + r.generated_tokens))
                tokens_left -= new
        assert admitted, "a plan always admits something, or the running requests do (checked at add)"
        merge = unmerge = None
        target = plan.merged_adapter if plan.mode == BatchMode.MERGED else None
        if target != self.merged_adapter:
            if not self.traits.switch_free:
                unmerge, merge = self.merged_adapter, target
            self.merged_adapter = target
        load_bytes = sum(self.adapters[a].size_bytes for a in loads)
        free = self.take_pending_frees()
        batch = Batch(
            replica=self.id, step=self.step, mode=plan.mode, merged_adapter=target,
            items=tuple(items), requests=tuple(admitted), merge_adapter=merge, unmerge_adapter=unmerge,
            load_adapters=tuple(loads), evict_adapters=tuple(evicts), swap_out=tuple(swap_out),
            swap_in=tuple(swap_in), swap_out_tokens=swap_tokens[0], swap_in_tokens=swap_tokens[1],
            free_requests=free, transfer_in=tuple(transfer_in), transfer_in_tokens=transfer_tokens,
            load_bytes=load_bytes, forced_by_credit=plan.forced_by_credit,
        )
        self.stats.preempting_iterations += int(preempted)
        self.step += 1
        return batch

    @property
    def memory_actions_pending(self) -> bool:
        """Whether the next iteration carries adapter loads or evictions (`schedule` puts them
        in whatever batch it forms). KV arriving by transfer (a migration) is not one: it is
        charged in the batch that admits its request, which waits until then."""
        return bool(self._pending_loads or self._pending_evicts)

    def take_pending_frees(self) -> tuple[int, ...]:
        """The requests whose KV the next iteration frees on the device (and forget them)."""
        free = tuple(self._pending_free)
        self._pending_free.clear()
        return free

    def complete(self, batch: Batch, result: StepResult, now: float, observe: bool = True) -> list[Request]:
        """Apply a finished step: token counters, first tokens, finishes, policy feedback
        (`observe=False`: the caller told the policy already, as the simulator's fast path does
        with `observe_repeated` for the last iteration of a jump)."""
        self.stats.record_step(batch, result)
        if result.error is not None:
            self._requeue(batch, result.error)
            return []
        finished: list[Request] = []
        caching = self.memory.config.prefix_caching
        bt = self.memory.block_tokens
        token_ids = iter(result.token_ids) if result.token_ids is not None else None
        eos_flags = iter(result.eos) if result.eos is not None else None
        for item, r in zip(batch.items, batch.requests, strict=True):
            r.executing_s += result.elapsed_s
            self.work.remove(r)
            r.computed_tokens += item.new_tokens
            if caching and r.computed_tokens // bt > item.computed_tokens // bt:  # a block filled
                self.register_blocks(r, item.computed_tokens)
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
        if observe:
            self.policy.observe(batch, result)
        return finished

    def _finish(self, r: Request, now: float, status: RequestStatus = RequestStatus.FINISHED) -> None:
        self._take(r)
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
        """A failed step: its requests lose their KV and go back to the front of the queue,
        in their order; the device state is unknown, so weights are assumed clean and every
        adapter is reloaded when next needed."""
        log.warning("replica %d step %d failed (%s); requeueing %d requests", self.id, batch.step, error, len(batch.requests))
        back = []
        for r in batch.requests:
            if r.is_done:
                continue
            if r.status == RequestStatus.RUNNING:
                self._leave_running(r)
            else:
                self.waiting.remove(r)
            self.memory.release(r.id)
            self.memory.drop_swapped(r.id)
            self.work.remove(r)
            r.computed_tokens = 0
            r.status = RequestStatus.WAITING
            self.work.add(r)
            self._pending_free.append(r.id)
            back.append(r)
        self.waiting[:0] = back
        self.merged_adapter = None
        for a in list(self.memory.adapters):
            self.memory.evict_adapter(a)
