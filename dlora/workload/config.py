"""The scenario's `workload:` section: frozen dataclasses with kind-specific validation.

Each part has a `kind` (with `choices`) and optional kind-specific fields; `validate(path)` checks
that the fields a kind needs are present and the ones it does not use are unset, and names the
key path in every message (`workload.arrival.rate_per_s: required for kind 'gamma'`). Checks that
need the adapters or the files (weights count, trace files) live in `build.check_workload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import spec
from ..errors import ConfigError

ARRIVAL_KINDS = ("poisson", "gamma", "trace")
TRACE_FORMATS = ("azure_llm_2023", "generic")
POPULARITY_KINDS = ("uniform", "zipf", "weights", "gamma_streams", "function_trace", "trace")
FUNCTION_FORMATS = ("azure_functions_2019", "azure_functions_2021")
LENGTH_KINDS = ("fixed", "uniform", "lognormal", "empirical")
STREAM_POPULARITY = ("gamma_streams", "function_trace")
MAX_TOKENS = 2**31 - 1  # bound on any token count (no context is that long)
FILTERS = (
    "min_prompt_tokens",
    "max_prompt_tokens",
    "min_output_tokens",
    "max_output_tokens",
    "max_total_tokens",
)


def key(path: str, name: str) -> str:
    """`path.name`, or `name` at the top level."""
    return f"{path}.{name}" if path else name


def _check_fields(
    obj: Any, path: str, fields: tuple[str, ...], kind: str, needed: set[str]
) -> None:
    """Raise if a field in `needed` is unset, or a field of `fields` outside `needed` is set."""
    for name in fields:
        value = getattr(obj, name)
        if name in needed and value is None:
            raise ConfigError(f"{key(path, name)}: required for kind {kind!r}")
        if name not in needed and value is not None:
            raise ConfigError(f"{key(path, name)}: not used by kind {kind!r}; remove it")


def _check_pair(path: str, lo_name: str, lo: float | None, hi_name: str, hi: float | None) -> None:
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{key(path, hi_name)}: must be >= {lo_name} ({lo}), got {hi}")


@dataclass(frozen=True, slots=True)
class ArrivalConfig:
    """When requests arrive. `poisson` and `gamma` are one aggregate process, or one process per
    adapter when `popularity.kind` is `gamma_streams` / `function_trace` (then `cv` is per
    stream). `trace` replays a CSV; its times are divided by `rate_scale`, or rescaled so that
    the mean rate is `rate_per_s`."""

    kind: str = spec("poisson", choices=ARRIVAL_KINDS)
    rate_per_s: float | None = spec(None, gt=0, doc="requests per second (all adapters)")
    cv: float | None = spec(None, gt=0, doc="coefficient of variation of inter-arrivals")
    path: str | None = spec(None, nonempty=True, doc="trace CSV, relative to the scenario file")
    format: str | None = spec(None, choices=TRACE_FORMATS, doc="trace format; auto if unset")
    rate_scale: float | None = spec(None, gt=0, doc="trace speed-up: arrival_s / rate_scale")

    def validate(self, path: str) -> None:
        fields = ("rate_per_s", "cv", "path", "format", "rate_scale")
        if self.kind == "poisson":
            _check_fields(self, path, fields, self.kind, {"rate_per_s"})
        elif self.kind == "gamma":
            _check_fields(self, path, fields, self.kind, {"rate_per_s", "cv"})
        else:
            _check_fields(self, path, ("path", "cv"), self.kind, {"path"})
            if self.rate_per_s is not None and self.rate_scale is not None:
                raise ConfigError(
                    f"{key(path, 'rate_scale')}: set either rate_scale or rate_per_s, not both"
                )

    @property
    def stream_cv(self) -> float:
        """CV of the (per-adapter or aggregate) synthetic process: 1 for Poisson."""
        return 1.0 if self.cv is None else self.cv


@dataclass(frozen=True, slots=True)
class PopularityConfig:
    """Which adapter each request uses. `zipf`: share of adapter k proportional to
    1 / (k + 1) ** alpha (adapter 0 most popular). `gamma_streams`: one Gamma process per
    adapter with rate `arrival.rate_per_s * share` (shares from `alpha` or `weights`).
    `function_trace`: dLoRA's mapping of an Azure Functions trace (PAPER.md section 7).
    `trace`: the arrival trace's adapter column."""

    kind: str = spec("uniform", choices=POPULARITY_KINDS)
    alpha: float | None = spec(None, ge=0, doc="power-law exponent (zipf, gamma_streams)")
    weights: tuple[float, ...] | None = spec(None, ge=0, doc="one weight per adapter")
    path: str | None = spec(None, nonempty=True, doc="function trace file (function_trace)")
    format: str | None = spec(None, choices=FUNCTION_FORMATS, doc="function trace format")
    stride: int | None = spec(None, ge=1, doc="consecutive functions per adapter block (1)")
    bin_s: float | None = spec(None, gt=0, doc="popularity bin length in trace time (3600)")
    sort: bool | None = spec(None, doc="sort functions by invocations first (true)")
    window_start_s: float | None = spec(None, ge=0, doc="trace time where bins start")
    window_end_s: float | None = spec(None, gt=0, doc="trace time where bins end")

    def validate(self, path: str) -> None:
        fields = (
            "alpha",
            "weights",
            "path",
            "format",
            "stride",
            "bin_s",
            "sort",
            "window_start_s",
            "window_end_s",
        )
        if self.kind == "function_trace":
            _check_fields(self, path, ("alpha", "weights", "path"), self.kind, {"path"})
            _check_pair(
                path, "window_start_s", self.window_start_s, "window_end_s", self.window_end_s
            )
            return
        needed: set[str] = {"zipf": {"alpha"}, "weights": {"weights"}}.get(self.kind, set())
        if self.kind == "gamma_streams":
            if (self.alpha is None) == (self.weights is None):
                raise ConfigError(
                    f"{key(path, 'alpha')}: kind 'gamma_streams' needs exactly one "
                    "of alpha (power-law shares) or weights"
                )
            needed = {"alpha"} if self.alpha is not None else {"weights"}
        _check_fields(self, path, fields, self.kind, needed)
        if self.weights is not None:
            if not self.weights:
                raise ConfigError(f"{key(path, 'weights')}: must not be empty")
            if sum(self.weights) <= 0:
                raise ConfigError(f"{key(path, 'weights')}: at least one weight must be > 0")


@dataclass(frozen=True, slots=True)
class LengthsConfig:
    """Prompt and output token counts. With trace arrivals the trace's lengths are used (leave
    `kind` unset) unless `override: true`. Filters keep requests with min <= tokens <= max
    (rows of the empirical table, redraws for uniform / lognormal, dropped trace requests);
    `scale` then multiplies both lengths (rounded, at least 1)."""

    kind: str | None = spec(None, choices=LENGTH_KINDS)
    prompt_tokens: int | None = spec(None, ge=1, le=MAX_TOKENS, doc="fixed")
    output_tokens: int | None = spec(None, ge=1, le=MAX_TOKENS, doc="fixed")
    prompt_range: tuple[int, ...] | None = spec(None, ge=1, le=MAX_TOKENS, doc="uniform: [low, high] inclusive")
    output_range: tuple[int, ...] | None = spec(None, ge=1, le=MAX_TOKENS, doc="uniform: [low, high] inclusive")
    prompt_mean: float | None = spec(None, gt=0, doc="lognormal: mean tokens")
    prompt_median: float | None = spec(None, gt=0, doc="lognormal: median tokens")
    prompt_sigma: float | None = spec(None, ge=0, doc="lognormal: sigma of log(tokens)")
    output_mean: float | None = spec(None, gt=0)
    output_median: float | None = spec(None, gt=0)
    output_sigma: float | None = spec(None, ge=0)
    path: str | None = spec(None, nonempty=True, doc="empirical: lengths CSV")
    min_prompt_tokens: int | None = spec(None, ge=1, le=MAX_TOKENS)
    max_prompt_tokens: int | None = spec(None, ge=1, le=MAX_TOKENS)
    min_output_tokens: int | None = spec(None, ge=1, le=MAX_TOKENS)
    max_output_tokens: int | None = spec(None, ge=1, le=MAX_TOKENS)
    max_total_tokens: int | None = spec(None, ge=2, le=MAX_TOKENS, doc="prompt + output")
    scale: float = spec(1.0, gt=0, doc="multiplies both lengths (Fig. 11b)")
    override: bool = spec(False, doc="sample lengths even when the arrival trace has them")

    def validate(self, path: str) -> None:
        fields = (
            "prompt_tokens",
            "output_tokens",
            "prompt_range",
            "output_range",
            "prompt_mean",
            "prompt_median",
            "prompt_sigma",
            "output_mean",
            "output_median",
            "output_sigma",
            "path",
        )
        needed: set[str] = set()
        if self.kind == "fixed":
            needed = {"prompt_tokens", "output_tokens"}
        elif self.kind == "uniform":
            needed = {"prompt_range", "output_range"}
        elif self.kind == "empirical":
            needed = {"path"}
        elif self.kind == "lognormal":
            for side in ("prompt", "output"):
                mean, median = getattr(self, f"{side}_mean"), getattr(self, f"{side}_median")
                if (mean is None) == (median is None):
                    raise ConfigError(
                        f"{key(path, side + '_mean')}: kind 'lognormal' needs "
                        f"exactly one of {side}_mean or {side}_median"
                    )
                needed |= {
                    f"{side}_sigma",
                    f"{side}_mean" if mean is not None else f"{side}_median",
                }
        if self.kind is None:
            for name in fields:
                if getattr(self, name) is not None:
                    raise ConfigError(f"{key(path, name)}: set {key(path, 'kind')} to use it")
        else:
            _check_fields(self, path, fields, self.kind, needed)
        for name in ("prompt_range", "output_range"):
            rng = getattr(self, name)
            if rng is not None and (len(rng) != 2 or rng[0] > rng[1]):
                raise ConfigError(
                    f"{key(path, name)}: must be [low, high] with low <= high, got {list(rng)}"
                )
        if self.kind == "fixed":
            for name in FILTERS:
                if getattr(self, name) is not None:
                    raise ConfigError(f"{key(path, name)}: not used by kind 'fixed'; remove it")
        _check_pair(
            path,
            "min_prompt_tokens",
            self.min_prompt_tokens,
            "max_prompt_tokens",
            self.max_prompt_tokens,
        )
        _check_pair(
            path,
            "min_output_tokens",
            self.min_output_tokens,
            "max_output_tokens",
            self.max_output_tokens,
        )

    @property
    def has_filters(self) -> bool:
        return any(getattr(self, name) is not None for name in FILTERS)


PREFIX_KINDS = ("none", "per_adapter", "groups")


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    """Shared prompt prefixes (system prompts), for prefix caching. `per_adapter`: every
    request of an adapter starts with that adapter's `tokens`-token system prompt; `groups`:
    each request starts with one of `groups` system prompts, drawn uniformly. A prompt shorter
    than the prefix is all prefix. Prefixes of different adapters never share KV."""

    kind: str = spec("none", choices=PREFIX_KINDS)
    tokens: int | None = spec(None, ge=1, doc="system prompt length in tokens")
    groups: int | None = spec(None, ge=1, doc="number of system prompts (kind groups)")

    def validate(self, path: str) -> None:
        if self.kind != "none" and self.tokens is None:
            raise ConfigError(f"{key(path, 'tokens')}: required for kind {self.kind!r}")
        if self.kind == "none" and self.tokens is not None:
            raise ConfigError(f"{key(path, 'kind')}: set it (per_adapter or groups) to use tokens")
        if (self.kind == "groups") != (self.groups is not None):
            raise ConfigError(f"{key(path, 'groups')}: required for kind 'groups' and only there")


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """The scenario's `workload:` section. The run issues `num_requests` requests, or those
    arriving before `duration_s`, or both limits (whichever comes first); a trace (arrival or
    function trace) may leave both unset to use its whole length."""

    arrival: ArrivalConfig
    popularity: PopularityConfig = spec(factory=PopularityConfig)
    lengths: LengthsConfig = spec(factory=LengthsConfig)
    prefix: PrefixConfig = spec(factory=PrefixConfig)
    num_requests: int | None = spec(None, ge=1)
    duration_s: float | None = spec(None, gt=0)

    def validate(self, path: str) -> None:
        self.arrival.validate(key(path, "arrival"))
        self.popularity.validate(key(path, "popularity"))
        self.lengths.validate(key(path, "lengths"))
        self.prefix.validate(key(path, "prefix"))
        arrival, popularity, lengths = self.arrival, self.popularity, self.lengths
        is_trace = arrival.kind == "trace"
        has_length = is_trace or popularity.kind == "function_trace"
        if self.num_requests is None and self.duration_s is None and not has_length:
            raise ConfigError(
                f"{key(path, 'num_requests')}: set num_requests or duration_s "
                "(or both; the run stops at whichever comes first)"
            )
        if popularity.kind in STREAM_POPULARITY and is_trace:
            raise ConfigError(
                f"{key(path, 'popularity.kind')}: {popularity.kind!r} generates its "
                "own arrivals; needs arrival.kind poisson or gamma, not trace"
            )
        if popularity.kind == "trace" and (not is_trace or arrival.format == "azure_llm_2023"):
            raise ConfigError(
                f"{key(path, 'popularity.kind')}: 'trace' takes adapters from a "
                "generic arrival trace's adapter column; needs arrival.kind "
                "trace with format generic"
            )
        lkey = key(path, "lengths")
        if is_trace:
            if lengths.kind is not None and not lengths.override:
                raise ConfigError(
                    f"{key(lkey, 'kind')}: the arrival trace carries lengths; set "
                    f"{key(lkey, 'override')}: true to sample them instead"
                )
            if lengths.override and lengths.kind is None:
                raise ConfigError(
                    f"{key(lkey, 'kind')}: required when override is true "
                    f"(one of {', '.join(LENGTH_KINDS)})"
                )
        else:
            if lengths.kind is None:
                raise ConfigError(
                    f"{key(lkey, 'kind')}: required for arrival kind "
                    f"{arrival.kind!r} (one of {', '.join(LENGTH_KINDS)})"
                )
            if lengths.override:
                raise ConfigError(f"{key(lkey, 'override')}: only applies to trace arrivals")
