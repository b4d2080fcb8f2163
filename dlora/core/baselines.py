"""The systems dLoRA is compared with, as named batching policies (PAPER.md section 6).

- `vllm`: vLLM of 2023, no multi-LoRA. Every adapter is its own full model with the adapter
  merged in; at most `max_models` (4 for 7B, 2 for larger models in the paper) full models are
  resident per replica (a tensor-parallel replica holds each whole model across its GPUs; memory
  is counted per replica, as in the profile) and the others are swapped in whole from host memory, least recently used out,
  at the profile's host-to-device bandwidth. One model per iteration: the oldest request's model
  and its queued requests. Modelled as merged batches whose "adapter" is a full model: its
  resident size is the model's weight bytes (taken from the KV pool, one copy of which the pool
  already excludes as the base weights) and selecting a resident model costs no merge.
- `peft`: HuggingFace PEFT: one adapter per iteration (`set_adapter`), run unmerged through the
  LoRA side path; the oldest request's adapter and its queued requests. Its forward costs the
  profile's `baselines.peft.step_cost_factor` times this project's kernels where the profile
  has that term (`profile.py`). Two loops, by `static_batches`: false (default), the dLoRA
  paper's PEFT, customised with paged attention: continuous batching, one adapter per forward;
  true, S-LoRA's PEFT baseline (S-LoRA `benchmarks/run_exp_peft.py`): a batch of one adapter's
  queued requests is formed once and runs until its last request finishes, padded to its
  longest prompt and context (the latency model pads); nothing joins, so a request waits for
  its batch. The policy only plans: the replica admits the members under its contract (a
  member that does not fit waits; the batch still ends when its admitted members finish).
- `slora`: S-LoRA: unmerged-only FCFS on the unified pool (KV and adapters share memory even if
  the scenario asks for a static split), adapters of heterogeneous ranks without padding, and
  S-LoRA's admission (`slora/server/router/req_queue.py`): a waiting request is admitted only if
  the KV of every admitted request at its full output length still fits when each of them
  finishes, so no request is ever preempted; its adapter is loaded once, at admission.

Policies shape their replica through the traits and hooks of `batching.PolicyBase`, which
`ReplicaScheduler` reads at construction: `memory_config(config) -> MemoryConfig`,
`adapter_size_bytes(adapter) -> int` and `PolicyTraits`: `switch_free` (changing the merged
adapter costs nothing), `eviction_lru` (evict the least recently used adapter instead of the one
with fewest outstanding requests) and `reserve_output` (S-LoRA's admission by whole-output
reservation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import spec
from ..types import Adapter, BatchMode
from .batching import (
    BATCH_POLICIES,
    OldestAdapter,
    Plan,
    PolicyContext,
    PolicyTraits,
    QueueView,
    UnmergedOnly,
)
from .memory import MemoryConfig


@dataclass(frozen=True, slots=True)
class VllmParams:
    max_models: int = spec(4, ge=1, doc="full models resident per replica (paper: 4 for 7B, 2 for 13B/70B)")


@BATCH_POLICIES.register("vllm", VllmParams)
class Vllm(OldestAdapter):
    """One merged full model per adapter, at most `max_models` resident, LRU whole-model swaps,
    one model per iteration (module docstring)."""

    # each model has its own weights: selecting one merges nothing; models are swapped LRU
    traits = PolicyTraits(switch_free=True, eviction_lru=True)

    def __init__(self, params: VllmParams, ctx: PolicyContext) -> None:
        super().__init__(params, ctx)
        # a profile's memory is per replica (all its tensor-parallel GPUs together), so a
        # resident model costs its whole weights: a TP-4 replica holds each model across 4 GPUs
        self.model_bytes = ctx.latency.model.weight_bytes

    def memory_config(self, config: MemoryConfig) -> MemoryConfig:
        """Models take the adapters' place: `max_models` slots, no static adapter budget; the
        base copy the pool excludes is one of the resident models, so it is added back."""
        assert isinstance(self.params, VllmParams)
        return dataclasses.replace(
            config, capacity_bytes=config.capacity_bytes + self.model_bytes,
            max_adapter_slots=self.params.max_models, adapter_budget_bytes=None,
        )

    def adapter_size_bytes(self, adapter: Adapter) -> int:
        return self.model_bytes


@dataclass(frozen=True, slots=True)
class PeftParams:
    static_batches: bool = spec(False, doc="S-LoRA's PEFT loop: static padded batches of one adapter, "
                                "a request waits for its batch; false: the dLoRA paper's PEFT (paged "
                                "attention, continuous batching, one adapter per forward)")


@BATCH_POLICIES.register("peft", PeftParams)
class Peft(OldestAdapter):
    """One adapter per iteration, unmerged; continuous, or S-LoRA's static batches (module
    docstring)."""

    mode = BatchMode.UNMERGED

    def __init__(self, params: PeftParams, ctx: PolicyContext) -> None:
        super().__init__(params, ctx)
        self.static_batches = params.static_batches
        self.members: set[int] = set()  # the static batch in flight (request ids)

    def plan(self, queue: QueueView, now: float) -> Plan:
        """Static batches: the members of the batch in flight that are still unfinished, in
        queue order; once none is left, a new batch as `OldestAdapter` picks it."""
        if not self.static_batches:
            return super().plan(queue, now)
        left = [r for r in queue.requests if r.id in self.members] if self.members else []
        if not left:
            plan = super().plan(queue, now)
            self.members = {r.id for r in plan.requests}
            return plan
        if len(left) < len(self.members):
            self.members = {r.id for r in left}
        return Plan(BatchMode.UNMERGED, None, left)


@BATCH_POLICIES.register("slora")
class Slora(UnmergedOnly):
    """Unmerged-only FCFS with KV and adapters in one pool (module docstring)."""

    traits = PolicyTraits(reserve_output=True)  # S-LoRA's admission: nobody is ever preempted

    def memory_config(self, config: MemoryConfig) -> MemoryConfig:
        return dataclasses.replace(config, adapter_budget_bytes=None)
