"""Per-request records -> Report: throughput, latency per token, TTFT, TPOT, SLO, queueing.

The report is what users compare systems by (the paper's metric is the average latency per
output token, request latency / output tokens). `Report.to_json()` is deterministic: the same
scenario and seed give the same bytes."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .types import Request, RequestStatus

PERCENTILES = (50, 90, 99)


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    out["max"] = float(arr.max())
    return out


@dataclass
class Report:
    """`to_json()` holds only what the scenario and seed determine; wall-clock measurements of
    this machine (solver seconds, ...) live in `timings`, written to timings.json."""

    scenario: str
    summary: dict[str, Any]
    replicas: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "summary": self.summary, "replicas": self.replicas, **self.extra}

    def to_json(self) -> str:
        return json.dumps(_clean(self.to_dict()), indent=2, sort_keys=True) + "\n"


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 9)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def summarize(requests: Sequence[Request], end_s: float, slo_latency_per_token_s: float,
              slo_ttft_s: float | None = None) -> dict[str, Any]:
    done = [r for r in requests if r.status == RequestStatus.FINISHED]
    rejected = [r for r in requests if r.status == RequestStatus.ABORTED]
    unfinished = [r for r in requests if not r.is_done]
    first_arrival = min((r.arrival_s for r in requests), default=0.0)
    last_finish = max((r.finish_s for r in done if r.finish_s is not None), default=first_arrival)
    duration = max(last_finish - first_arrival, 1e-12)
    out_tokens = sum(r.generated_tokens for r in done)
    lpt = [r.latency_per_token_s for r in done if r.latency_per_token_s is not None]
    queueing = [r.first_scheduled_s - r.arrival_s for r in done if r.first_scheduled_s is not None]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    tpot = [r.tpot_s for r in done if r.tpot_s is not None]
    within = [x <= slo_latency_per_token_s for x in lpt]
    if slo_ttft_s is not None:
        within = [w and (r.ttft_s or 0.0) <= slo_ttft_s for w, r in zip(within, done, strict=True)]
    mean_lpt = float(np.mean(lpt)) if lpt else None
    return {
        "requests": len(requests),
        "completed": len(done),
        "rejected": len(rejected),
        "unfinished": len(unfinished),
        "simulated_s": end_s,
        "duration_s": duration,
        "throughput_rps": len(done) / duration,
        "throughput_output_tokens_per_s": out_tokens / duration,
        "latency_s": _stats([r.latency_s for r in done if r.latency_s is not None]),
        "latency_per_token_s": _stats(lpt),
        "ttft_s": _stats(ttft),
        "tpot_s": _stats(tpot),
        "queueing_s": _stats(queueing),
        "queueing_per_token_s": _stats([q / max(1, r.generated_tokens) for q, r in zip(queueing, done, strict=False)]),
        "slo": {
            "latency_per_token_s": slo_latency_per_token_s,
            "ttft_s": slo_ttft_s,
            "attainment": (sum(within) / len(within)) if within else None,
            "mean_within_slo": (mean_lpt is not None and mean_lpt <= slo_latency_per_token_s
                                and not unfinished),
        },
        "preemptions": sum(r.num_preemptions for r in requests),
        "migrations": sum(r.num_migrations for r in requests),
    }


def replica_rows(requests: Sequence[Request], replica_stats: Sequence[dict[str, Any]], duration_s: float) -> list[dict[str, Any]]:
    rows = []
    for i, stats in enumerate(replica_stats):
        mine = [r for r in requests if r.replica == i and r.status == RequestStatus.FINISHED]
        queue = sum((r.first_scheduled_s or r.arrival_s) - r.arrival_s for r in mine)
        latency = sum(r.latency_s or 0.0 for r in mine)
        row = {"replica": i, "completed": len(mine),
               "utilisation": stats.get("busy_s", 0.0) / duration_s if duration_s > 0 else 0.0,
               "queueing_share": queue / latency if latency > 0 else 0.0,
               "mean_queueing_s": queue / len(mine) if mine else 0.0}
        row.update(stats)
        rows.append(row)
    return rows


CSV_FIELDS = (
    "id", "adapter", "replica", "status", "arrival_s", "dispatch_s", "first_scheduled_s",
    "first_token_s", "finish_s", "prompt_tokens", "output_tokens", "generated_tokens",
    "queueing_s", "executing_s", "latency_s", "latency_per_token_s", "ttft_s", "tpot_s",
    "preemptions", "migrations", "finish_reason",
)


def write_requests_csv(path: Path, requests: Sequence[Request], adapter_names: Sequence[str]) -> None:
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.9g}"

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in sorted(requests, key=lambda r: r.id):
            queue = None if r.first_scheduled_s is None else r.first_scheduled_s - r.arrival_s
            w.writerow([
                r.id, "" if r.adapter_id is None else adapter_names[r.adapter_id],
                "" if r.replica is None else r.replica, r.status.name.lower(), num(r.arrival_s),
                num(r.dispatch_s), num(r.first_scheduled_s), num(r.first_token_s), num(r.finish_s),
                r.prompt_tokens, r.output_tokens, r.generated_tokens, num(queue), num(r.executing_s),
                num(r.latency_s), num(r.latency_per_token_s), num(r.ttft_s), num(r.tpot_s),
                r.num_preemptions, r.num_migrations, r.finish_reason or "",
            ])
