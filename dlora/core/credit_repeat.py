"""The credit policy's repeats (the simulator's fast path, `sim/fastpath.py`): how many
iterations in a row it would plan the same batch while its credits move, and the feedback of
those iterations applied at once, with the same decisions and float operations as stepping
them. A mixin of `CreditPolicy`, kept apart for size."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..types import Batch
from .batching import Plan, QueueView

if TYPE_CHECKING:
    from .credit import _Decision
    from .credit_aimd import Key, _Episode

REPEAT_LOOKAHEAD = 256  # iterations `repeats` runs a credit-moving plan ahead


class CreditRepeats:
    if TYPE_CHECKING:  # provided by CreditPolicy
        p: Any  # CreditParams
        credits: dict[Key, float]
        benched: frozenset[Key]
        serving: frozenset[Key]
        episode: _Episode | None
        max_skip_wait_s: float
        _above: set[Key]
        _resume: Key
        _memo: _Decision | None
        _memo_queue: QueueView | None
        _memo_step: int
        _skipped_since: dict[int, float]
        _skips_next: dict[int, float]
        _skips_now: float
        _ahead: tuple[QueueView, list[tuple[_Decision, dict[int, float], float]]] | None

        def plan(self, queue: QueueView, now: float) -> Plan: ...

        def _decide_with(self, queue: QueueView, overdue: frozenset[Key]) -> tuple[Plan, _Decision]: ...

        def _overdue(self, queue: QueueView, now: float) -> frozenset[Key]: ...

        def _skip_clocks(self, queue: QueueView, plan: Plan, now: float) -> dict[int, float]: ...

        def _commit_skips(self) -> None: ...

        def _move_credits(self, d: _Decision) -> None: ...

        def _deltas_of(self, transfers: tuple[tuple[Key, Key, float], ...]) -> dict[Key, tuple[float, ...]]: ...

        def _observe(self, d: _Decision, batch: Batch) -> None: ...

        def _count(self, d: _Decision, iterations: int = 1) -> None: ...

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
            for j in range(1, limit):
                self._commit_skips()  # `observe` of iteration j - 1 ...
                self._resume = d.resume
                now = starts[j]  # ... and `plan` of iteration j
                if self._same_decision_after_move(d, queue, now):
                    # the decision of iteration j - 1 again (`_same_decision_after_move`): its
                    # skip clocks too (the same skipped requests, whose clocks already run)
                    self._skips_now = now
                    ahead.append((d, self._skips_next, now))
                    continue
                p, d = self._decide_with(queue, self._overdue(queue, now))
                if (p.mode != plan.mode or p.merged_adapter != plan.merged_adapter
                        or p.forced_by_credit != plan.forced_by_credit or [id(r) for r in p.requests] != ids):
                    return j
                self._skips_next, self._skips_now = self._skip_clocks(queue, p, now), now
                ahead.append((d, self._skips_next, now))
            return limit
        finally:
            self._ahead = (queue, ahead)  # (the state evolves as here until a new `plan`)
            (self.credits, self._above, self.benched, self.serving, self._resume, self._skipped_since,
             self._skips_next, self._skips_now, self.max_skip_wait_s) = saved

    def _same_decision_after_move(self, d: _Decision, queue: QueueView, now: float) -> bool:
        """Move the credits of decision `d` (`_move_credits`) and say whether the next decision
        is `d` itself, without deciding again. Only for a merged plan that moves credit and
        serves nobody: its transfers are fixed by the queue, and `_decide` reads the credits
        only through their side of the thresholds (floor, start, fire, release), the bench,
        the service set and the overdue adapters. If no adapter whose credit moved crossed a
        threshold, the bench and the creditors stay as they were (the bench rule is
        idempotent), nobody is in service, and no skipped request is overdue at `now`, then
        `_decide` gives `d` again; the skip clocks too are unchanged (the same requests
        skipped, their clocks already started)."""
        if d.forced or not d.transfers or d.serving or self.serving or d.adapter is None:
            self._move_credits(d)
            return False
        p = self.p
        floor, start, fire, release = p.credit_floor, p.credit_start, p.credit_fire, p.credit_release
        moved = self._deltas_of(d.transfers).keys()
        get = self.credits.get

        def sides() -> list[tuple[bool, bool, bool, bool, bool]]:
            return [(c < floor, c < start, c > start, c >= fire, c >= release)
                    for c in (get(k, start) for k in moved)]

        before = sides()
        self._move_credits(d)
        if self.serving or sides() != before:
            return False
        limit = p.max_skip_s
        since = self._skipped_since  # (the clocks of the requests `d` skips, all started)
        # (the earliest clock is the first overdue: subtraction is monotonic)
        return limit is None or not since or now - min(since.values()) < limit

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
        for i in range(len(times)):
            j = first + i  # the iteration of the repeat
            step = batch.step + j
            if self._memo is None or self._memo_step != step:
                if 0 < j <= len(ahead) and ahead[j - 1][2] == starts[i]:
                    # as `repeats` planned it: the same state, so the same `plan`
                    d, self._skips_next, self._skips_now = ahead[j - 1]
                    self._memo, self._memo_step = d, step
                else:
                    self.plan(dataclasses.replace(queue, step=step), starts[i])
                    ahead = []
            d = self._memo
            assert d is not None
            self._observe(d, batch)
