"""ReplicaScheduler: one replica's queues, admission and memory, iteration by iteration.

`schedule(now)` asks the batching policy for a plan and admits it under the admission contract
(`admission.py`); `complete(batch, result, now)` advances token counters, finishes requests and
feeds the policy. No clock is read: `now` is always an argument.

The admission contract (vLLM v1's, with dLoRA's policies deciding inside it) is in
`admission.py`, which admits a plan (`_admit`); `room.py` makes room under it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping

from ..latency import LatencyModel
from ..types import (
    Adapter,
    Batch,
    Request,
    RequestStatus,
    StepResult,
)
from .admission import Admission
from .batching import BatchPolicy, QueueView
from .context import ReplicaConfig
from .memory import MemoryPool
from .replica_repeat import RepeatedDecode
from .replica_views import ReplicaViews, fcfs_key
from .stats import ReplicaStats
from .work import WorkEstimator

log = logging.getLogger(__name__)


class AdmissionError(Exception):
    """A request can never fit this replica (raised at `add`)."""


class ReplicaScheduler(Admission, ReplicaViews, RepeatedDecode):
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
