"""Turn a simulation result into the Report (summary, per-replica rows, policy and migration
decisions)."""

from __future__ import annotations

from ..metrics import Report, replica_rows, summarize
from .driver import SimResult


def build_report(result: SimResult) -> Report:
    sc = result.scenario
    summary = summarize(result.requests, result.end_s, sc.slo.latency_per_token_s, sc.slo.ttft_s)
    stats = [rep.summary() for rep in result.cluster.replicas]
    rows = replica_rows(result.requests, stats, summary["duration_s"])
    totals = {k: sum(r.get(k, 0) for r in rows) for k in (
        "iterations", "merged_iterations", "unmerged_iterations", "switches", "credit_forced_batches",
        "adapter_loads", "adapter_evictions", "swaps", "recomputes", "failed_steps",
        "busy_s", "switch_s", "load_s", "swap_s")}
    summary["totals"] = totals
    summary["switch_time_share"] = totals["switch_s"] / totals["busy_s"] if totals["busy_s"] else 0.0
    extra = {
        "policies": {"batching": sc.policies.batching.name, "dispatch": sc.policies.dispatch.name,
                     "migration": sc.policies.migration.name},
        "migration": result.migrator.stats(),
        "seed": sc.seed,
    }
    return Report(sc.name, summary, rows, extra)
