"""Words, units and precision for what a person reads: numbers in tables, messages and plot
axes, and the names of summary fields and scenario key paths (`latency_per_token_s.mean` ->
"mean latency per output token (ms)"). The full-precision values stay in report.json / CSV."""

from __future__ import annotations

import math
from dataclasses import dataclass

NONE = "-"


def seconds(x: float | None) -> str:
    """A duration at three significant digits in the unit that suits it: 12 us, 13.5 ms,
    433 ms, 1.25 s, 205 s, 1,234 s."""
    if x is None or not math.isfinite(x):
        return NONE if x is None else str(x)
    a = abs(x)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{x * 1e6:.3g} us"
    if a < 1:
        return f"{x * 1e3:.3g} ms"
    if a < 1000:
        return f"{x:.3g} s"
    return f"{x:,.0f} s"


def number(x: float | None, digits: int = 3) -> str:
    """`digits` significant digits with the zeros that say so (15.0, 7.57, 433), thousands
    separated from 1,000 on (never 1e+03). For columns of measured values."""
    if x is None:
        return NONE
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def short(x: float | None, digits: int = 4) -> str:
    """Up to `digits` significant digits without trailing zeros (35.5, 36, 0.125): for values
    someone chose, such as rates and sweep points."""
    if x is None:
        return NONE
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def rate(x: float | None) -> str:
    """A request rate in req/s, four significant digits (bisection steps stay apart)."""
    return NONE if x is None else f"{short(x)} req/s"


def count(n: int | float | None) -> str:
    return NONE if n is None else f"{round(n):,}"


def replicas(n: int) -> str:
    return f"{n:,} replica" + ("" if n == 1 else "s")


def percent(x: float | None, signed: bool = False) -> str:
    """A share (0.25) as a percentage (25.0%)."""
    if x is None:
        return NONE
    if round(x * 100, 1) == 0:
        return "+0.0%" if signed else "0.0%"  # never "-0.0%"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


@dataclass(frozen=True, slots=True)
class Label:
    """How to show one quantity: words, unit and the factor from its stored value."""

    words: str
    unit: str = ""
    scale: float = 1.0
    is_count: bool = False  # a whole number (integer axis ticks)

    @property
    def text(self) -> str:
        return f"{self.words} ({self.unit})" if self.unit else self.words


# summary distributions (seconds, shown in ms) and their statistics
TIMES = {"latency_s": "end-to-end latency", "latency_per_token_s": "latency per output token",
         "ttft_s": "TTFT", "tpot_s": "TPOT", "queueing_s": "queueing delay",
         "queueing_per_token_s": "queueing delay per output token"}
STATS = {"mean": "mean", "p50": "median", "p90": "P90", "p95": "P95", "p99": "P99", "min": "min",
         "max": "max", "std": "std. dev. of"}
FIELDS = {  # other summary fields and scenario key paths
    "throughput_rps": Label("throughput", "req/s"),
    "throughput_output_tokens_per_s": Label("throughput", "output tokens/s"),
    "slo.attainment": Label("SLO attainment", "% of requests", 100.0),
    "prefix_cache_hit_rate": Label("prefix-cache hit rate", "% of prompt tokens", 100.0),
    "switch_time_share": Label("merge/unmerge time", "% of busy time", 100.0),
    "completed": Label("requests completed", is_count=True),
    "unfinished": Label("requests unfinished", is_count=True),
    "rejected": Label("requests rejected", is_count=True),
    "preemptions": Label("preemptions", is_count=True),
    "migrations": Label("migrations", is_count=True),
    "totals.switches": Label("merge/unmerge switches", is_count=True),
    "duration_s": Label("duration", "s"),
    "workload.arrival.rate_per_s": Label("arrival rate", "req/s"),
    "workload.arrival.cv": Label("arrival burstiness (CV)"),
    "workload.num_requests": Label("requests", is_count=True),
    "workload.popularity.alpha": Label("popularity skew (alpha)"),
    "workload.lengths.scale": Label("request length scale", "x"),
    "adapters.count": Label("adapters", is_count=True),
    "cluster.replicas": Label("replicas", is_count=True),
    "cluster.max_batch_size": Label("max batch size", "sequences", is_count=True),
    "cluster.max_batched_tokens": Label("max batched tokens", "tokens", is_count=True),
    "cluster.max_adapter_slots": Label("adapter slots per replica", is_count=True),
    "slo.latency_per_token_s": Label("SLO on latency per output token", "ms", 1e3),
}


SCENARIO_SECTIONS = ("model", "cluster", "adapters", "workload", "policies", "slo", "run", "seed")


def label(path: str) -> Label:
    """Words and unit for a summary field or scenario key path; an unknown path is spelled
    out in words from its last parts (`a.b_tokens` -> "b (tokens)")."""
    if path in FIELDS:
        return FIELDS[path]
    head, _, stat = path.rpartition(".")
    if head in TIMES and stat in STATS:
        return Label(f"{STATS[stat]} {TIMES[head]}", "ms", 1e3)
    if path in TIMES:
        return Label(TIMES[path], "ms", 1e3)
    last = path.split(".")[-1]
    for suffix, unit in (("_s", "s"), ("_tokens", "tokens"), ("_bytes", "bytes")):
        if last.endswith(suffix):
            return Label(last[: -len(suffix)].replace("_", " "), unit)
    if last.startswith("num_"):
        return Label(last[4:].replace("_", " "), is_count=True)
    return Label(path.replace("_", " "))


def value(path: str, x: object) -> str:
    """A field's value as shown beside its `label` (scaled, at sensible precision)."""
    if x is None:
        return NONE
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    lab = label(path)
    if lab.is_count:
        return count(x)
    if path.split(".")[0] in SCENARIO_SECTIONS:  # a value someone chose: as written
        return short(x * lab.scale)
    return number(x * lab.scale)
