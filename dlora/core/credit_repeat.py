"""The credit policy's repeats (the simulator's fast path, `sim/fastpath.py`): how many
iterations in a row it would plan the same batch while its credits move, and the feedback of
those iterations (`CreditFeedback`, which it builds on) applied at once, with the same
decisions and float operations as stepping them. A mixin of `CreditPolicy`, kept apart for
size."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..types import Batch
from .batching import Plan, QueueView
from .credit_feedback import CreditFeedback

if TYPE_CHECKING:
    from .credit import _Decision
    from .credit_aimd import Key, _Episode

REPEAT_LOOKAHEAD = 256  # iterations `repeats` runs a credit-moving plan ahead
_EXACT = 2.0 ** 52  # whole numbers below this add up exactly in floats


class CreditRepeats(CreditFeedback):
    if TYPE_CHECKING:  # provided by CreditPolicy (the feedback's state and steps: CreditFeedback)
        episode: _Episode | None
        max_skip_wait_s: float
        _memo_queue: QueueView | None
        _skipped_since: dict[int, float]
        _skips_next: dict[int, float]
        _skips_now: float
        _ahead: tuple[QueueView, list[tuple[_Decision, dict[int, float], float]]] | None
        _nets: tuple[tuple[tuple[Key, Key, float], ...], dict[Key, tuple[float, float]] | None] | None

        def plan(self, queue: QueueView, now: float) -> Plan: ...

        def _decide_with(self, queue: QueueView, overdue: frozenset[Key]) -> tuple[Plan, _Decision]: ...

        def _overdue(self, queue: QueueView, now: float) -> frozenset[Key]: ...

        def _skip_clocks(self, queue: QueueView, plan: Plan, now: float) -> dict[int, float]: ...

        def _settle(self, in_batch: Counter[Key]) -> tuple[tuple[Key, Key, float], ...]: ...

        def _queue_facts(self, queue: QueueView) -> Any: ...

    def repeats(self, queue: QueueView, plan: Plan, starts: Sequence[float]) -> int:
        """Iterations in a row (from the one `plan` was just made for, at `starts[0]`) that
        would plan exactly `plan` again, the queue unchanged. A plan that moves no credit and
        crosses no episode boundary repeats for ever; one that moves credit (transfers, forced
        service) repeats while its credits stay on the same side of every threshold, which is
        found by running the decisions ahead on a copy of the credit state (at most
        `REPEAT_LOOKAHEAD` iterations)."""
        d = self._memo if queue is self._memo_queue else None
        if d is None:
            return 1
        ep = self.episode
        if not d.forced and (ep is None or (ep.mode, ep.adapter) != (d.mode, d.adapter)):
            return 1  # its iteration ends an episode, whose verdict may move the thresholds
        if not d.forced and not d.transfers:
            return len(starts)  # stationary: no credit moves and no skip clock starts
        limit = min(len(starts), REPEAT_LOOKAHEAD)
        ids = [id(r) for r in plan.requests]
        ahead: list[tuple[_Decision, dict[int, float], float]] = []
        saved = (self.credits, self._above, self.benched, self.serving, self._resume, self._skipped_since,
                 self._skips_next, self._skips_now, self.max_skip_wait_s)
        self.credits, self._above = dict(self.credits), set(self._above)
        try:
            j = 1
            while j < limit:
                run = self._same_run(d, starts, j, limit)
                if run:  # iterations j .. j + run - 1 decide `d` again, found at once
                    ahead.extend([(d, self._skips_next, starts[i]) for i in range(j, j + run)])
                    j += run
                    continue
                self._commit_skips()  # `observe` of iteration j - 1 ...
                self._resume = d.resume
                now = starts[j]  # ... and `plan` of iteration j
                again = self._same_decision_after_move(d, queue, now)
                if again is not None:
                    # the decision of iteration j - 1 again (`_same_decision_after_move`): its
                    # skip clocks too (the same skipped requests, whose clocks already run)
                    d = again
                    self._skips_now = now
                    ahead.append((d, self._skips_next, now))
                    j += 1
                    continue
                p, d = self._decide_with(queue, self._overdue(queue, now))
                if (p.mode != plan.mode or p.merged_adapter != plan.merged_adapter
                        or p.forced_by_credit != plan.forced_by_credit or [id(r) for r in p.requests] != ids):
                    return j
                self._skips_next, self._skips_now = self._skip_clocks(queue, p, now), now
                ahead.append((d, self._skips_next, now))
                j += 1
            return limit
        finally:
            self._ahead = (queue, ahead)  # (the state evolves as here until a new `plan`)
            (self.credits, self._above, self.benched, self.serving, self._resume, self._skipped_since,
             self._skips_next, self._skips_now, self.max_skip_wait_s) = saved

    def _sides(self, c: float) -> tuple[bool, bool, bool, bool, bool]:
        """Where credit `c` stands against each threshold `_decide` reads (floor, start from
        both sides, fire, release): a decision is the same while no moved credit changes side."""
        p = self.p
        return (c < p.credit_floor, c < p.credit_start, c > p.credit_start, c >= p.credit_fire,
                c >= p.credit_release)

    def _nets_of(self, transfers: tuple[tuple[Key, Key, float], ...]) -> dict[Key, tuple[float, float]] | None:
        """Per adapter the transfers move, (the net change to its credit, the sum of the
        changes' sizes), when every change is a whole number (else None); kept for the last
        transfers seen."""
        memo = self._nets
        if memo is None or (memo[0] is not transfers and memo[0] != transfers):  # (as `_deltas_of`)
            deltas = self._deltas_of(transfers)
            whole = all(float(x).is_integer() for ds in deltas.values() for x in ds)
            memo = self._nets = (transfers, {k: (sum(ds), sum(map(abs, ds))) for k, ds in deltas.items()}
                                 if whole else None)
        return memo[1]

    def _exact_moves(self, d: _Decision, moves: int) -> dict[Key, float] | None:
        """The net change per iteration of each credit `d` moves, when `moves` iterations of
        it add up exactly: every credit it moves and every change a whole number, far from
        2**52, so that each partial sum is exact and `moves` iterations give `credit + moves *
        net` (the float of adding the changes one by one, as `_move_credits` does). Else None."""
        nets = self._nets_of(d.transfers)
        if nets is None:
            return None
        get, start = self.credits.get, self.p.credit_start
        for k, (_, size) in nets.items():
            c = get(k, start)
            if not (float(c).is_integer() and abs(c) + size * moves < _EXACT):
                return None
        return {k: net for k, (net, _) in nets.items()}

    def _same_run(self, d: _Decision, starts: Sequence[float], j: int, limit: int) -> int:
        """How many of iterations `j .. limit - 1` in a row `_same_decision_after_move` would
        find to decide `d` again, found at once when the credits move exactly (`_exact_moves`):
        iteration `j + i` does iff, after `i + 1` moves, no moved credit is on another side of a
        threshold (each side is monotone in the number of moves: a binary search) and no
        skipped request is overdue at `starts[j + i]`. The state is then left as after those
        iterations (their skip clocks committed, their credits moved). 0 when it cannot tell
        (the iterations are then checked one by one)."""
        if d.forced or not d.transfers or d.serving or self.serving or d.adapter is None:
            return 0
        run = limit - j
        nets = self._exact_moves(d, run)
        if nets is None:
            return 0
        p = self.p
        start, sides = p.credit_start, self._sides
        credits = self.credits
        before = {k: credits.get(k, start) for k in nets}
        for k, net in nets.items():
            c = before[k]
            same = sides(c)
            if net == 0 or sides(c + run * net) == same:
                continue
            lo, hi = 1, run  # the first number of moves that changes a side: in 1 .. run
            while lo < hi:
                mid = (lo + hi) // 2
                if sides(c + mid * net) != same:
                    hi = mid
                else:
                    lo = mid + 1
            run = lo - 1
            if run == 0:
                return 0
        limit_s, since = p.max_skip_s, self._skips_next  # (the clocks the next commit keeps)
        if limit_s is not None and since:
            first = min(since.values())
            run = bisect_left(starts, True, j, j + run, key=lambda t: t - first >= limit_s) - j
            if run == 0:
                return 0
        if run >= 2:
            self._skips_now = starts[j + run - 2]  # the last commit's (the longest skip)
        self._commit_skips()
        self._resume = d.resume
        for k, net in nets.items():
            credits[k] = before[k] + run * net
        self._skips_now = starts[j + run - 1]
        return run

    def _same_decision_after_move(self, d: _Decision, queue: QueueView, now: float) -> _Decision | None:
        """Move the credits of decision `d` (`_move_credits`) and give the next decision when
        it is `d` again up to its transfers, without deciding again (else None). For a plan
        that serves nobody, merged or plain FCFS: `_decide` reads the credits only through
        their side of the thresholds (floor, start, fire, release), the bench, the service set
        and the overdue adapters. If no adapter whose credit moved crossed a threshold, the
        bench and the creditors stay as they were (the bench rule is idempotent), nobody is in
        service, and no skipped request is overdue at `now`, then `_decide` makes the same
        plan: a merged plan with the same transfers (fixed by the queue), so `d` itself; a
        plain FCFS plan with the transfers that settle debts now (`_settle`, which reads the
        credits' values). The skip clocks are unchanged too (the same requests skipped, their
        clocks already started; FCFS skips nobody)."""
        if d.forced or d.serving or self.serving or (d.adapter is not None and not d.transfers):
            self._move_credits(d)
            return None
        p = self.p
        moved = self._deltas_of(d.transfers).keys()
        get, start, sides = self.credits.get, p.credit_start, self._sides
        before = [sides(get(k, start)) for k in moved]
        self._move_credits(d)
        if self.serving or [sides(get(k, start)) for k in moved] != before:
            return None
        limit = p.max_skip_s
        since = self._skipped_since  # (the clocks of the requests `d` skips, all started)
        # (the earliest clock is the first overdue: subtraction is monotonic)
        if limit is not None and since and now - min(since.values()) >= limit:
            return None
        if d.adapter is not None:
            return d
        transfers = self._settle(self._queue_facts(queue).in_fcfs)
        return d if transfers == d.transfers else d._replace(transfers=transfers)

    def observe_repeated(self, batch: Batch, times: Sequence[float], starts: Sequence[float],
                         first: int = 0) -> None:
        """`plan` and `observe` for iterations `first ..` of a repeat of `batch` (`repeats`):
        a stationary plan moves no credit, so only the episode counters advance (the same float
        operations, one iteration at a time) and the skip clocks are committed as `observe`
        commits them (a stationary plan skips nobody: every clock stops); otherwise each
        iteration is planned at its start and observed, exactly as stepping does."""
        d = self._memo
        if d is None or not times:
            return
        if not d.forced and not d.transfers:
            self._commit_skips()
            self._resume = d.resume  # as `observe` (a stationary plan follows no forced service)
            self._count(d, len(times))
            return
        queue = self._memo_queue
        assert queue is not None
        ahead = self._ahead[1] if self._ahead is not None and self._ahead[0] is queue else []
        i = 0
        while i < len(times):
            j = first + i  # the iteration of the repeat
            step = batch.step + j
            if self._memo is None or self._memo_step != step:
                if 0 < j <= len(ahead) and ahead[j - 1][2] == starts[i]:
                    # as `repeats` planned it: the same state, so the same `plan`
                    run = self._observe_run(batch, ahead, j, starts, i, len(times) - i)
                    if run:
                        i += run
                        continue
                    d, self._skips_next, self._skips_now = ahead[j - 1]
                    self._memo, self._memo_step = d, step
                else:
                    self.plan(queue._replace(step=step), starts[i])
                    ahead = []
            d = self._memo
            assert d is not None
            self._observe(d, batch)
            i += 1

    def _observe_run(self, batch: Batch, ahead: list[tuple[_Decision, dict[int, float], float]], j: int,
                     starts: Sequence[float], i: int, most: int) -> int:
        """Iterations `j ..` of the repeat (`starts[i] ..`), as `repeats` planned them, observed
        at once where they are one decision again and again that moves credit exactly
        (`_exact_moves`): the skip clocks committed once (the same clocks, the latest commit
        the longest skip), the episode counted for all, each credit moved by the number of
        iterations times its net change but the last move, which `_move_credits` makes (it
        alone can cross a threshold: `repeats` found the ones before it to change no side).
        Returns how many it observed (0: none, they go one by one)."""
        d, skips, _ = ahead[j - 1]
        if (d.forced or not d.transfers or d.serving or self.serving
                or (batch.mode, batch.merged_adapter) != (d.mode, d.adapter)):
            return 0
        run = 1
        while (run < most and j + run <= len(ahead) and ahead[j + run - 1][0] is d
               and ahead[j + run - 1][1] is skips and ahead[j + run - 1][2] == starts[i + run]):
            run += 1
        if run < 2:
            return 0
        nets = self._exact_moves(d, run)
        if nets is None:
            return 0
        self._skips_next, self._skips_now = skips, starts[i + run - 1]
        self._memo, self._memo_step = d, batch.step + j + run - 1
        self._commit_skips()
        self._resume = d.resume
        self._boundary(batch)
        credits, get, start = self.credits, self.credits.get, self.p.credit_start
        for k, net in nets.items():
            credits[k] = get(k, start) + (run - 1) * net
        self._move_credits(d)
        self.counts["credit_transfers"] += len(d.transfers) * run
        self._count(d, run)
        return run
