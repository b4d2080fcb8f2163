"""Repeated identical pure-decode iterations, applied at once (the simulator's fast path).

A mixin of `ReplicaScheduler`, kept apart for size: the same counters, with the same float
additions in the same order, as `_admit` and `complete` once per iteration, so the fast path
asks the core to apply its jumped iterations instead of mirroring the core's accounting."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from operator import add
from typing import TYPE_CHECKING

from ..types import Batch

if TYPE_CHECKING:
    from .batching import BatchPolicy
    from .stats import ReplicaStats
    from .work import WorkEstimator


class RepeatedDecode:
    step: int
    adapter_last_used: dict[int, int]
    stats: ReplicaStats
    work: WorkEstimator
    policy: BatchPolicy

    def mark_scheduled(self, batch: Batch, count: int) -> None:
        """Count `count` more iterations of a repeated pure-decode `batch` as scheduled, as
        `_admit` does for each (the step counter, its adapters' last use); their KV blocks are
        the caller's to allocate (the simulator's fast path)."""
        self.step += count
        for it in batch.items:
            if it.adapter_id is not None:
                self.adapter_last_used[it.adapter_id] = self.step - 1

    def complete_repeated(self, batch: Batch, times: Sequence[float], starts: Sequence[float],
                          first: int = 0) -> None:
        """`complete` for `len(times)` identical pure-decode iterations of `batch` (these
        durations, starting at `starts`; iterations `first ..` of the repeat) that finish no
        request, for the replica's own counters: those of `complete`, through the same function
        (`ReplicaStats.record_iterations`), for the simulator's fast path (prefix blocks are
        registered by the caller between iterations, as `complete` would). The requests' own
        counters follow in `advance_tokens` (before anything reads those requests; views read
        only the replica's) and `add_executing` (possibly later, in pieces: the additions stay
        in order)."""
        self.stats.record_iterations(batch, times)
        self.work.generated_tokens += len(batch.requests) * len(times)
        self.policy.observe_repeated(batch, times, starts, first)

    @staticmethod
    def advance_tokens(batch: Batch, done: int) -> None:
        """The requests' token counters after `done` more iterations of `batch`."""
        for r in batch.requests:
            r.computed_tokens += done
            r.generated_tokens += done

    @staticmethod
    def add_executing(batch: Batch, times: Sequence[float]) -> None:
        """The requests' executing seconds after iterations of these durations (in order; a
        caller may add them later than the tokens, before anything reads `executing_s`, which
        only the report does and `complete` adds to)."""
        for r in batch.requests:
            r.executing_s = reduce(add, times, r.executing_s)

