"""The simulator's fast path (DESIGN.md section 3): after a pure-decode iteration, advance many
identical decode iterations in one SimPy event when nothing can change the batch.

A jump covers iterations that all end strictly before the next external event (an arrival or a
migration check), finish no request, need no KV block the pool cannot give, and for which the
batching policy declares its plan stationary. Each jumped iteration is accounted exactly as the
normal path would (the same float additions in the same order), so reports are identical to
stepping one by one; `tests/sim/test_fastpath.py` checks that."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..core.batching import QueueView
from ..core.replica import ReplicaScheduler
from ..profile import LatencyModel
from ..types import Adapter, Batch, StepResult

if TYPE_CHECKING:
    from .driver import _Sim

MIN_JUMP = 2


class FastPath:
    def __init__(self, latency: LatencyModel, adapters: dict[int, Adapter]) -> None:
        self.latency = latency
        self.ranks = {a.id: a.rank for a in adapters.values()}
        self.jumps = 0
        self.jumped_iterations = 0

    def eligible(self, rep: ReplicaScheduler, batch: Batch) -> bool:
        if (batch.is_switch or batch.load_adapters or batch.evict_adapters or batch.swap_in
                or batch.swap_out or batch.free_requests or batch.transfer_in):
            return False
        if rep._pending_free or rep._pending_loads or rep._pending_evicts:
            return False
        if not all(it.new_tokens == 1 and it.samples for it in batch.items):
            return False
        queue = QueueView(rep.unfinished, rep.merged_adapter, rep.config.max_batch_size, rep.step)
        plan = rep.policy.plan(queue, 0.0)
        if plan.mode != batch.mode or len(plan.requests) != len(batch.requests):
            return False
        if any(a is not b for a, b in zip(plan.requests, batch.requests, strict=True)):
            return False
        return rep.policy.is_stationary(queue, plan)

    def run(self, sim: _Sim, rep: ReplicaScheduler, batch: Batch, result: StepResult) -> Any:
        """Generator: yields at most one timeout covering the jumped iterations."""
        if not self.eligible(rep, batch):
            return
        env = sim.env
        now = float(env.now)
        limit = sim.next_external_s()
        reqs = batch.requests
        max_iters = min(r.remaining_output_tokens for r in reqs) - 1  # none may finish
        if max_iters < MIN_JUMP:
            return
        mem = rep.memory
        shape = batch.shape(self.ranks)
        n = len(reqs)
        ctx = [r.computed_tokens for r in reqs]  # KV tokens before the next iteration
        free_blocks = mem.free_blocks
        held = [mem.held(r.id) for r in reqs]
        times: list[float] = []
        grow: list[int] = []
        end = now
        decode_ctx = shape.decode_context_tokens
        for _ in range(max_iters):
            need = 0
            for i in range(n):
                need += mem.blocks_for(ctx[i] + 1) - held[i]
            if need > free_blocks:
                break
            decode_ctx += n
            t = self.latency.step_s(dataclasses.replace(shape, decode_context_tokens=decode_ctx))
            if not end + t < limit:
                break
            for i in range(n):
                b = mem.blocks_for(ctx[i] + 1) - held[i]
                held[i] += b
                ctx[i] += 1
            free_blocks -= need
            grow.append(need)
            end = end + t
            times.append(t)
        k = len(times)
        if k < MIN_JUMP or now + (end - now) != end:
            return
        yield env.timeout(end - now)
        self._apply(rep, batch, times)
        self.jumps += 1
        self.jumped_iterations += k

    def _apply(self, rep: ReplicaScheduler, batch: Batch, times: list[float]) -> None:
        mem = rep.memory
        policy = rep.policy
        for t in times:
            result = StepResult(t)
            rep.stats.record_step(batch, result)
            for r in batch.requests:
                need = mem.blocks_for(r.computed_tokens + 1) - mem.held(r.id)
                if need:
                    mem.allocate(r.id, need)
                r.executing_s += t
                r.computed_tokens += 1
                r.generated_tokens += 1
            rep.work.generated_tokens += len(batch.requests)
            policy.observe(batch, result)
            rep.step += 1
