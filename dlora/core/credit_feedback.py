"""The credit policy's feedback (`credit.py`'s module docstring): `observe` applies the decision
`plan` made to the credits (its transfers, in order, with the same float operations as one
payer -= amount, payee += amount each), the bench, the creditors and the adapters in service,
and counts it. A mixin of `CreditPolicy`, kept apart by concern."""

from __future__ import annotations

from collections import Counter
from functools import reduce
from operator import add
from typing import TYPE_CHECKING, Any

from ..types import Batch, StepResult

if TYPE_CHECKING:
    from .credit import _Decision
    from .credit_aimd import Key

_NOBODY: frozenset[Key] = frozenset()


def _deltas(transfers: tuple[tuple[Key, Key, float], ...]) -> dict[Key, tuple[float, ...]]:
    """Per adapter a decision's transfers move, the changes to its credit in transfer order."""
    out: dict[Key, list[float]] = {}
    for payer, payee, amount in transfers:
        out.setdefault(payer, []).append(-amount)
        out.setdefault(payee, []).append(amount)
    return {k: tuple(v) for k, v in out.items()}


class CreditFeedback:
    if TYPE_CHECKING:  # provided by CreditPolicy
        p: Any  # CreditParams
        credits: dict[Key, float]
        benched: frozenset[Key]
        serving: frozenset[Key]
        counts: Counter[str]
        _above: set[Key]
        _resume: Key
        _memo: _Decision | None
        _memo_step: int
        _parties: tuple[tuple[tuple[Key, Key, float], ...], dict[Key, tuple[float, ...]]] | None

        def credit(self, adapter: Key) -> float: ...

        def _commit_skips(self) -> None: ...

        def _boundary(self, batch: Batch) -> None: ...

        def _count(self, d: _Decision, iterations: int = 1) -> None: ...

    def observe(self, batch: Batch, result: StepResult) -> None:
        d = self._memo
        if d is None or self._memo_step != batch.step or result.error is not None:
            return
        self._observe(d, batch)

    def _observe(self, d: _Decision, batch: Batch) -> None:
        self._commit_skips()
        self._resume = d.resume
        if not d.forced:  # forced service interrupts an episode, it does not end it (no AIMD verdict)
            self._boundary(batch)
        if (batch.mode, batch.merged_adapter) != (d.mode, d.adapter):
            return  # the replica ran its fallback (nothing of the plan fitted): no credit moves
        self._apply(d, batch)

    def _move_credits(self, d: _Decision) -> None:
        """The credit state after the iteration of decision `d` (its transfers, the bench and
        the adapters in service)."""
        p = self.p
        if d.transfers:
            credits = self.credits
            start, floor = p.credit_start, p.credit_floor
            get = credits.get
            # each adapter's credit takes its deltas in transfer order: the float operations of
            # one payer -= amount, payee += amount per transfer (x - a is x + (-a) exactly)
            by_adapter = self._deltas_of(d.transfers)
            for k, deltas in by_adapter.items():
                credits[k] = reduce(add, deltas, get(k, start))
            moved = by_adapter.keys()
            # only the adapters whose credit moved can enter or leave the bench (for the others
            # the rule gives what it gave last time) or the creditors
            benched = self.benched
            changed = [k for k in moved if (credits[k] < floor or (k in benched and credits[k] < start)) != (k in benched)]
            if changed:
                self.benched = benched.symmetric_difference(changed)
            above = self._above
            for k in moved:
                if credits[k] > start:
                    above.add(k)
                else:
                    above.discard(k)
        if d.serving and (d.transfers or not d.forced):
            self.serving = frozenset(k for k in d.serving if self.credit(k) >= self.p.credit_release)
        else:  # (a merged or plain plan serves nobody; a forced one without transfers ends service)
            self.serving = _NOBODY

    def _deltas_of(self, transfers: tuple[tuple[Key, Key, float], ...]) -> dict[Key, tuple[float, ...]]:
        """`_deltas(transfers)`, kept for the last transfers seen (a repeat moves the same ones
        every iteration)."""
        memo = self._parties
        if memo is None or (memo[0] is not transfers and memo[0] != transfers):
            # (equal transfers, built anew by each plan of a plain FCFS run, move the same
            # deltas; their amounts are never zero, so equal floats are the same floats)
            memo = self._parties = (transfers, _deltas(transfers))
        return memo[1]

    def _apply(self, d: _Decision, batch: Batch) -> None:
        self._move_credits(d)
        if d.forced:
            self.counts["credit_forced_batches"] += 1
        self.counts["credit_transfers"] += len(d.transfers)
        self._count(d)
