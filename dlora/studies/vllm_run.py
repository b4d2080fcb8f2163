"""A real serving run's folder (the layout of LLMServingSim's bench): `vllm/requests.jsonl`
(per request token counts and engine timestamps) and `vllm/meta.json` (engine caps, KV block
count when recorded), read and checked; errors name the file and line. The metric definitions
(engine clock, arrival = queued_ts) are the properties of `RealRequest`; see `against`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WorkloadError

TIMESTAMPS = ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts")
REQUIRED = ("input_toks", "output_toks", *TIMESTAMPS)
KV_BLOCK_KEYS = ("num_gpu_blocks", "kv_blocks", "num_gpu_blocks_override")


@dataclass(frozen=True, slots=True)
class RealRequest:
    """One request of the real run; times in seconds on the engine clock."""

    request_id: str
    prompt_tokens: int
    output_tokens: int
    queued_ts: float
    scheduled_ts: float
    first_token_ts: float
    last_token_ts: float
    arrival_time: float | None = None  # client wall clock (not comparable with the others)

    @property
    def ttft_s(self) -> float:
        return self.first_token_ts - self.queued_ts

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.last_token_ts - self.first_token_ts) / (self.output_tokens - 1)

    @property
    def latency_s(self) -> float:
        return self.last_token_ts - self.queued_ts

    @property
    def queueing_s(self) -> float:
        return self.scheduled_ts - self.queued_ts


@dataclass(frozen=True, slots=True)
class EngineCaps:
    model: str
    max_num_seqs: int
    max_num_batched_tokens: int
    tensor_parallel_size: int = 1
    kv_blocks: int | None = None  # None: not recorded by the run
    block_size: int | None = None
    prefix_caching: bool = True  # vLLM's default unless engine_kwargs says otherwise


@dataclass(frozen=True, slots=True)
class RealRun:
    run_dir: Path
    requests: tuple[RealRequest, ...]  # sorted by queued_ts (stable)
    caps: EngineCaps

    @property
    def start_ts(self) -> float:
        return self.requests[0].queued_ts

    def arrival_s(self, r: RealRequest) -> float:
        return r.queued_ts - self.start_ts

    @property
    def duration_s(self) -> float:
        return max(r.last_token_ts for r in self.requests) - self.start_ts

    @property
    def throughput_rps(self) -> float:
        return len(self.requests) / max(self.duration_s, 1e-12)

    @property
    def longest_tokens(self) -> int:
        return max(r.prompt_tokens + r.output_tokens for r in self.requests)


# ---- reading a run ----
def load_run(run_dir: Path | str) -> RealRun:
    """Read and check `RUN_DIR/vllm/requests.jsonl` and `RUN_DIR/vllm/meta.json`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WorkloadError(f"{run_dir}: no such folder")
    requests = load_requests(run_dir / "vllm" / "requests.jsonl")
    caps = load_meta(run_dir / "vllm" / "meta.json", default_model=run_dir.name)
    return RealRun(run_dir, requests, caps)


def load_requests(path: Path) -> tuple[RealRequest, ...]:
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                out.append(_parse_request(line, f"{path}, line {lineno}", str(lineno)))
    if not out:
        raise WorkloadError(f"{path}: no requests in the file")
    return tuple(sorted(out, key=lambda r: r.queued_ts))


def _parse_request(line: str, where: str, default_id: str) -> RealRequest:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        raise WorkloadError(f"{where}: not valid JSON") from None
    if not isinstance(rec, dict):
        raise WorkloadError(f"{where}: expected a JSON object")
    for name in REQUIRED:
        if rec.get(name) is None:
            raise WorkloadError(f"{where}: missing field {name}")
    prompt = _positive_int(rec["input_toks"], f"{where}: input_toks")
    output = _positive_int(rec["output_toks"], f"{where}: output_toks")
    queued, scheduled, first, last = (_finite(rec[name], f"{where}: {name}") for name in TIMESTAMPS)
    if not queued <= scheduled <= first <= last:
        raise WorkloadError(f"{where}: timestamps out of order (need queued_ts <= scheduled_ts "
                            "<= first_token_ts <= last_token_ts)")
    arrival = rec.get("arrival_time")
    arrival_time = None if arrival is None else _finite(arrival, f"{where}: arrival_time")
    return RealRequest(str(rec.get("request_id", default_id)), prompt, output, queued, scheduled, first, last,
                       arrival_time)


def _positive_int(value: Any, what: str) -> int:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    if not ok or value < 1:
        raise WorkloadError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _finite(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise WorkloadError(f"{what} must be a number of seconds, got {value!r}")
    return float(value)


def load_meta(path: Path, default_model: str = "model") -> EngineCaps:
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}: not valid JSON (line {exc.lineno})") from None
    kwargs = meta.get("engine_kwargs", {}) if isinstance(meta, dict) else None
    if not isinstance(kwargs, dict):
        raise WorkloadError(f"{path}: expected an object with an engine_kwargs object")

    def cap(name: str, default: int | None = None) -> int:
        value = kwargs.get(name, meta.get(name))
        if value is None:
            if default is None:
                raise WorkloadError(f"{path}: missing engine_kwargs.{name}")
            return default
        return _positive_int(value, f"{path}: engine_kwargs.{name}")

    sections = [meta, *(meta[k] for k in ("kv_cache", "cache_config") if isinstance(meta.get(k), dict)), kwargs]
    blocks = block_size = None
    for sec in sections:
        for name in KV_BLOCK_KEYS:
            if blocks is None and sec.get(name) is not None:
                blocks = _positive_int(sec[name], f"{path}: {name}")
        if block_size is None and sec.get("block_size") is not None:
            block_size = _positive_int(sec["block_size"], f"{path}: block_size")
    model = meta.get("model") or kwargs.get("model") or default_model
    return EngineCaps(str(model), cap("max_num_seqs"), cap("max_num_batched_tokens"),
                      cap("tensor_parallel_size", 1), blocks, block_size,
                      kwargs.get("enable_prefix_caching") is not False)
