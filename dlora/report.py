"""Turn a run's result (simulated or live) into the Report (summary, per-replica rows, policy
and migration decisions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core.cluster import Cluster
from .core.migration import Migrator
from .metrics import Report, replica_rows, summarize
from .scenario import Scenario
from .types import Adapter, Request


@dataclass
class RunResult:
    """What a run (simulated: `SimResult`, live: `LiveResult`) produced; the report reads it."""

    scenario: Scenario
    requests: list[Request]
    cluster: Cluster
    migrator: Migrator
    adapters: dict[int, Adapter]
    end_s: float
    wall_s: float
    queue_samples: list[list[tuple[float, int]]] = field(default_factory=list)
    batch_log: list[tuple[int, int, str, int | None, tuple[int, ...]]] | None = None


def note_queue_length(samples: list[tuple[float, int]], now: float, unfinished: int) -> None:
    """A replica's queue-length samples (`RunResult.queue_samples`, queue_length.png): (now,
    unfinished requests), kept only when the count changed."""
    if not samples or samples[-1][1] != unfinished:
        samples.append((now, unfinished))


def build_report(result: RunResult) -> Report:
    sc = result.scenario
    summary = summarize(result.requests, result.end_s, sc.slo.latency_per_token_s, sc.slo.ttft_s)
    stats = [rep.summary() for rep in result.cluster.replicas]
    rows = replica_rows(result.requests, stats, summary["duration_s"])
    totals = {k: sum(r.get(k, 0) for r in rows) for k in (
        "iterations", "merged_iterations", "unmerged_iterations", "switches", "credit_forced_batches",
        "adapter_loads", "adapter_evictions", "swaps", "recomputes", "failed_steps",
        "busy_s", "switch_s", "load_s", "swap_s", "preempting_iterations",
        "prefix_query_tokens", "prefix_hit_tokens")}
    summary["totals"] = totals
    queried = totals["prefix_query_tokens"]
    summary["prefix_cache_hit_rate"] = totals["prefix_hit_tokens"] / queried if queried else 0.0
    summary["switch_time_share"] = totals["switch_s"] / totals["busy_s"] if totals["busy_s"] else 0.0
    migration = result.migrator.stats()
    wall = {k: migration.pop(k) for k in list(migration) if "wall" in k or k.endswith("share_of_simulated")}
    extra = {
        "policies": {"batching": sc.policies.batching.name, "dispatch": sc.policies.dispatch.name,
                     "migration": sc.policies.migration.name},
        "migration": migration,
        "seed": sc.seed,
    }
    return Report(sc.name, summary, rows, extra, timings={"migration": wall} if wall else {})
