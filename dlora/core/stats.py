"""Per-replica counters that make every decision visible in the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

    def record_step(self, batch: Batch, result: StepResult, repeat: int = 1) -> None:
        self.iterations += repeat
        if batch.mode == BatchMode.MERGED:
            self.merged_iterations += repeat
        else:
            self.unmerged_iterations += repeat
        self.switches += int(batch.is_switch)
        self.credit_forced_batches += int(batch.forced_by_credit)
        self.busy_s += result.elapsed_s
        self.switch_s += result.switch_s
        self.load_s += result.load_s
        self.swap_s += result.swap_s
        self.adapter_loads += len(batch.load_adapters)
        self.batched_requests += len(batch.items) * repeat
        self.failed_steps += int(result.error is not None)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)
