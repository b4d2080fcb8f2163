"""Factories for scheduler tests and policy experiments: requests, replicas and scripted
executors, with no torch and no clock (DESIGN.md section 9)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .core.batching import BATCH_POLICIES
from .core.context import PolicyContext, ReplicaConfig
from .core.memory import MemoryConfig, MemoryPool
from .core.registries import REGISTRIES  # noqa: F401  (registers every policy)
from .core.replica import ReplicaScheduler
from .latency import LatencyModel
from .profile import load_profile
from .types import Adapter, Batch, Request, StepResult

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def latency_model(name: str = "a800-llama-2-7b", allow_extrapolation: bool = True) -> LatencyModel:
    return LatencyModel(load_profile(PROFILES / f"{name}.yaml"), allow_extrapolation)


def make_request(id: int, adapter: int | None = 0, arrival_s: float = 0.0, prompt: int = 8,
                 output: int = 4) -> Request:
    return Request(id=id, adapter_id=adapter, arrival_s=arrival_s, prompt_tokens=prompt, output_tokens=output)


def make_adapters(count: int, rank: int = 16, size_bytes: int = 1 << 20,
                  ranks: list[int] | None = None) -> dict[int, Adapter]:
    out = {}
    for i in range(count):
        r = ranks[i % len(ranks)] if ranks else rank
        out[i] = Adapter(i, f"adapter-{i}", r, size_bytes * r // rank)
    return out


def make_replica(
    policy: str = "unmerged_only",
    params: dict | None = None,
    num_adapters: int = 4,
    adapters: dict[int, Adapter] | None = None,
    capacity_blocks: int = 1024,
    block_tokens: int = 16,
    max_batch_size: int = 8,
    max_batched_tokens: int = 512,
    preemption: str = "recompute",
    max_adapter_slots: int | None = None,
    swap_blocks: int = 0,
    latency: LatencyModel | None = None,
    replica_id: int = 0,
    prefix_caching: bool = False,
) -> ReplicaScheduler:
    """A replica whose memory is counted in blocks of 1 KiB (adapters sized in bytes)."""
    latency = latency or latency_model()
    adapters = adapters if adapters is not None else make_adapters(num_adapters, size_bytes=4 * 1024)
    block_bytes = 1024
    mem = MemoryPool(MemoryConfig(
        capacity_bytes=capacity_blocks * block_bytes, block_tokens=block_tokens, block_bytes=block_bytes,
        max_adapter_slots=max_adapter_slots, swap_capacity_bytes=swap_blocks * block_bytes,
        prefix_caching=prefix_caching,
    ))
    config = ReplicaConfig(max_batch_size, max_batched_tokens, preemption)
    ctx = PolicyContext(latency, {a.id: a.rank for a in adapters.values()}, config, replica_id)
    pol = BATCH_POLICIES.create(policy, params or {}, "policy", ctx)
    return ReplicaScheduler(replica_id, config, mem, pol, latency, adapters)


class ScriptedExecutor:
    """Returns fixed timings: `step_s` per batch (plus `switch_s` when the batch switches), or
    whatever `script(batch)` returns. Records every batch it saw."""

    def __init__(self, step_s: float = 0.01, switch_s: float = 0.0,
                 script: Callable[[Batch], StepResult] | None = None) -> None:
        self.step_s = step_s
        self.switch_s = switch_s
        self.script = script
        self.batches: list[Batch] = []

    def execute(self, batch: Batch) -> StepResult:
        self.batches.append(batch)
        if self.script is not None:
            return self.script(batch)
        sw = self.switch_s if batch.is_switch else 0.0
        return StepResult(self.step_s + sw, switch_s=sw)


def run_replica(rep: ReplicaScheduler, requests: list[Request], executor: ScriptedExecutor | None = None,
                max_steps: int = 100_000, schedule: Callable[[float], Batch | None] | None = None,
                check_memory: bool = False) -> float:
    """Drive one replica to completion on a virtual clock (all requests added at their arrival
    times); returns the end time. `schedule` replaces `rep.schedule` (a recorder wrapping it);
    `check_memory` checks the pool's invariants after every schedule and complete."""
    ex = executor or ScriptedExecutor()
    plan = schedule or rep.schedule
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    now = 0.0
    i = 0
    for _ in range(max_steps):
        while i < len(pending) and pending[i].arrival_s <= now:
            rep.add(pending[i], now)
            i += 1
        batch = plan(now)
        if check_memory:
            rep.memory.check()
        if batch is None:
            if i >= len(pending):
                return now
            now = pending[i].arrival_s
            continue
        result = ex.execute(batch)
        now += result.elapsed_s
        rep.complete(batch, result, now)
        if check_memory:
            rep.memory.check()
    raise RuntimeError("replica did not finish within max_steps")
