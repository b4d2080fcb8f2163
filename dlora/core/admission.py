"""Admission of a policy's plan into one replica's iteration (`ReplicaScheduler._admit`).

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

A mixin of `ReplicaScheduler` (on `RoomMaker`, which makes the room), kept apart for size."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..types import Adapter, Batch, BatchItem, BatchMode, Request, RequestStatus
from .batching import Plan
from .room import RoomMaker


class Admission(RoomMaker):
    if TYPE_CHECKING:  # provided by ReplicaScheduler
        id: int
        step: int
        _pending_loads: list[int]
        _pending_evicts: list[int]
        adapters: Mapping[int, Adapter]

        def take_pending_frees(self) -> tuple[int, ...]: ...

    def blocks_admission(self, r: Request, tokens_left: int, keep: set[int]) -> bool:
        """Whether admission (`_admit`) refuses the waiting or preempted request `r` at its turn
        for a KV shortage, which stops FCFS admission behind it (`tokens_left` batch tokens left
        then; `keep`: the adapters the batch keeps), and keeps refusing it while the pool's
        free memory only shrinks and nothing else about it changes: its need is fixed, and so is
        what evicting adapters could free (those no running request needs). The simulator's
        fast path covers such iterations (a plan whose waiting requests cannot run yet). False
        when that is not certain: a prefix-cache hit for `r` (its need depends on the cache),
        S-LoRA's reservation, no token left."""
        if self.traits.reserve_output or tokens_left <= 0:
            return False
        hits, _, _, _, _, _, need = self._need(r, tokens_left)
        if hits:
            return False
        # (then `_evict_until` fails, room nor eviction making it fit, and admission blocks)
        return self.memory.free_bytes + self._evictable_bytes(keep, r.adapter_id) < need

    def _need(self, r: Request, tokens_left: int) -> tuple[Sequence[Hashable], int, int, int, int, int, int]:
        """What admitting `r` with `tokens_left` batch tokens takes: (its prefix-cache hits, of
        them unheld ones, its computed tokens with the hits, new tokens to compute, bytes of its
        adapter to load, new KV blocks, and the bytes of room all that needs). A new or
        recomputed request first claims the cached blocks of its prompt."""
        mem = self.memory
        computed = r.computed_tokens
        hits: Sequence[Hashable] = ()
        idle_hits = 0
        if mem.config.prefix_caching and r.status == RequestStatus.WAITING and not computed \
                and r.id not in mem.kv_blocks and r.id not in self._incoming_kv:
            hits, idle_hits = self._prefix_hits(r)
            computed = len(hits) * mem.block_tokens
        new = min(r.prompt_tokens + r.generated_tokens - computed, tokens_left)
        adapter = r.adapter_id
        adapter_bytes = 0
        if adapter is not None and adapter not in mem.adapters:
            adapter_bytes = self.adapters[adapter].size_bytes
        blocks = -(-(computed + new) // mem.block_tokens) - mem.held(r.id) - len(hits)
        return hits, idle_hits, computed, new, adapter_bytes, blocks, (blocks + idle_hits) * mem.block_bytes + adapter_bytes

    def _fallback_plan(self) -> Plan:
        """The running requests in order: what runs when nothing of a plan can be admitted."""
        reqs = self.running[: self.config.max_batch_size]
        m = self.merged_adapter
        if m is not None and reqs and all(r.adapter_id == m for r in reqs):
            return Plan(BatchMode.MERGED, m, reqs)
        return Plan(BatchMode.UNMERGED, None, reqs)

    def _admit(self, plan: Plan, now: float) -> Batch:
        mem = self.memory
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
                hits, _, computed, new, adapter_bytes, blocks, need = self._need(r, tokens_left)
                adapter = r.adapter_id
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
        ).check()
        self.stats.preempting_iterations += int(preempted)
        self.step += 1
        return batch

