"""Batching policies: which requests run in the next iteration, merged or unmerged.

A policy sees the replica's unfinished requests in FCFS order (`QueueView`) and returns a
`Plan`: the mode, the merged adapter, and the requests to try in priority order (the replica
admits them subject to memory and token limits). `observe` receives every executed batch.
A policy may also shape its replica (the baselines model other systems' rules): its
`PolicyTraits` (switch, eviction and admission rules) and two hooks, `memory_config` (the pool's
layout) and `adapter_size_bytes` (what an adapter costs there); `PolicyBase` gives the defaults
(none of that), and `ReplicaScheduler` reads them once, at construction (and at `add_adapter`).
The dLoRA credit policy lives in `credit.py`; this module holds the protocol and the simple
policies (PAPER.md section 2, ablations; section 6, baselines).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..config import spec
from ..registry import Registry
from ..types import Adapter, Batch, BatchMode, Request, StepResult
from .context import PolicyContext
from .memory import MemoryConfig
from .replica_views import fcfs_key


class QueueView(NamedTuple):
    """What a policy sees. `requests` is read-only: unfinished requests in FCFS order. (Named
    tuples, this and `Plan`: immutable, and built for every plan, several times cheaper than
    frozen dataclasses.)"""

    requests: Sequence[Request]
    merged_adapter: int | None  # adapter currently merged into the weights
    max_batch_size: int
    step: int
    # requests per adapter in `requests` (positive counts only; read-only), when the replica
    # keeps them: a policy need not count a long queue again (None: count `requests`)
    counts: Counter[int | None] | None = None


class Plan(NamedTuple):
    mode: BatchMode
    merged_adapter: int | None
    requests: Sequence[Request]  # priority order, at most max_batch_size
    forced_by_credit: bool = False


@dataclass(frozen=True, slots=True)
class PolicyTraits:
    """The replica's rules a policy changes (all off by default)."""

    switch_free: bool = False  # changing the merged adapter costs nothing (vllm: a model each)
    eviction_lru: bool = False  # evict the least recently used adapter (else: fewest requests)
    reserve_output: bool = False  # S-LoRA's admission: whole outputs fit, nobody is preempted


class BatchPolicy(Protocol):
    traits: PolicyTraits

    def plan(self, queue: QueueView, now: float) -> Plan: ...

    def observe(self, batch: Batch, result: StepResult) -> None: ...

    def observe_repeated(self, batch: Batch, times: Sequence[float], starts: Sequence[float],
                         first: int = 0) -> None:
        """Equivalent to `plan` (but for the first iteration of a repeat, which `plan` made) and
        `observe` once per iteration: iterations `first ..` of a repeat of `batch`, of these
        durations, starting at `starts` (the simulator's fast path)."""
        ...

    def repeats(self, queue: QueueView, plan: Plan, starts: Sequence[float]) -> int:
        """Of the pure-decode iterations starting at `starts` with the queue unchanged (the
        first is the one `plan` was just made for), how many in a row the policy would plan
        exactly as `plan` (at least 1); the simulator's fast path covers them with one event."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def memory_config(self, config: MemoryConfig) -> MemoryConfig:
        """The replica's memory pool under this policy (the scenario's `config` unchanged, or a
        copy the policy reshaped)."""
        ...

    def adapter_size_bytes(self, adapter: Adapter) -> int:
        """Bytes the adapter takes on the replica under this policy."""
        ...


BATCH_POLICIES: Registry[BatchPolicy] = Registry("batching policy")


class PolicyBase:
    """The defaults of a policy's traits and hooks: the replica as the scenario configures it."""

    traits: PolicyTraits = PolicyTraits()

    def memory_config(self, config: MemoryConfig) -> MemoryConfig:
        return config

    def adapter_size_bytes(self, adapter: Adapter) -> int:
        return adapter.size_bytes


class _Simple(PolicyBase):
    def observe(self, batch: Batch, result: StepResult) -> None:
        return None

    def observe_repeated(self, batch: Batch, times: Sequence[float], starts: Sequence[float],
                         first: int = 0) -> None:
        """`observe` for identical decode iterations of these durations (the fast path)."""
        return None

    def stats(self) -> dict[str, Any]:
        return {}


@BATCH_POLICIES.register("unmerged_only")
class UnmergedOnly(_Simple):
    """Strict FCFS, always unmerged: the first `max_batch_size` unfinished requests."""

    def __init__(self, params: Any, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def plan(self, queue: QueueView, now: float) -> Plan:
        return Plan(BatchMode.UNMERGED, None, queue.requests[: queue.max_batch_size])

    def repeats(self, queue: QueueView, plan: Plan, starts: Sequence[float]) -> int:
        return len(starts)  # the plan depends on the queue alone


def first_of_adapter(requests: Sequence[Request], adapter: int | None, limit: int) -> list[Request]:
    out: list[Request] = []
    for r in requests:
        if r.adapter_id == adapter:
            out.append(r)
            if len(out) >= limit:
                break
    return out


class OldestAdapter(_Simple):
    """The oldest request's adapter and up to `max_batch_size` of its queued requests, merged
    (`mode`) unless they are base-model requests, which run on clean weights."""

    mode = BatchMode.MERGED

    def __init__(self, params: Any, ctx: PolicyContext) -> None:
        self.params = params
        self.ctx = ctx

    def plan(self, queue: QueueView, now: float) -> Plan:
        if not queue.requests:
            return Plan(BatchMode.UNMERGED, None, ())
        adapter = queue.requests[0].adapter_id
        chosen = first_of_adapter(queue.requests, adapter, queue.max_batch_size)
        if adapter is None or self.mode == BatchMode.UNMERGED:
            return Plan(BatchMode.UNMERGED, None, chosen)
        return Plan(BatchMode.MERGED, adapter, chosen)

    def repeats(self, queue: QueueView, plan: Plan, starts: Sequence[float]) -> int:
        return len(starts)  # the plan depends on the queue alone


@dataclass(frozen=True, slots=True)
class MergedOnlyParams:
    oldest: str = spec("running", choices=("running", "arrival"),
                       doc="whose adapter is merged: the first request in the replica's priority order "
                           "(the earliest-admitted running one, then the waiting queue), or the "
                           "oldest unfinished request by arrival (the dLoRA artifact's merge policy, "
                           "the paper's merged-only)")


@BATCH_POLICIES.register("merged_only", MergedOnlyParams)
class MergedOnly(OldestAdapter):
    """Always merged: take the oldest request's adapter and batch its queued requests.
    Requests of the base model (no adapter) run on clean weights. `oldest: arrival` is the
    artifact's rule (`_always_merge_schedule`: every unfinished request sorted by arrival, the
    first one's adapter merged, its requests batched in arrival order); the default takes the
    first of the replica's priority order, which keeps a merged adapter while it has running
    requests (docs/findings/merged_only_skew.md)."""

    def plan(self, queue: QueueView, now: float) -> Plan:
        if self.params.oldest == "arrival":
            queue = QueueView(sorted(queue.requests, key=fcfs_key), queue.merged_adapter,
                              queue.max_batch_size, queue.step, queue.counts)
        return OldestAdapter.plan(self, queue, now)
