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
from dataclasses import dataclass, field

import simpy

from ..core.batching import QueueView
from ..core.replica import ReplicaScheduler
from ..profile import LatencyModel
from ..types import Adapter, Batch, BatchItem, BatchMode, Request, RequestStatus, StepResult

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
    # iteration index -> requests (ids) that need a new KV block / whose block fills in it
    needs: dict[int, list[int]] = field(default_factory=dict)
    fills: dict[int, list[Request]] = field(default_factory=dict)
    start_tokens: dict[int, int] = field(default_factory=dict)  # request id -> computed at start
    applied: int = 0  # iterations applied (the replica's side)
    requests_applied: int = 0  # iterations whose requests' own counters are applied
    allocated: int = 0  # iterations whose KV blocks are allocated
    cut: bool = False
    finishing: bool = False  # the last iteration finishes a request (applied by `finish`)

    @property
    def done(self) -> bool:
        return self.applied >= len(self.times)


class FastPath:
    def __init__(self, latency: LatencyModel, adapters: dict[int, Adapter]) -> None:
        self.latency = latency
        self.ranks = {a.id: a.rank for a in adapters.values()}
        self.jumps = 0
        self.jumped_iterations = 0

    def next_decode_batch(self, rep: ReplicaScheduler, now: float) -> Batch | None:
        """The batch the replica would run next if it is a pure decode of requests that already
        hold their KV, with no memory action or switch pending and a plan the policy declares
        stationary; else None."""
        if rep._pending_loads or rep._pending_evicts or rep._incoming_kv:
            return None  # (KV frees cost no time: the jump's first iteration takes them)
        queue = QueueView(rep.unfinished, rep.merged_adapter, rep.config.max_batch_size, rep.step)
        plan = rep.policy.plan(queue, now)  # the real time: time-based policy rules read it
        merged = plan.merged_adapter if plan.mode == BatchMode.MERGED else None
        if not plan.requests or merged != rep.merged_adapter:
            return None
        if len(plan.requests) > rep.config.max_batched_tokens:
            return None
        items = []
        resident = rep.memory.adapters
        for r in plan.requests:
            if r.status != RequestStatus.RUNNING or r.prompt_tokens + r.generated_tokens - r.computed_tokens != 1:
                return None
            if r.generated_tokens == 0:
                return None  # its last prompt token: this iteration sets its first token time
            if r.adapter_id is not None and r.adapter_id not in resident:
                return None  # admission would have to load it (and may fail to)
            items.append(BatchItem(r.id, r.adapter_id, r.computed_tokens, 1, True))
        if not rep.policy.is_stationary(queue, plan):
            return None
        return Batch(replica=rep.id, step=rep.step, mode=plan.mode, merged_adapter=merged,
                     items=tuple(items), requests=tuple(plan.requests), forced_by_credit=plan.forced_by_credit)

    def plan(self, rep: ReplicaScheduler, now: float, horizon: float | None) -> Jump | None:
        """The jump of identical decode iterations starting at `now`, or None."""
        batch = self.next_decode_batch(rep, now)
        if batch is None:
            return None
        reqs = batch.requests
        # up to and including the iteration in which the first request finishes (that one is
        # applied by `ReplicaScheduler.complete` itself: `finish`)
        until_finish = min(r.remaining_output_tokens for r in reqs)
        max_iters = min(until_finish, MAX_JUMP)
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
        decode_ctx = shape.decode_context_tokens - n  # the loop adds n before each iteration
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
        k = len(times)
        needs: dict[int, list[int]] = {}
        fills: dict[int, list[Request]] = {}
        start_tokens = {}
        for r in reqs:  # in batch order, as the iteration-by-iteration loop visits them
            c = r.computed_tokens
            start_tokens[r.id] = c
            for i in range((-c) % block, k, block):  # its computed tokens fill whole blocks
                needs.setdefault(i, []).append(r.id)
            for i in range((-c - 1) % block, k, block):  # a block fills in iteration i
                fills.setdefault(i, []).append(r)
        rep.take_pending_frees()  # the first iteration carries them, as `_admit` would
        return Jump(rep, batch, now, times, ends, needs, fills, start_tokens, finishing=k == until_finish)

    def materialize(self, jump: Jump, now: float, full: bool = True) -> None:
        """Apply every iteration that ended by `now`; allocate the blocks of the one in flight.
        `full=False` (a view is read) applies the replica's side only and leaves the requests'
        own counters for the next full call (`ReplicaScheduler.advance_requests`)."""
        k = len(jump.times)
        first = jump.applied
        if not (first >= k or (jump.allocated > first and jump.ends[first] > now)):
            self._apply(jump, now)
        if full and jump.requests_applied < jump.applied:
            jump.rep.advance_requests(jump.batch, jump.times[jump.requests_applied:jump.applied])
            jump.requests_applied = jump.applied

    def _apply(self, jump: Jump, now: float) -> None:
        k = len(jump.times)
        first = jump.applied
        rep = jump.rep
        mem = rep.memory
        caching = mem.config.prefix_caching
        ends = jump.ends
        allocated_before = jump.allocated
        while jump.applied < k and (jump.applied == 0 or ends[jump.applied - 1] <= now):
            i = jump.applied
            if jump.allocated <= i:
                # held == ceil(computed / block) for a decoding request, so a step needs a new
                # block exactly when its computed tokens fill whole blocks (`Jump.needs`)
                for rid in jump.needs.get(i, ()):
                    mem.allocate(rid, 1)
                jump.allocated = i + 1
            if ends[i] > now or (jump.finishing and i == k - 1):
                break  # (a finishing last iteration is left to `finish`)
            jump.applied = i + 1
            if caching:  # as `complete` does, before the next iteration allocates
                for r in jump.fills.get(i, ()):
                    after = jump.start_tokens[r.id] + i + 1
                    rep.register_blocks(r, after - 1, after)
        if jump.allocated > allocated_before:  # an observer sees the one in flight as scheduled
            rep.mark_scheduled(jump.batch, jump.allocated - allocated_before)
        done = jump.applied - first
        if done:
            rep.complete_repeated(jump.batch, jump.times[first:jump.applied])
            self.jumped_iterations += done

    def cut(self, jump: Jump) -> float:
        """Stop the jump after the iteration in flight; returns when that one ends."""
        jump.cut = True
        last = max(jump.allocated, jump.applied, 1)
        if last < len(jump.times):
            jump.finishing = False
        del jump.times[last:]
        del jump.ends[last:]
        return jump.ends[-1]

    def finish(self, jump: Jump, now: float) -> list[Request]:
        """Apply a finishing last iteration (ended by `now`, the others applied) through
        `ReplicaScheduler.complete`, exactly as stepping would; returns the finished requests."""
        k = len(jump.times)
        if not jump.finishing or jump.applied != k - 1 or jump.ends[-1] > now:
            return []
        assert jump.allocated == k and jump.requests_applied == k - 1
        b = jump.batch
        last = Batch(replica=b.replica, step=b.step + k - 1, mode=b.mode, merged_adapter=b.merged_adapter,
                     items=tuple(BatchItem(r.id, r.adapter_id, r.computed_tokens, 1, True) for r in b.requests),
                     requests=b.requests, forced_by_credit=b.forced_by_credit)
        # the policy is told as for every iteration of the jump (its plan was not asked again)
        jump.rep.policy.observe_repeated(b, jump.times[-1:])
        finished = jump.rep.complete(last, StepResult(jump.times[-1]), jump.ends[-1], observe=False)
        jump.applied = k
        self.jumped_iterations += 1
        return finished
