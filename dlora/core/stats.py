"""Per-replica counters that make every decision visible in the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from operator import add

from ..types import Batch, BatchMode, StepResult


@dataclass(slots=True)
class ReplicaStats:
    iterations: int = 0
    merged_iterations: int = 0
    unmerged_iterations: int = 0
    switches: int = 0
    credit_forced_batches: int = 0
    busy_s: float = 0.0
    switch_s: float = 0.0
    load_s: float = 0.0
    swap_s: float = 0.0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    swaps: int = 0
    recomputes: int = 0
    prefix_query_tokens: int = 0  # prompt tokens of admitted requests (prefix caching on)
    prefix_hit_tokens: int = 0  # of them, found in the prefix cache
    preempting_iterations: int = 0  # iterations that preempted (they admit nothing new)
    failed_steps: int = 0
    finished: int = 0
    batched_requests: int = 0
    migrated_in: int = 0
    migrated_out: int = 0

    def record_step(self, batch: Batch, result: StepResult) -> None:
        """The counters of one executed iteration."""
        self.record_iterations(batch, (result.elapsed_s,))
        self.switches += int(batch.is_switch)
        self.switch_s += result.switch_s
        self.load_s += result.load_s
        self.swap_s += result.swap_s
        self.adapter_loads += len(batch.load_adapters)
        self.failed_steps += int(result.error is not None)

    def record_iterations(self, batch: Batch, elapsed_s: Sequence[float]) -> None:
        """The counters every iteration of `batch` moves, for `len(elapsed_s)` of them that
        took these seconds (added in order): one from `record_step`, or the repeated
        pure-decode iterations of a fast-path jump (`RepeatedDecode.complete_repeated`), which
        so count exactly as stepping them."""
        n = len(elapsed_s)
        self.iterations += n
        if batch.mode == BatchMode.MERGED:
            self.merged_iterations += n
        else:
            self.unmerged_iterations += n
        self.credit_forced_batches += n * int(batch.forced_by_credit)
        self.busy_s = reduce(add, elapsed_s, self.busy_s)
        self.batched_requests += len(batch.items) * n

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)
