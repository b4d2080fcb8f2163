"""The simulator's fast path (DESIGN.md section 3): after a pure-decode iteration, cover the
following decode iterations of the same batch with one SimPy event.

A jump is planned over the iterations that finish no request (but the last may), need no KV
block the pool cannot give, and for which the batching policy would plan the same batch again
(`BatchPolicy.repeats`: for ever for a stationary plan; while its credits stay on the same
side of every threshold for a credit-moving one). A plan may include waiting requests when
admission refuses the first of them for want of KV memory (which blocks the others behind it)
and will keep refusing it while the jump's decode blocks only shrink the free memory
(`ReplicaScheduler.blocks_admission`): near capacity most iterations are such, the running
requests decoding while the queue waits for one of them to finish. Its iterations are applied
lazily: when something outside the replica reads its requests or changes it (an arrival
dispatched to it, a migration check), the driver first `materialize`s every iteration that
ended by then and allocates the blocks of the one in flight, so the observer sees exactly the
state the one-by-one loop would have; a view of the replica applies nothing and counts what
the unapplied iterations add (`unapplied`). If the observer changes the replica, the jump is
cut after the iteration in flight. Each iteration is accounted with the same float operations
in the same order as the normal path, so reports are identical to stepping one by one
(tests/sim/test_fastpath_random.py)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

import simpy

from ..core.batching import Plan, QueueView
from ..core.replica import ReplicaScheduler
from ..latency import LatencyModel
from ..types import Adapter, Batch, BatchItem, BatchMode, Request, RequestStatus, StepResult

MIN_JUMP = 2
MAX_JUMP = 4096


def at(env: simpy.Environment, when: float) -> simpy.Event:
    """An event that fires at absolute time `when` exactly, through SimPy's public API only.
    A Timeout fires at `now + delay`, which is `when` exactly for `delay = when - now` whenever
    `now >= when / 2` (Sterbenz: the difference is exact); earlier in a run the rounding may miss
    `when` by a bit, and then a first Timeout lands half-way (at or after `when / 2`) and a
    second one, exact from there, at `when`."""
    now = env.now
    delay = when - now
    if now + delay == when:
        return env.timeout(delay)
    return env.process(_two_stage(env, when))


def _two_stage(env: simpy.Environment, when: float):
    yield env.timeout((when - env.now) / 2)
    while env.now + (when - env.now) != when:  # (never more than once: see `at`)
        yield env.timeout((when - env.now) / 2)
    yield env.timeout(when - env.now)


def _new_blocks(start_tokens: int, first: int, last: int, block_tokens: int) -> int:
    """KV blocks a decoding request that held `start_tokens` at a jump's start needs for the
    jump's iterations `first .. last - 1`: one whenever its computed tokens fill whole blocks
    (blocks to hold start + last tokens, less those for start + first)."""
    return -(-(start_tokens + last) // block_tokens) - -(-(start_tokens + first) // block_tokens)


@dataclass
class Jump:
    rep: ReplicaScheduler
    batch: Batch
    start_s: float
    times: list[float]
    ends: list[float]
    start_tokens: list[int]  # each request's computed tokens at the start (batch order)
    # prefix blocks are registered per stretch of iterations, not per iteration, when no block
    # the jump fills can meet a hash already in the pool (`_bulk_safe`); else, per iteration:
    fills: dict[int, list[tuple[Request, int]]] | None = None  # iteration -> (request, start
    # tokens) whose block fills in it
    applied: int = 0  # iterations applied
    timed: int = 0  # of them, those whose seconds the requests' `executing_s` hold (`add_times`)
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
        self.waiting_jumps = 0  # jumps whose plan holds waiting requests admission refuses
        self.active: dict[int, Jump] = {}  # replica -> its jump in flight (the driver's)

    def next_decode_batch(self, rep: ReplicaScheduler, now: float) -> tuple[Batch, QueueView, Plan] | None:
        """The batch the replica would run next if it is a pure decode of requests that already
        hold their KV, with no memory action or switch pending (with the queue and the policy's
        plan it came from); else None."""
        if rep.memory_actions_pending:
            return None  # (KV frees cost no time: the jump's first iteration takes them; KV
            # arriving by transfer comes with its waiting request, never in a pure decode)
        queue = QueueView(rep.unfinished, rep.merged_adapter, rep.config.max_batch_size, rep.step,
                          rep.queue_counts())
        plan = rep.policy.plan(queue, now)  # the real time: time-based policy rules read it
        merged = plan.merged_adapter if plan.mode == BatchMode.MERGED else None
        if not plan.requests or merged != rep.merged_adapter:
            return None
        if len(plan.requests) > rep.config.max_batched_tokens:
            return None
        items: list[BatchItem] = []
        resident = rep.memory.adapters
        blocked: tuple[Request, int] | None = None  # the plan's first request not running, its tokens left
        for r in plan.requests:
            if r.status != RequestStatus.RUNNING:
                if blocked is None:
                    blocked = (r, rep.config.max_batched_tokens - len(items))
                continue  # (admission skips every waiting request behind a blocked one)
            if r.prompt_tokens + r.generated_tokens - r.computed_tokens != 1:
                return None
            if r.generated_tokens == 0:
                return None  # its last prompt token: this iteration sets its first token time
            if r.adapter_id is not None and r.adapter_id not in resident:
                return None  # admission would have to load it (and may fail to)
            items.append(BatchItem(r.id, r.adapter_id, r.computed_tokens, 1, True))
        if blocked is None:
            reqs = tuple(plan.requests)
        elif not items or not rep.blocks_admission(*blocked, {merged} if merged is not None else set()):
            return None
        else:  # the running requests run; the waiting ones cannot until memory frees
            reqs = tuple(r for r in plan.requests if r.status == RequestStatus.RUNNING)
            w = blocked[0]
            if (w.prefix_group is not None or w.prompt_token_ids is not None) and rep.memory.config.prefix_caching \
                    and not self._bulk_safe(rep, reqs):
                return None  # a block the jump registers (by content, per iteration: `Jump.fills`)
                # may give it prefix hits, which shrink its need (`blocks_admission` holds without)
        batch = Batch(replica=rep.id, step=rep.step, mode=plan.mode, merged_adapter=merged,
                      items=tuple(items), requests=reqs, forced_by_credit=plan.forced_by_credit)
        return batch, queue, plan

    def stats(self) -> dict[str, int]:
        return {"jumps": self.jumps, "jumped_iterations": self.jumped_iterations, "waiting_jumps": self.waiting_jumps}

    @staticmethod
    def admits_next(rep: ReplicaScheduler) -> bool:
        """A cheap guess that the replica's next iteration admits a waiting request, so that no
        jump is worth planning (a guess only: `plan` decides exactly): the first waiting request
        (of the merged adapter, when merged) has room in the batch and its KV fits in free
        memory."""
        if not rep.waiting:
            return False
        b = rep.config.max_batch_size
        m = rep.merged_adapter
        if (len(rep.running) if m is None else rep.running_adapters[m]) >= b:
            return False
        r = rep.waiting[0] if m is None else next((w for w in rep.waiting if w.adapter_id == m), None)
        if r is None:
            return False
        mem = rep.memory
        return mem.blocks_for(r.prompt_tokens + r.generated_tokens) - mem.held(r.id) <= mem.free_blocks

    def plan(self, rep: ReplicaScheduler, now: float, horizon: float | None) -> Jump | None:
        """The jump of identical decode iterations starting at `now`, or None."""
        found = self.next_decode_batch(rep, now)
        if found is None:
            return None
        batch, queue, policy_plan = found
        reqs = batch.requests
        # up to and including the iteration in which the first request finishes (that one is
        # applied by `ReplicaScheduler.complete` itself: `finish`)
        until_finish = min(r.remaining_output_tokens for r in reqs)
        max_iters = min(until_finish, MAX_JUMP)
        if max_iters < MIN_JUMP:
            return None
        mem = rep.memory
        shape = batch.shape(self.ranks)
        if not self.latency.allow_extrapolation and self.latency.out_of_range(shape) is not None:
            return None  # stepping stops the run there, or preempts first and runs a smaller batch
            # (the contexts a jump reaches: `LatencyModel.check_contexts`, before the run)
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
        total_need = sum(_new_blocks(c, 0, max_iters, block) for c in ctx)
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
        # the policy plans the same batch again for this many of them (its own decisions may
        # change on the way, as a credit-moving plan's do)
        k = rep.policy.repeats(queue, policy_plan, [now, *ends[:-1]])
        if k < MIN_JUMP:
            return None
        if k < len(times):
            del times[k:]
            del ends[k:]
        start_tokens = [r.computed_tokens for r in reqs]
        fills: dict[int, list[tuple[Request, int]]] | None = None
        if mem.config.prefix_caching and not self._bulk_safe(rep, reqs):
            fills = {}
            for r, c in zip(reqs, start_tokens, strict=True):  # in batch order, as stepping visits them
                for i in range((-c - 1) % block, k, block):  # a block fills in iteration i
                    fills.setdefault(i, []).append((r, c))
        rep.take_pending_frees()  # the first iteration carries them, as `_admit` would
        self.waiting_jumps += len(reqs) < len(policy_plan.requests)
        return Jump(rep, batch, now, times, ends, start_tokens, fills, finishing=k == until_finish)

    @staticmethod
    def _bulk_safe(rep: ReplicaScheduler, reqs: tuple[Request, ...]) -> bool:
        """Whether the blocks the jump's requests fill can be registered a stretch at a time:
        each is a simulated request (its decode blocks hash as its own, `core/prefix.py`) that
        never left a replica (so none of its blocks beyond the registered ones is in any pool)
        and whose full blocks are all registered. Then registering never meets a hash already
        present, and its order against the jump's allocations (which only drop cached blocks)
        changes nothing."""
        mem = rep.memory
        bt = mem.block_tokens
        for r in reqs:
            if r.prompt_token_ids is not None or r.num_preemptions or r.num_migrations:
                return False
            if r.prefix_group is not None and r.prefix_tokens > r.computed_tokens:
                return False
            if mem.next_unshared(r.id) != r.computed_tokens // bt:
                return False
        return True

    @staticmethod
    def _progress(jump: Jump, now: float) -> tuple[int, int]:
        """(applied, allocated) once every iteration ended by `now` is applied and the one in
        flight allocated (a finishing last iteration is left to `finish`)."""
        k = len(jump.times)
        applied = bisect_right(jump.ends, now, jump.applied)
        if jump.finishing and applied >= k:
            applied = k - 1
        return applied, max(jump.allocated, min(applied + 1, k))

    def unapplied(self, replica: int, now: float) -> tuple[int, Callable[[], int] | None]:
        """Output tokens of the iterations of the replica's jump in flight (`active`) that ran
        by `now` but are not applied yet, and a pure function giving the KV blocks of those
        that ran or are in flight (what a view of the replica adds: `Cluster.unapplied`; the
        blocks cost a pass over the batch, so a view counts them only when read); (0, None)
        without a jump."""
        jump = self.active.get(replica)
        if jump is None:
            return 0, None
        applied, allocated = self._progress(jump, now)
        start_tokens, before = jump.start_tokens, jump.allocated  # (never changed in place)
        bt = jump.rep.memory.block_tokens

        def blocks() -> int:
            if allocated <= before:
                return 0
            return sum(_new_blocks(c, before, allocated, bt) for c in start_tokens)

        return len(jump.batch.requests) * (applied - jump.applied), blocks

    def materialize(self, jump: Jump, now: float) -> None:
        """Apply every iteration that ended by `now`; allocate the blocks of the one in flight.
        The state afterwards is the one stepping every iteration would have at `now`: blocks
        are allocated and registered per request for the whole stretch (a request needs a
        block when its computed tokens fill whole blocks), per iteration only where the
        order could matter (`Jump.fills`)."""
        first, allocated_before = jump.applied, jump.allocated
        applied, allocated = self._progress(jump, now)
        if applied == first and allocated == allocated_before:
            return
        rep = jump.rep
        mem = rep.memory
        bt = mem.block_tokens
        reqs = jump.batch.requests
        if jump.fills is None:
            if allocated > allocated_before:
                needs = [(r.id, n) for r, c in zip(reqs, jump.start_tokens, strict=True)
                         if (n := _new_blocks(c, allocated_before, allocated, bt))]
                if needs:
                    mem.allocate_each(needs)
            if applied > first and mem.config.prefix_caching:
                for r, c in zip(reqs, jump.start_tokens, strict=True):
                    if (c + applied) // bt > (c + first) // bt:  # a block filled
                        rep.register_blocks(r, c + first, c + applied)
        else:  # iteration by iteration, as stepping: allocate for i, then register what i filled
            for i in range(first, allocated):
                if i >= allocated_before:
                    for r, c in zip(reqs, jump.start_tokens, strict=True):
                        if (c + i) % bt == 0:
                            mem.allocate(r.id, 1)
                if i < applied:
                    for r, c in jump.fills.get(i, ()):
                        rep.register_blocks(r, c + i, c + i + 1)
        jump.applied, jump.allocated = applied, allocated
        if allocated > allocated_before:  # an observer sees the one in flight as scheduled
            rep.mark_scheduled(jump.batch, allocated - allocated_before)
        if applied > first:
            times = jump.times[first:applied]
            rep.complete_repeated(jump.batch, times, self.starts(jump, first, applied), first)
            rep.advance_tokens(jump.batch, applied - first)  # (their seconds: `add_times`)
            self.jumped_iterations += applied - first

    @staticmethod
    def add_times(jump: Jump) -> None:
        """Add the seconds of the applied iterations to the requests' `executing_s`, which
        `materialize` leaves behind (one sum per request per jump instead of one per
        observation; the same additions in the same order): before the jump's last iteration
        (`finish`) and whenever the driver brings every replica up to date (`observe_all`)."""
        if jump.applied > jump.timed:
            jump.rep.add_executing(jump.batch, jump.times[jump.timed:jump.applied])
            jump.timed = jump.applied

    @staticmethod
    def starts(jump: Jump, first: int, last: int) -> list[float]:
        """When iterations `first .. last - 1` of the jump start."""
        if first == 0:
            return [jump.start_s, *jump.ends[:last - 1]]
        return jump.ends[first - 1:last - 1]

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
        self.add_times(jump)
        k = len(jump.times)
        if not jump.finishing or jump.applied != k - 1 or jump.ends[-1] > now:
            return []
        assert jump.allocated == k
        b = jump.batch
        last = Batch(replica=b.replica, step=b.step + k - 1, mode=b.mode, merged_adapter=b.merged_adapter,
                     items=tuple(BatchItem(r.id, r.adapter_id, r.computed_tokens, 1, True) for r in b.requests),
                     requests=b.requests, forced_by_credit=b.forced_by_credit)
        # the policy is told as for every iteration of the jump (its plan was not asked again)
        jump.rep.policy.observe_repeated(b, jump.times[-1:], self.starts(jump, k - 1, k), k - 1)
        finished = jump.rep.complete(last, StepResult(jump.times[-1]), jump.ends[-1], observe=False)
        jump.applied = k
        self.jumped_iterations += 1
        return finished
