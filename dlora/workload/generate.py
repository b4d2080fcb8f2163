"""Random draws for workloads, vectorised with numpy: Gamma / Poisson arrival processes (one
aggregate process or many merged per-adapter streams), adapter popularity shares (power law,
dLoRA's stride mapping of functions to adapters, PAPER.md section 7) and request lengths.

Every function takes the one seeded `numpy.random.Generator` and draws from it in a fixed
order, so the same seed gives the same workload bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConfigError
from .config import MAX_TOKENS, LengthsConfig
from .traces import LengthsTable


def power_law_shares(num_adapters: int, alpha: float) -> np.ndarray:
    """Share of adapter k proportional to 1 / (k + 1) ** alpha; alpha 0 is uniform."""
    weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def merged_gamma_streams(
    rng: np.random.Generator,
    rates_per_s: np.ndarray,
    cv: float,
    start_s: float = 0.0,
    num_requests: int | None = None,
    end_s: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge independent Gamma renewal processes (one per entry of `rates_per_s`, all with
    coefficient of variation `cv`; cv 1 is Poisson), each starting at `start_s`. Returns
    (arrival times sorted, stream index) of the first `num_requests` arrivals and/or those
    before `end_s` (at least one limit must be given). Streams with rate 0 never fire."""
    if num_requests is None and end_s is None:
        raise ValueError("give num_requests or end_s")
    rates = np.asarray(rates_per_s, dtype=np.float64)
    total = rates.sum()
    if total <= 0 or (num_requests == 0) or (end_s is not None and end_s <= start_s):
        return np.empty(0), np.empty(0, dtype=np.int64)
    limit = None if end_s is None else end_s - start_s
    if num_requests is None:
        assert limit is not None
        horizon = limit
    else:
        horizon = (num_requests + 6.0 * cv * np.sqrt(num_requests) + 10.0) / total
        horizon = horizon if limit is None else min(horizon, limit)
    while True:
        times, stream = _streams_until(rng, rates, cv, horizon)
        if num_requests is None or len(times) >= num_requests:
            break
        if limit is not None and horizon >= limit:
            break
        horizon = 2.0 * horizon if limit is None else min(2.0 * horizon, limit)
    order = np.argsort(times, kind="stable")[:num_requests]
    return times[order] + start_s, stream[order]


def _streams_until(
    rng: np.random.Generator, rates: np.ndarray, cv: float, horizon: float
) -> tuple[np.ndarray, np.ndarray]:
    """All arrivals in (0, horizon) of each stream, unsorted, with their stream index."""
    shape, cv2 = 1.0 / (cv * cv), cv * cv
    active = np.flatnonzero(rates > 0)
    expected = rates[active] * horizon
    counts = np.ceil(expected + 6.0 * cv * np.sqrt(expected) + 10.0).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    gaps = rng.standard_gamma(shape, size=int(counts.sum())) * np.repeat(
        cv2 / rates[active], counts
    )
    csum = np.cumsum(gaps)
    times = csum - np.repeat(csum[starts] - gaps[starts], counts)
    last = times[starts + counts - 1]
    pieces_t, pieces_s = [times], [np.repeat(active, counts)]
    for j in np.flatnonzero(last < horizon).tolist():  # rare: a stream ran short, extend it
        t, rate = float(last[j]), float(rates[active[j]])
        more: list[np.ndarray] = []
        while t < horizon:
            chunk = t + np.cumsum(rng.standard_gamma(shape, size=int(counts[j])) * cv2 / rate)
            more.append(chunk)
            t = float(chunk[-1])
        pieces_t.extend(more)
        pieces_s.extend(np.full(len(m), active[j], dtype=np.int64) for m in more)
    times, stream = np.concatenate(pieces_t), np.concatenate(pieces_s)
    keep = times < horizon
    return times[keep], stream[keep]


def function_shares(counts: np.ndarray, num_adapters: int, stride: int, sort: bool) -> np.ndarray:
    """dLoRA's mapping (PAPER.md section 7): functions (sorted by total invocations, most first,
    when `sort`; functions never invoked dropped) go to adapters in blocks of `stride`
    consecutive functions, round-robin. `counts` is [functions, bins]; returns each adapter's
    share of each bin's invocations, [adapters, bins] (a bin without invocations is all 0)."""
    totals = counts.sum(axis=1)
    order = np.flatnonzero(totals > 0)
    if sort:
        order = order[np.argsort(-totals[order], kind="stable")]
    adapter = (np.arange(len(order)) // stride) % num_adapters
    per_adapter = np.zeros((num_adapters, counts.shape[1]), dtype=np.float64)
    np.add.at(per_adapter, adapter, counts[order].astype(np.float64))
    bin_totals = per_adapter.sum(axis=0)
    return np.divide(per_adapter, bin_totals, out=np.zeros_like(per_adapter), where=bin_totals > 0)


def lengths_mask(cfg: LengthsConfig, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Which (prompt, output) pairs pass the configured filters."""
    keep = np.ones(len(prompt), dtype=bool)
    for bound, values, is_min in (
        (cfg.min_prompt_tokens, prompt, True),
        (cfg.max_prompt_tokens, prompt, False),
        (cfg.min_output_tokens, output, True),
        (cfg.max_output_tokens, output, False),
        (cfg.max_total_tokens, prompt + output, False),
    ):
        if bound is not None:
            keep &= values >= bound if is_min else values <= bound
    return keep


def scale_lengths(cfg: LengthsConfig, tokens: np.ndarray) -> np.ndarray:
    """Multiply by `cfg.scale`, rounded, at least 1."""
    if cfg.scale == 1.0:
        return tokens
    with np.errstate(over="ignore"):
        return np.clip(np.rint(tokens * cfg.scale), 1, MAX_TOKENS).astype(np.int64)


def _lognormal(
    rng: np.random.Generator, mean: float | None, median: float | None, sigma: float, n: int
) -> np.ndarray:
    if median is not None:
        mu = float(np.log(median))
    else:
        assert mean is not None
        mu = float(np.log(mean)) - sigma * sigma / 2.0
    with np.errstate(over="ignore"):  # a huge sigma: inf, clipped below
        tokens = np.rint(np.exp(mu + sigma * rng.standard_normal(n)))
    return np.clip(tokens, 1, MAX_TOKENS).astype(np.int64)


def sample_lengths(
    cfg: LengthsConfig,
    n: int,
    rng: np.random.Generator,
    table: LengthsTable | None = None,
    path: str = "workload.lengths",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` (prompt, output) token counts per `cfg` (filters, then scale). `table` is the
    loaded lengths table for kind `empirical`."""
    if cfg.kind == "fixed":
        assert cfg.prompt_tokens is not None and cfg.output_tokens is not None
        prompt = np.full(n, cfg.prompt_tokens, dtype=np.int64)
        output = np.full(n, cfg.output_tokens, dtype=np.int64)
    elif cfg.kind == "empirical":
        assert table is not None
        keep = np.flatnonzero(lengths_mask(cfg, table.prompt_tokens, table.output_tokens))
        if len(keep) == 0:
            raise ConfigError(f"{path}.path: no row of {cfg.path} passes the length filters")
        rows = keep[rng.integers(0, len(keep), size=n)]
        prompt, output = table.prompt_tokens[rows], table.output_tokens[rows]
    else:
        prompt, output = _rejection_sample(cfg, n, rng, path)
    return scale_lengths(cfg, prompt), scale_lengths(cfg, output)


def _draw_fn(
    cfg: LengthsConfig, rng: np.random.Generator
) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    if cfg.kind == "uniform":
        assert cfg.prompt_range is not None and cfg.output_range is not None
        (plo, phi), (olo, ohi) = cfg.prompt_range, cfg.output_range
        return lambda m: (rng.integers(plo, phi + 1, size=m), rng.integers(olo, ohi + 1, size=m))
    psigma, osigma = cfg.prompt_sigma, cfg.output_sigma
    assert psigma is not None and osigma is not None
    return lambda m: (
        _lognormal(rng, cfg.prompt_mean, cfg.prompt_median, psigma, m),
        _lognormal(rng, cfg.output_mean, cfg.output_median, osigma, m),
    )


def _rejection_sample(
    cfg: LengthsConfig, n: int, rng: np.random.Generator, path: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw until `n` pairs pass the filters (uniform / lognormal), keeping draw order."""
    draw = _draw_fn(cfg, rng)
    if not cfg.has_filters:
        prompt, output = draw(n)
        return prompt.astype(np.int64), output.astype(np.int64)
    kept_p: list[np.ndarray] = []
    kept_o: list[np.ndarray] = []
    have, drawn, accept_rate = 0, 0, 1.0
    while have < n:
        if drawn > 1000 * n + 100_000:
            raise ConfigError(
                f"{path}: the length filters reject nearly every draw of kind {cfg.kind!r}; "
                "widen the filters or change the distribution"
            )
        m = max(64, int(np.ceil((n - have) / max(accept_rate, 1e-3) * 1.1)))
        p, o = draw(m)
        keep = lengths_mask(cfg, p, o)
        kept_p.append(p[keep])
        kept_o.append(o[keep])
        have += int(keep.sum())
        drawn += m
        accept_rate = max(have / drawn, 1e-3)
    prompt, output = np.concatenate(kept_p)[:n], np.concatenate(kept_o)[:n]
    return prompt.astype(np.int64), output.astype(np.int64)
