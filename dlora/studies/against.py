"""`dlora validate --against RUN_DIR --profile FILE`: the simulator against a real serving run.

A run folder (the layout of LLMServingSim's bench, `../shared/data/llmservingsim`) holds
`vllm/requests.jsonl`, one request a line: `input_toks`, `output_toks`, `arrival_time` (the
client's wall clock, unix seconds; optional) and `queued_ts`, `scheduled_ts`, `first_token_ts`,
`last_token_ts` (vLLM's engine, a monotonic clock); and `vllm/meta.json`: `engine_kwargs` with
`max_num_seqs`, `max_num_batched_tokens`, `tensor_parallel_size` (1 if absent), and a KV block
count and block size when the run recorded them (`num_gpu_blocks` / `kv_blocks` /
`num_gpu_blocks_override` and `block_size`, at the top level, under `kv_cache` or
`cache_config`, or in `engine_kwargs`).

Clocks. `arrival_time` and the engine timestamps are on different clocks, so they are never
subtracted. A request arrives when the engine queues it: the replay places request i at
`queued_ts[i] - min(queued_ts)`, and the real metrics are, all on the engine clock,
TTFT = first_token_ts - queued_ts, TPOT = (last_token_ts - first_token_ts) / (output_toks - 1)
(requests of two or more output tokens), latency = last_token_ts - queued_ts,
queueing = scheduled_ts - queued_ts, throughput = requests / (max last_token_ts - min queued_ts).
These are the simulator's own definitions (arrival, first token, finish, first scheduled) and
they reproduce the vLLM column of LLMServingSim's `validation/summary.txt` exactly (mean and
percentiles of TTFT, TPOT and latency). The front end's lag before the engine queue
(tokenisation; up to 0.4 s on the Qwen3-32B run) is outside both sides.

Replay: one replica; every request on the base model (the trace's adapter cells are empty; the
scenario's one adapter is a placeholder no request uses); `unmerged_only` batching (plain
vLLM: FCFS, no merging); recompute preemption, no swap (vLLM v1); `max_batch_size =
max_num_seqs`, `max_batched_tokens = max_num_batched_tokens`, `cluster.kv_blocks` = the run's
block count when known (else the profile's memory sizes the pool). `--set` overrides apply to
that scenario. With an output folder the scenario and its trace are written there, so
`dlora simulate OUT/scenario.yaml` reruns the simulated side. Reading the run folder:
`vllm_run`; tables, plots and files: `against_output`.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..build import load_latency
from ..config import apply_override
from ..errors import ConfigError
from ..latency import LatencyModel
from ..metrics import Report
from ..report import build_report
from ..scenario import Scenario, scenario_from_dict
from ..sim.driver import SimResult, simulate
from ..types import Request, RequestStatus
from .vllm_run import RealRun, load_run

log = logging.getLogger(__name__)

METRICS = ("ttft_s", "tpot_s", "latency_s", "queueing_s")
STATS = ("mean", "p50", "p90")
TRACE_NAME = "trace.csv"
SCENARIO_NAME = "scenario.yaml"
KV_SAMPLES = 2000  # KV usage samples over the simulated run (at most one per 0.01 s)


# ---- the replay ----
def replay_data(run: RealRun, profile: Path) -> dict[str, Any]:
    """The raw scenario that replays `run` (before `--set` overrides)."""
    caps = run.caps
    cluster: dict[str, Any] = {
        "replicas": 1, "max_batch_size": caps.max_num_seqs,
        "max_batched_tokens": caps.max_num_batched_tokens, "block_size": caps.block_size or 16,
        "preemption": "recompute", "swap_space_bytes": 0, "prefix_caching": caps.prefix_caching,
    }
    if caps.kv_blocks is not None:
        cluster["kv_blocks"] = caps.kv_blocks
    return {
        "name": f"{caps.model} replay",
        "description": f"dlora validate --against {run.run_dir}: {len(run.requests)} requests, "
                       "base model, the engine's caps",
        "model": {"profile": str(profile.resolve())},
        "cluster": cluster,
        # no request uses it (the trace's adapter cells are empty); the smallest possible, so
        # that checks of adapter size against tiny pools pass
        "adapters": {"count": 1, "names": ["unused-placeholder"], "ranks": [1], "target_modules": ["q"]},
        "workload": {"arrival": {"kind": "trace", "path": TRACE_NAME, "format": "generic"},
                     "popularity": {"kind": "trace"}},
        "policies": {"batching": {"name": "unmerged_only"}, "dispatch": {"name": "round_robin"},
                     "migration": {"name": "none"}},
        "run": {"progress": False},
    }


def write_trace(path: Path, run: RealRun) -> None:
    """The run as a generic trace; empty adapter cells = the base model."""
    lines = ["arrival_s,prompt_tokens,output_tokens,adapter"]
    lines += [f"{run.arrival_s(r)!r},{r.prompt_tokens},{r.output_tokens}," for r in run.requests]
    path.write_text("\n".join(lines) + "\n")


def check_replay(run: RealRun, scenario: Scenario, latency: LatencyModel, profile: Path) -> None:
    """The profile must be of the run's parallel degree and hold its longest request."""
    model, rng = latency.model, latency.range
    if model.tensor_parallel != run.caps.tensor_parallel_size:
        raise ConfigError(
            f"{run.run_dir}/vllm/meta.json: the run used tensor_parallel_size "
            f"{run.caps.tensor_parallel_size} but profile {profile} is for tensor_parallel "
            f"{model.tensor_parallel}; use a profile of the run's degree")
    longest = run.longest_tokens
    if longest > model.max_context_tokens:
        raise ConfigError(
            f"{run.run_dir}: the longest request needs {longest} tokens of context, more than "
            f"profile {profile} holds (model.max_context_tokens {model.max_context_tokens})")
    if longest > rng.max_context_tokens and not scenario.model.allow_extrapolation:
        raise ConfigError(
            f"{run.run_dir}: the longest request needs {longest} tokens of context, beyond profile "
            f"{profile}'s measured range ({rng.max_context_tokens}); measure further or pass "
            "--set model.allow_extrapolation=true")


class KvSampler:
    """Peak KV blocks of running requests, sampled during the run (the simulator's stop check,
    never stopping): blocks that hold computed tokens; an iteration in flight is not counted."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self.peak_blocks = 0

    def __call__(self, now: float, requests: list[Request]) -> bool:
        bt = self.block_tokens
        blocks = sum(-(-r.computed_tokens // bt) for r in requests if r.status == RequestStatus.RUNNING)
        self.peak_blocks = max(self.peak_blocks, blocks)
        return False


# ---- comparison ----
def _rel(real: float | None, sim: float | None) -> float | None:
    if real is None or sim is None or real == 0:
        return None
    return (sim - real) / real


def _pair(real: float | None, sim: float | None) -> dict[str, float | None]:
    return {"real": real, "simulated": sim, "relative_error": _rel(real, sim)}


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(STATS)
    arr = np.asarray(values, dtype=float)
    p50, p90 = np.percentile(arr, (50, 90))
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90)}


def real_metrics(run: RealRun) -> dict[str, Any]:
    """Mean / P50 / P90 of each metric (seconds) and throughput (req/s) of the real run."""
    out: dict[str, Any] = {}
    for m in METRICS:
        out[m] = _stats([v for v in (getattr(r, m) for r in run.requests) if v is not None])
    out["throughput_rps"] = run.throughput_rps
    return out


def sim_metrics(requests: list[Request], summary: dict[str, Any]) -> dict[str, Any]:
    done = [r for r in requests if r.status == RequestStatus.FINISHED]
    values = {
        "ttft_s": [r.ttft_s for r in done], "tpot_s": [r.tpot_s for r in done],
        "latency_s": [r.latency_s for r in done],
        "queueing_s": [None if r.first_scheduled_s is None else r.first_scheduled_s - r.arrival_s for r in done],
    }
    out: dict[str, Any] = {m: _stats([v for v in vs if v is not None]) for m, vs in values.items()}
    out["throughput_rps"] = summary["throughput_rps"]
    return out


def per_request_errors(run: RealRun, requests: list[Request]) -> dict[str, Any]:
    """Median over matched requests (replay id i = the run's i-th request by queued_ts) of
    |simulated - real| (seconds) and of |simulated - real| / real."""
    pairs = [(run.requests[r.id], r) for r in requests
             if r.status == RequestStatus.FINISHED and r.id < len(run.requests)]
    out: dict[str, Any] = {"matched_requests": len(pairs)}
    for m in ("latency_s", "ttft_s"):
        diffs = [(abs(getattr(s, m) - getattr(a, m)), getattr(a, m)) for a, s in pairs]
        rel = [d / x for d, x in diffs if x > 0]
        out[m] = {"median_absolute_error": float(np.median([d for d, _ in diffs])) if diffs else None,
                  "median_relative_error": float(np.median(rel)) if rel else None}
    return out


@dataclass
class AgainstResult:
    run: RealRun
    profile: str
    scenario: Scenario
    metrics: dict[str, Any]  # metric -> stat -> {real, simulated, relative_error}; throughput_rps
    per_request: dict[str, Any]
    simulated: dict[str, Any]  # preemptions, KV peak, completed, ...
    sim: SimResult
    report: Report
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        caps = self.run.caps
        return {
            "run_dir": str(self.run.run_dir), "profile": self.profile, "model": caps.model,
            "requests": len(self.run.requests),
            "engine": {"max_num_seqs": caps.max_num_seqs, "max_num_batched_tokens": caps.max_num_batched_tokens,
                       "tensor_parallel_size": caps.tensor_parallel_size, "kv_blocks": caps.kv_blocks,
                       "block_size": caps.block_size},
            "clock": "engine clock; arrival = queued_ts; TTFT = first_token_ts - queued_ts; TPOT = "
                     "(last_token_ts - first_token_ts) / (output_toks - 1); latency = last_token_ts - "
                     "queued_ts; queueing = scheduled_ts - queued_ts",
            **self.metrics, "per_request": self.per_request, "simulated": self.simulated,
            "notes": self.notes,
        }


def compare(run: RealRun, sim: SimResult, summary: dict[str, Any]) -> dict[str, Any]:
    real, simulated = real_metrics(run), sim_metrics(sim.requests, summary)
    out: dict[str, Any] = {m: {s: _pair(real[m][s], simulated[m][s]) for s in STATS} for m in METRICS}
    out["throughput_rps"] = _pair(real["throughput_rps"], simulated["throughput_rps"])
    return out


def validate_against(run_dir: Path | str, profile: Path | str, out_dir: Path | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> AgainstResult:
    """Replay the run in the simulator, compare, and (with `out_dir`) write validation.json,
    per_request.csv, validation.png, the simulator's report.json / requests.csv / plots, and
    the scenario with its trace."""
    from .against_output import write_all

    run = load_run(run_dir)
    profile = Path(profile)
    data = replay_data(run, profile)
    for text in overrides:
        apply_override(data, text)
    with tempfile.TemporaryDirectory(prefix="dlora-against-") as tmp:
        base = out_dir if out_dir is not None else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        write_trace(base / TRACE_NAME, run)
        scenario = scenario_from_dict(copy.deepcopy(data), base.resolve())
        latency = load_latency(scenario)
        check_replay(run, scenario, latency, profile)
        span = max(run.duration_s, 1e-3)
        sampler = KvSampler(scenario.cluster.block_size)
        log.info("validate --against: simulating %d requests", len(run.requests))
        sim = simulate(scenario, stop_check=(sampler, max(span / KV_SAMPLES, 0.01)))
        report = build_report(sim)
        pool = sim.cluster.replicas[0].memory
        result = AgainstResult(
            run, str(profile), scenario, compare(run, sim, report.summary), per_request_errors(run, sim.requests),
            {"completed": report.summary["completed"], "unfinished": report.summary["unfinished"],
             "rejected": report.summary["rejected"], "preemptions": report.summary["preemptions"],
             "kv_blocks": pool.total_blocks, "kv_peak_blocks": sampler.peak_blocks,
             "kv_peak_fraction": sampler.peak_blocks / pool.total_blocks if pool.total_blocks else None,
             "iterations": report.summary["totals"]["iterations"]},
            sim, report, _notes(run, scenario, pool.total_blocks))
        if result.simulated["unfinished"] or result.simulated["rejected"]:
            result.notes.append(f"{result.simulated['unfinished']} simulated requests unfinished, "
                                f"{result.simulated['rejected']} rejected: simulated figures cover finished ones")
        if out_dir is not None:
            (out_dir / SCENARIO_NAME).write_text(
                f"# written by dlora validate --against {run.run_dir}\n"
                f"# rerun the simulated side: dlora simulate {out_dir / SCENARIO_NAME}\n"
                + yaml.safe_dump(data, sort_keys=False))
            write_all(out_dir, result)
            result.notes.append(f"wrote validation.json, per_request.csv, validation.png, report.json, "
                                f"requests.csv and {SCENARIO_NAME} to {out_dir}")
    return result


def _notes(run: RealRun, scenario: Scenario, sim_blocks: int) -> list[str]:
    caps = run.caps
    notes = []
    set_blocks = scenario.cluster.kv_blocks
    if set_blocks is not None and set_blocks == caps.kv_blocks:
        notes.append(f"KV cache: {set_blocks} blocks, as the run recorded")
    elif set_blocks is not None:
        recorded = "none" if caps.kv_blocks is None else str(caps.kv_blocks)
        notes.append(f"KV cache: {set_blocks} blocks (cluster.kv_blocks; the run recorded {recorded})")
    else:
        notes.append(f"KV cache: the run records no block count; the profile's memory gives {sim_blocks} "
                     "blocks (set one with --set cluster.kv_blocks=N)")
    lags = [(r.queued_ts - run.start_ts) - (r.arrival_time - run.requests[0].arrival_time)
            for r in run.requests if r.arrival_time is not None and run.requests[0].arrival_time is not None]
    if lags:
        notes.append(f"arrivals at queued_ts (engine clock); queued_ts - arrival_time, relative to the first "
                     f"request's, is {np.median(lags) * 1e3:.1f} ms median (max {max(lags) * 1e3:.1f} ms): "
                     "front-end time outside both sides")
    if caps.prefix_caching:
        notes.append("the real engine caches prefixes (vLLM's default), and so does the replay; its requests "
                     "carry no token ids, so prompts shared between requests are not found (a preempted "
                     "request's own blocks are)")
    return notes
