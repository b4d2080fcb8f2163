"""The credit policy's adaptive thresholds (AIMD; PAPER.md section 2, and `credit.py`'s module
docstring): episodes between switches are judged by the throughput each mode would have had,
and `merge_left` / `merge_right` move accordingly. A mixin of `CreditPolicy`, kept apart for
size."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..types import Batch, BatchMode

if TYPE_CHECKING:
    from .credit import _Decision

Key = int | None  # adapter id; None is the base model (never merged)


@dataclass(slots=True)
class _Episode:
    mode: BatchMode
    adapter: Key
    merged_tokens: float = 0.0
    merged_s: float = 0.0
    fcfs_tokens: float = 0.0
    fcfs_s: float = 0.0
    iterations: int = 0



class AimdThresholds:
    p: Any  # CreditParams
    episode: _Episode | None
    counts: Counter[str]
    merge_left: float
    merge_right: float
    threshold_changes: int
    trajectory: deque[tuple[int, float, float, str]]

    if TYPE_CHECKING:  # provided by CreditPolicy (profile timings)
        def _time(self, n: int, adapters: int, rank_tokens: int) -> float: ...

        def _switch_s(self, unmerge: Key, merge: Key) -> float: ...

    def _boundary(self, batch: Batch) -> None:
        key = (batch.mode, batch.merged_adapter)
        ep = self.episode
        if ep is not None and (ep.mode, ep.adapter) == key:
            return
        if ep is not None:
            self._aimd(ep, batch.step)
        self.episode = _Episode(batch.mode, batch.merged_adapter)
        self.counts["episodes"] += 1
        # the switch entering this episode: paid by the side that runs, avoided by the other
        if batch.is_switch:
            cost = self._switch_s(batch.unmerge_adapter, batch.merge_adapter)
            if batch.mode == BatchMode.MERGED:
                self.episode.merged_s += cost
            else:
                self.episode.fcfs_s += cost

    def _count(self, d: _Decision, iterations: int = 1) -> None:
        """The episode's counters after `iterations` iterations of decision `d` (the seconds
        added one iteration at a time: the same float operations as one call per iteration)."""
        ep = self.episode
        if ep is None or d.forced or iterations <= 0:
            return
        ep.iterations += iterations
        ep.merged_tokens += d.merged_cf * iterations
        ep.fcfs_tokens += d.fcfs_n * iterations
        merged_t = self._time(d.merged_cf, 0, 0)
        fcfs_t = self._time(d.fcfs_n, d.fcfs_adapters, d.fcfs_rank_tokens)
        merged_s, fcfs_s = ep.merged_s, ep.fcfs_s
        for _ in range(iterations):
            merged_s += merged_t
            fcfs_s += fcfs_t
        ep.merged_s, ep.fcfs_s = merged_s, fcfs_s

    def _aimd(self, ep: _Episode, step: int) -> None:
        if not self.p.aimd or ep.iterations == 0:
            return
        merged_tput = ep.merged_tokens / ep.merged_s if ep.merged_s > 0 else 0.0
        fcfs_tput = ep.fcfs_tokens / ep.fcfs_s if ep.fcfs_s > 0 else 0.0
        p = self.p
        if ep.mode == BatchMode.MERGED:
            won = merged_tput >= fcfs_tput
            self.counts["merged_episodes_won" if won else "merged_episodes_lost"] += 1
            new = max(self.merge_left, self.merge_right - p.aimd_add) if won else \
                min(p.merge_right_max, self.merge_right * p.aimd_factor)
            self._set(step, self.merge_left, max(new, self.merge_left), "merged won" if won else "merged lost")
        else:
            won = fcfs_tput >= merged_tput
            self.counts["unmerged_episodes_won" if won else "unmerged_episodes_lost"] += 1
            new = min(self.merge_right, self.merge_left + p.aimd_add) if won else \
                max(p.merge_left_min, self.merge_left / p.aimd_factor)
            self._set(step, min(new, self.merge_right), self.merge_right,
                      "unmerged won" if won else "unmerged lost")

    def _set(self, step: int, left: float, right: float, why: str) -> None:
        if (left, right) == (self.merge_left, self.merge_right):
            return
        self.merge_left, self.merge_right = left, right
        self.threshold_changes += 1
        self.trajectory.append((step, left, right, why))
