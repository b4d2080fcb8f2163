"""The credit policy's wait trigger (`max_skip_s`, `credit.py`'s module docstring): skip clocks
of the requests in B_fcfs a plan leaves out, and the adapters whose requests waited too long,
served for one iteration. A mixin of `CreditPolicy`, kept apart for size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .batching import Plan, QueueView

if TYPE_CHECKING:
    from .credit import _Decision
    from .credit_aimd import Key


class WaitTrigger:
    if TYPE_CHECKING:  # provided by CreditPolicy
        p: Any  # CreditParams
        serving: frozenset[Key]
        max_skip_wait_s: float
        _skipped_since: dict[int, float]
        _skips_next: dict[int, float]
        _skips_now: float

        def _decide(self, queue: QueueView) -> tuple[Plan, _Decision]: ...

    def _overdue(self, queue: QueueView, now: float) -> frozenset[Key]:
        """Adapters with a request in B_fcfs skipped for `max_skip_s` seconds in a row."""
        limit = self.p.max_skip_s
        if limit is None or not self._skipped_since:
            return frozenset()
        since = self._skipped_since
        return frozenset(r.adapter_id for r in queue.requests[: queue.max_batch_size]
                         if r.id in since and now - since[r.id] >= limit)

    def _decide_with(self, queue: QueueView, overdue: frozenset[Key]) -> tuple[Plan, _Decision]:
        """`_decide` with the overdue adapters served for this one iteration (the plan includes
        their overdue requests, which resets their clocks); unlike a credit that fired, no
        hysteresis keeps them served afterwards (a long forced stretch is what costs). Pure."""
        if not overdue:
            return self._decide(queue)
        saved = self.serving
        self.serving = saved | overdue
        try:
            plan, d = self._decide(queue)
        finally:
            self.serving = saved
        return plan, d._replace(serving=d.serving - (overdue - saved))

    def _skip_clocks(self, queue: QueueView, plan: Plan, now: float) -> dict[int, float]:
        """Skip clocks after `plan`: B_fcfs requests the plan leaves out keep (or start) theirs."""
        if self.p.max_skip_s is None:
            return {}
        planned = {r.id for r in plan.requests}
        since = self._skipped_since
        return {r.id: since.get(r.id, now) for r in queue.requests[: queue.max_batch_size]
                if r.id not in planned}

    def _commit_skips(self) -> None:
        """`observe`: the plan ran, its skip clocks hold (and the longest skip so far is noted)."""
        self._skipped_since = self._skips_next
        if self._skips_next:
            self.max_skip_wait_s = max(self.max_skip_wait_s, self._skips_now - min(self._skips_next.values()))
