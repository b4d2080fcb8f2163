"""ProfiledExecutor: the simulator's side of the executor seam. It predicts a batch's seconds
from the latency profile instead of running a model."""

from __future__ import annotations

from ..latency import LatencyModel
from ..types import Adapter, Batch, StepResult


class ProfiledExecutor:
    """elapsed = switch + (max(compute, load) if loads overlap compute else compute + load)
    + swap (not overlapped) + KV transfer in (not overlapped)."""

    def __init__(self, latency: LatencyModel, adapters: dict[int, Adapter]) -> None:
        self.latency = latency
        self.ranks = {a.id: a.rank for a in adapters.values()}

    def execute(self, batch: Batch) -> StepResult:
        lat = self.latency
        compute = lat.step_s(batch.shape(self.ranks))
        switch = 0.0
        if batch.is_switch:
            switch = lat.switch_s(
                self.ranks[batch.unmerge_adapter] if batch.unmerge_adapter is not None else None,
                self.ranks[batch.merge_adapter] if batch.merge_adapter is not None else None,
            )
        load = lat.load_s(batch.load_bytes)
        swap = lat.swap_s(batch.swap_out_tokens) + lat.swap_s(batch.swap_in_tokens)
        transfer = lat.kv_transfer_s(batch.transfer_in_tokens)
        if lat.latency.adapter_load.overlap:
            body = max(compute, load)
            load_visible = body - compute
        else:
            body = compute + load
            load_visible = load
        elapsed = switch + body + swap + transfer
        return StepResult(elapsed, switch_s=switch, load_s=load_visible, swap_s=swap, transfer_s=transfer)
