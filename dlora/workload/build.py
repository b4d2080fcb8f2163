"""`build_requests`: a validated `WorkloadConfig` -> the run's requests, sorted by arrival.

Three ways to get arrival times and adapters, then lengths:
- aggregate `poisson` / `gamma` process, adapters drawn from `uniform` / `zipf` / `weights`;
- per-adapter streams (`gamma_streams`, and `function_trace`: dLoRA's PAPER.md section 7
  construction, one Gamma process per adapter and popularity bin);
- `trace` replay (times scaled by the rate multiplier; adapters drawn, or from the trace's
  adapter column with `popularity.kind: trace`; lengths from the trace unless overridden).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ConfigError, WorkloadError
from ..types import Request
from .config import STREAM_POPULARITY, WorkloadConfig, key
from .generate import (
    function_shares,
    lengths_mask,
    merged_gamma_streams,
    power_law_shares,
    sample_lengths,
    scale_lengths,
)
from .traces import load_function_trace, load_lengths_table, load_request_trace, read_text

log = logging.getLogger(__name__)
DEFAULT_BIN_S = 3600.0


def resolve_path(base_dir: Path | str, value: str) -> Path:
    """`value` as written if absolute (after `~`), else relative to `base_dir`."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


@contextmanager
def _errors_at(key_path: str) -> Iterator[None]:
    try:
        yield
    except WorkloadError as exc:
        raise ConfigError(f"{key_path}: {exc}") from None


def _files(cfg: WorkloadConfig, path: str) -> list[tuple[str, str]]:
    """(key path, file) of every file the workload reads."""
    out = []
    if cfg.arrival.kind == "trace" and cfg.arrival.path is not None:
        out.append((key(path, "arrival.path"), cfg.arrival.path))
    if cfg.popularity.kind == "function_trace" and cfg.popularity.path is not None:
        out.append((key(path, "popularity.path"), cfg.popularity.path))
    if cfg.lengths.kind == "empirical" and cfg.lengths.path is not None:
        out.append((key(path, "lengths.path"), cfg.lengths.path))
    return out


def check_workload(
    cfg: WorkloadConfig, adapter_names: Sequence[str], base_dir: Path | str, path: str = "workload"
) -> None:
    """Everything that can fail before generating: fields, adapters, files (exist, not empty)."""
    cfg.validate(path)
    if not adapter_names:
        raise ConfigError(f"{key(path, 'popularity')}: no adapters to assign requests to")
    weights = cfg.popularity.weights
    if weights is not None and len(weights) != len(adapter_names):
        raise ConfigError(
            f"{key(path, 'popularity.weights')}: has {len(weights)} entries but there are "
            f"{len(adapter_names)} adapters; give one weight per adapter"
        )
    for key_path, value in _files(cfg, path):
        file = resolve_path(base_dir, value)
        if not file.is_file():
            raise ConfigError(f"{key_path}: file {file} does not exist")
        with _errors_at(key_path):
            head = read_text(file, lines=2)
        rows = [line for line in head.splitlines() if line.strip()]
        if len(rows) < 2:
            raise ConfigError(f"{key_path}: file {file} is empty (no rows after the header)")


def build_requests(
    cfg: WorkloadConfig,
    adapter_names: Sequence[str],
    rng: np.random.Generator,
    base_dir: Path | str = ".",
    path: str = "workload",
) -> list[Request]:
    """The run's requests: ids 0..n-1 in arrival order, `adapter_id` an index into
    `adapter_names` (None: base model, only from a trace's empty adapter cell). The same
    config, adapters and generator state give the same list bit for bit. Key paths in errors
    start with `path`; relative files resolve against `base_dir` (the scenario's folder)."""
    check_workload(cfg, adapter_names, base_dir, path)
    num_adapters = len(adapter_names)
    trace_prefixes: tuple[np.ndarray, np.ndarray] | None = None
    if cfg.arrival.kind == "trace":
        times, adapters, prompt, output, trace_prefixes = _from_trace(cfg, adapter_names, rng, base_dir, path)
    else:
        if cfg.popularity.kind in STREAM_POPULARITY:
            times, adapters = _from_streams(cfg, num_adapters, rng, base_dir, path)
        else:
            times, _ = merged_gamma_streams(
                rng,
                np.array([cfg.arrival.rate_per_s]),
                cfg.arrival.stream_cv,
                0.0,
                cfg.num_requests,
                cfg.duration_s,
            )
            adapters = _draw_adapters(cfg, num_adapters, len(times), rng)
        prompt, output = _sample_lengths(cfg, len(times), rng, base_dir, path)
    log.info("workload: %d requests over %.1f s", len(times), times[-1] if len(times) else 0.0)
    requests = [
        Request(i, None if a < 0 else a, t, p, o)
        for i, (a, t, p, o) in enumerate(
            zip(adapters.tolist(), times.tolist(), prompt.tolist(), output.tolist(), strict=True)
        )
    ]
    if trace_prefixes is not None:
        if cfg.prefix.kind != "none":
            raise ConfigError(f"{key(path, 'prefix.kind')}: the arrival trace has prefix_group columns; "
                              "set kind none (or drop the columns)")
        for r, g, n in zip(requests, *(a.tolist() for a in trace_prefixes), strict=True):
            if g >= 0:
                r.prefix_group, r.prefix_tokens = g, min(n, r.prompt_tokens)
    _assign_prefixes(cfg, requests, rng)
    return requests


def _assign_prefixes(cfg: WorkloadConfig, requests: list[Request], rng: np.random.Generator) -> None:
    """Shared system prompts (`workload.prefix`); draws from `rng` only for kind `groups`."""
    prefix = cfg.prefix
    if prefix.kind == "none":
        return
    assert prefix.tokens is not None
    groups = None
    if prefix.kind == "groups":
        assert prefix.groups is not None
        groups = rng.integers(prefix.groups, size=len(requests)).tolist()
    for i, r in enumerate(requests):
        r.prefix_group = groups[i] if groups is not None else (-1 if r.adapter_id is None else r.adapter_id)
        r.prefix_tokens = min(prefix.tokens, r.prompt_tokens)


def _sample_lengths(
    cfg: WorkloadConfig, n: int, rng: np.random.Generator, base_dir: Path | str, path: str
) -> tuple[np.ndarray, np.ndarray]:
    table = None
    if cfg.lengths.kind == "empirical":
        assert cfg.lengths.path is not None
        with _errors_at(key(path, "lengths.path")):
            table = load_lengths_table(resolve_path(base_dir, cfg.lengths.path))
    return sample_lengths(cfg.lengths, n, rng, table, key(path, "lengths"))


def _shares(cfg: WorkloadConfig, num_adapters: int) -> np.ndarray:
    pop = cfg.popularity
    if pop.weights is not None:
        weights = np.asarray(pop.weights, dtype=np.float64)
        return weights / weights.sum()
    return power_law_shares(num_adapters, pop.alpha if pop.alpha is not None else 0.0)


def _draw_adapters(
    cfg: WorkloadConfig, num_adapters: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    if cfg.popularity.kind == "uniform":
        return rng.integers(0, num_adapters, size=n)
    return rng.choice(num_adapters, size=n, p=_shares(cfg, num_adapters))


def _from_streams(
    cfg: WorkloadConfig,
    num_adapters: int,
    rng: np.random.Generator,
    base_dir: Path | str,
    path: str,
) -> tuple[np.ndarray, np.ndarray]:
    rate, cv = cfg.arrival.rate_per_s, cfg.arrival.stream_cv
    assert rate is not None
    if cfg.popularity.kind == "gamma_streams":
        rates = rate * _shares(cfg, num_adapters)
        return merged_gamma_streams(rng, rates, cv, 0.0, cfg.num_requests, cfg.duration_s)
    shares, bin_s = _function_trace_shares(cfg, num_adapters, base_dir, path)
    active = np.flatnonzero(shares.sum(axis=0) > 0)
    times: list[np.ndarray] = []
    adapters: list[np.ndarray] = []
    if cfg.num_requests is not None:  # dLoRA artifact: an equal number of requests per bin
        per_bin = np.full(len(active), cfg.num_requests // len(active))
        per_bin[: cfg.num_requests % len(active)] += 1
        start = 0.0
        for b, n in zip(active.tolist(), per_bin.tolist(), strict=True):
            t, a = merged_gamma_streams(rng, rate * shares[:, b], cv, start, n, cfg.duration_s)
            times.append(t)
            adapters.append(a)
            if len(t) < n:  # reached duration_s
                break
            start = float(t[-1]) if len(t) else start
    else:  # bins of equal time: duration_s / bins, or bin_s (trace time)
        num_bins = shares.shape[1]
        length = bin_s if cfg.duration_s is None else cfg.duration_s / num_bins
        for b in active.tolist():
            t, a = merged_gamma_streams(
                rng, rate * shares[:, b], cv, b * length, None, (b + 1) * length
            )
            times.append(t)
            adapters.append(a)
    all_t, all_a = np.concatenate(times), np.concatenate(adapters)
    order = np.argsort(all_t, kind="stable")
    return all_t[order], all_a[order]


def _function_trace_shares(
    cfg: WorkloadConfig, num_adapters: int, base_dir: Path | str, path: str
) -> tuple[np.ndarray, float]:
    pop = cfg.popularity
    assert pop.path is not None
    bin_s = pop.bin_s if pop.bin_s is not None else DEFAULT_BIN_S
    with _errors_at(key(path, "popularity.path")):
        trace = load_function_trace(resolve_path(base_dir, pop.path), pop.format)
    first_s, last_s = trace.time_span_s()
    start = pop.window_start_s if pop.window_start_s is not None else (first_s // bin_s) * bin_s
    end = pop.window_end_s
    if end is None:
        end = last_s if trace.minute_counts is not None else float(np.nextafter(last_s, np.inf))
    with _errors_at(key(path, "popularity.bin_s")):
        counts = trace.bin_counts(bin_s, start, end)
    shares = function_shares(counts, num_adapters, pop.stride or 1, pop.sort is not False)
    if not shares.any():
        raise ConfigError(
            f"{key(path, 'popularity.path')}: no invocations in the window [{start}, {end}) s "
            f"of {pop.path}; check window_start_s / window_end_s"
        )
    return shares, bin_s


def trace_requests(cfg: WorkloadConfig, base_dir: Path | str = ".") -> int | None:
    """How many requests a trace arrival can give (after the length filters, as `_from_trace`
    keeps them); None for generated arrivals. (Capacity probes size themselves by rate and
    must not ask a trace for more than it holds.)"""
    arrival, lengths = cfg.arrival, cfg.lengths
    if arrival.kind != "trace" or arrival.path is None:
        return None
    trace = load_request_trace(resolve_path(base_dir, arrival.path), arrival.format)
    if not lengths.override and lengths.has_filters:
        return int(np.count_nonzero(lengths_mask(lengths, trace.prompt_tokens, trace.output_tokens)))
    return len(trace.arrival_s)


def _from_trace(
    cfg: WorkloadConfig,
    adapter_names: Sequence[str],
    rng: np.random.Generator,
    base_dir: Path | str,
    path: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    arrival, lengths = cfg.arrival, cfg.lengths
    assert arrival.path is not None
    file_key = key(path, "arrival.path")
    with _errors_at(file_key):
        trace = load_request_trace(resolve_path(base_dir, arrival.path), arrival.format)
    times, prompt, output = trace.arrival_s, trace.prompt_tokens, trace.output_tokens
    rows = np.arange(len(times))
    if not lengths.override and lengths.has_filters:
        rows = np.flatnonzero(lengths_mask(lengths, prompt, output))
        log.info("workload: length filters keep %d of %d trace requests", len(rows), len(times))
        if len(rows) == 0:
            raise ConfigError(f"{file_key}: no request of {arrival.path} passes the length filters")
    times = times[rows]
    if arrival.rate_per_s is not None:
        span = float(times[-1] - times[0]) if len(times) > 1 else 0.0
        if span <= 0:
            raise ConfigError(
                f"{key(path, 'arrival.rate_per_s')}: {arrival.path} spans no time; use rate_scale"
            )
        times = times / (arrival.rate_per_s / ((len(times) - 1) / span))
    elif arrival.rate_scale is not None:
        times = times / arrival.rate_scale
    count = len(times)
    if cfg.duration_s is not None:
        count = int(np.searchsorted(times, cfg.duration_s, side="left"))
    if cfg.num_requests is not None:
        if cfg.duration_s is None and cfg.num_requests > count:
            raise ConfigError(
                f"{key(path, 'num_requests')}: {cfg.num_requests} exceeds the {count} requests "
                f"of {arrival.path} (after length filters); lower it or leave it unset"
            )
        count = min(count, cfg.num_requests)
    rows, times = rows[:count], times[:count]
    if cfg.popularity.kind == "trace":
        adapters = _adapter_column(trace.adapters, rows, adapter_names, file_key, arrival.path)
    else:
        adapters = _draw_adapters(cfg, len(adapter_names), count, rng)
    if lengths.override:
        prompt, output = _sample_lengths(cfg, count, rng, base_dir, path)
    else:
        prompt, output = scale_lengths(lengths, prompt[rows]), scale_lengths(lengths, output[rows])
    prefixes = None
    if trace.prefix_group is not None and trace.prefix_tokens is not None:
        prefixes = (trace.prefix_group[rows], trace.prefix_tokens[rows])
    return times, adapters, prompt, output, prefixes


def _adapter_column(
    column: tuple[str, ...] | None,
    rows: np.ndarray,
    adapter_names: Sequence[str],
    file_key: str,
    file: str,
) -> np.ndarray:
    """Trace adapter cells (name, integer id, or '' for the base model) -> ids (-1: none)."""
    if column is None:
        raise ConfigError(
            f"{file_key}: {file} has no adapter column (needed by popularity kind 'trace')"
        )
    index = {name: i for i, name in enumerate(adapter_names)}
    out = np.empty(len(rows), dtype=np.int64)
    for j, r in enumerate(rows.tolist()):
        cell = column[r]
        if cell in index:
            out[j] = index[cell]
        elif cell == "":
            out[j] = -1
        elif cell.isdigit() and int(cell) < len(adapter_names):
            out[j] = int(cell)
        else:
            raise ConfigError(
                f"{file_key}: adapter {cell!r} in {file} is neither an adapter name nor an "
                f"id 0..{len(adapter_names) - 1}"
            )
    return out
