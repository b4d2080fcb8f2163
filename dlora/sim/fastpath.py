"""The simulator's fast path (DESIGN.md section 3): after a pure-decode iteration, cover the
following identical decode iterations with one SimPy event.

A jump is planned over the iterations that finish no request, need no KV block the pool cannot
give, and for which the batching policy declares its plan stationary (no arrival, completion or
policy decision pending). Its iterations are applied lazily: when something outside the replica
looks at it (an arrival being dispatched, a migration check), the driver first `materialize`s
every iteration that ended by then and allocates the blocks of the one in flight, so the
observer sees exactly the state the one-by-one loop would have. If the observer changes the
replica (a request dispatched to it, a migration), the jump is cut after the iteration in
flight. Each iteration is accounted with the same float operations in the same order as the
normal path, so reports are identical to stepping one by one (tests/sim/test_fastpath.py)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import simpy

from ..core.batching import QueueView
from ..core.replica import ReplicaScheduler
from ..profile import LatencyModel
from ..types import Adapter, Batch, BatchMode

MIN_JUMP = 2
MAX_JUMP = 4096


def at(env: simpy.Environment, when: float) -> simpy.Event:
    """An event that fires at absolute time `when` exactly (a Timeout computes now + delay,
    which can differ from `when` in the last bit)."""
    ev = simpy.Event(env)
    ev._ok = True
    ev._value = None
    heapq.heappush(env._queue, (when, simpy.events.NORMAL, next(env._eid), ev))
    return ev


@dataclass
class Jump:
    rep: ReplicaScheduler
    batch: Batch
    start_s: float
    times: list[float]
    ends: list[float]
    applied: int = 0  # iterations fully applied
    allocated: int = 0  # iterations whose KV blocks are allocated
    cut: bool = False

    @property
    def done(self) -> bool:
        return self.applied >= len(self.times)


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

    def plan(self, rep: ReplicaScheduler, batch: Batch, now: float, horizon: float | None) -> Jump | None:
        """The jump that follows `batch` (just completed at `now`), or None."""
        if not self.eligible(rep, batch):
            return None
        reqs = batch.requests
        max_iters = min(min(r.remaining_output_tokens for r in reqs) - 1, MAX_JUMP)  # none may finish
        if max_iters < MIN_JUMP:
            return None
        mem = rep.memory
        shape = batch.shape(self.ranks)
        n = len(reqs)
        # LatencyModel.step_parts_s with its constant parts evaluated once (bit-identical)
        head = self.latency.head_s(shape)
        attn = self.latency.latency.attention_decode_s_per_token
        tail = self.latency.tail_s(shape)
        block = mem.block_tokens
        # a request needs a new block when its KV tokens before the step fill whole blocks
        ctx = [r.computed_tokens for r in reqs]
        free_blocks = mem.free_blocks
        times: list[float] = []
        ends: list[float] = []
        end = now
        decode_ctx = shape.decode_context_tokens
        total_need = sum(-(-(c + max_iters) // block) - -(-c // block) for c in ctx)
        check_memory = total_need > free_blocks  # else every iteration's blocks fit
        for _ in range(max_iters):
            if check_memory:
                need = 0
                for i in range(n):
                    if ctx[i] % block == 0:
                        need += 1
                    ctx[i] += 1
                if need > free_blocks:
                    break
                free_blocks -= need
            decode_ctx += n
            t = head
            t += attn * decode_ctx
            t += tail
            end = end + t
            times.append(t)
            ends.append(end)
            if horizon is not None and end >= horizon:
                break
        if len(times) < MIN_JUMP:
            return None
        return Jump(rep, batch, now, times, ends)

    def materialize(self, jump: Jump, now: float) -> None:
        """Apply every iteration that ended by `now`; allocate the blocks of the one in flight."""
        rep = jump.rep
        mem = rep.memory
        reqs = jump.batch.requests
        block = mem.block_tokens
        stats = rep.stats
        k = len(jump.times)
        first = jump.applied
        while jump.applied < k and (jump.applied == 0 or jump.ends[jump.applied - 1] <= now):
            i = jump.applied
            if jump.allocated <= i:
                # held == ceil(computed / block) for a decoding request, so a step needs a new
                # block exactly when its computed tokens (i - first steps not yet added) fill
                # whole blocks
                offset = i - first
                for r in reqs:
                    if (r.computed_tokens + offset) % block == 0:
                        mem.allocate(r.id, 1)
                jump.allocated = i + 1
            if jump.ends[i] > now:
                break
            t = jump.times[i]
            stats.busy_s += t
            for r in reqs:
                r.executing_s += t
            jump.applied = i + 1
        done = jump.applied - first
        if done:
            n = len(reqs)
            for r in reqs:
                r.computed_tokens += done
                r.generated_tokens += done
            rep.work.generated_tokens += n * done
            rep.step += done
            stats.iterations += done
            stats.batched_requests += n * done
            if jump.batch.mode == BatchMode.MERGED:
                stats.merged_iterations += done
            else:
                stats.unmerged_iterations += done
            rep.policy.observe_repeated(jump.batch, jump.times[first:jump.applied])
            self.jumped_iterations += done

    def cut(self, jump: Jump) -> float:
        """Stop the jump after the iteration in flight; returns when that one ends."""
        jump.cut = True
        last = max(jump.allocated, jump.applied, 1)
        del jump.times[last:]
        del jump.ends[last:]
        return jump.ends[-1]
