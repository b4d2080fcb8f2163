"""Latency profiles (DESIGN.md section 5): the YAML format a profile is written in (`Profile`,
`load_profile`); `latency.LatencyModel` turns a batch's shape into seconds from one (its module
docstring gives the step-time formula and what each field prices).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import load_into, read_yaml_mapping, spec, to_plain
from .errors import ConfigError, ProfileError

FORMAT = "dlora-profile/1"
LORA_MODULES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True, slots=True)
class Provenance:
    how: str = spec(choices=("measured", "derived", "synthetic"))
    device: str = spec(nonempty=True)
    model: str = spec(nonempty=True)
    dtype: str = "float16"
    tensor_parallel: int = spec(1, ge=1)
    date: str = ""
    git_revision: str = ""
    torch_version: str = ""
    triton_version: str = ""
    command: str = ""
    sources: tuple[str, ...] = ()
    notes: str = ""


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str = spec(nonempty=True)
    num_layers: int = spec(ge=1)
    hidden_size: int = spec(ge=1)
    num_heads: int = spec(ge=1)
    num_kv_heads: int = spec(ge=1)
    intermediate_size: int = spec(ge=1)
    vocab_size: int = spec(ge=1)
    dtype_bytes: int = spec(2, ge=1)
    max_context_tokens: int = spec(4096, ge=1)
    tensor_parallel: int = spec(1, ge=1)
    head_dim_override: int = spec(0, ge=0, doc="attention head width when it is not hidden_size / "
                                  "num_heads (Qwen3: 128); 0 = hidden_size / num_heads")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    def module_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a LoRA target module (whole model, before tensor parallelism)."""
        kv_out = self.num_kv_heads * self.head_dim
        q_out = self.num_heads * self.head_dim
        dims = {
            "q": (self.hidden_size, q_out),
            "k": (self.hidden_size, kv_out),
            "v": (self.hidden_size, kv_out),
            "o": (q_out, self.hidden_size),
            "gate": (self.hidden_size, self.intermediate_size),
            "up": (self.hidden_size, self.intermediate_size),
            "down": (self.intermediate_size, self.hidden_size),
        }
        if module not in dims:
            raise ProfileError(f"unknown LoRA target module {module!r} (known: {', '.join(dims)})")
        return dims[module]

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights (embeddings, layers, LM head), whole model."""
        per_layer = sum(i * o for i, o in (self.module_dims(m) for m in LORA_MODULES))
        per_layer += 2 * self.hidden_size
        total = self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size
        return total * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token, whole model (divide by tensor_parallel per GPU)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def adapter_bytes(self, rank: int, modules: tuple[str, ...] = LORA_MODULES) -> int:
        """Bytes of a LoRA adapter of this rank on these modules (its own rank, no padding)."""
        per_layer = sum(rank * (i + o) for i, o in (self.module_dims(m) for m in modules))
        return self.num_layers * per_layer * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class Memory:
    device_bytes: int = spec(gt=0, doc="memory of the replica's devices together")
    reserved_bytes: int = spec(0, ge=0, doc="activations, workspace and runtime overhead")
    host_swap_bytes: int = spec(0, ge=0, doc="host memory for swapped-out KV per replica")


@dataclass(frozen=True, slots=True)
class Curve:
    """Piecewise-linear seconds as a function of tokens (linear extrapolation at the ends)."""

    tokens: tuple[int, ...] = spec(nonempty=True)
    seconds: tuple[float, ...] = spec(nonempty=True, ge=0.0)

    def validate(self, path: str) -> None:
        if len(self.tokens) != len(self.seconds):
            raise ConfigError(f"{path}: tokens and seconds must have the same length")
        if list(self.tokens) != sorted(set(self.tokens)):
            raise ConfigError(f"{path}.tokens: must be strictly increasing")

    def __call__(self, tokens: float) -> float:
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1:
            return ys[0] * max(tokens, 1) / max(xs[0], 1)
        i = bisect.bisect_left(xs, tokens)
        i = min(max(i, 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))


@dataclass(frozen=True, slots=True)
class LoraCost:
    """Unmerged side path: fixed + per_adapter x adapters + per_adapter_rank x sum of their ranks
    + per_token x LoRA tokens + per_token_rank x sum over tokens of their adapter's rank."""

    fixed_s: float = spec(0.0, ge=0.0)
    per_adapter_s: float = spec(0.0, ge=0.0)
    per_adapter_rank_s: float = spec(0.0, ge=0.0)
    per_token_s: float = spec(0.0, ge=0.0)
    per_token_rank_s: float = spec(0.0, ge=0.0)


@dataclass(frozen=True, slots=True)
class RankCost:
    base_s: float = spec(0.0, ge=0.0)
    per_rank_s: float = spec(0.0, ge=0.0)

    def __call__(self, rank: int) -> float:
        return self.base_s + self.per_rank_s * rank


@dataclass(frozen=True, slots=True)
class Transfer:
    bandwidth_bytes_per_s: float = spec(gt=0.0)
    fixed_s: float = spec(0.0, ge=0.0)
    overlap: bool = False  # overlapped with compute (layer-by-layer pipelining)

    def seconds(self, num_bytes: float) -> float:
        return 0.0 if num_bytes <= 0 else self.fixed_s + num_bytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True)
class Latency:
    linear: Curve
    per_seq_s: float = spec(0.0, ge=0.0)
    scheduler_s: float = spec(0.0, ge=0.0, doc="per iteration: dlora's own scheduling on the host CPU")
    attention_decode_s_per_token: float = spec(0.0, ge=0.0)
    attention_prefill_s_per_pair: float = spec(0.0, ge=0.0)
    attention_mixed_s_per_decode_token: float = spec(
        0.0, ge=0.0, doc="extra seconds per decode context token in an iteration that also has prefill "
        "tokens (decode attention run by the prefill kernel); 0 in profiles without it")
    attention_mixed_s_per_decode_seq: float = spec(
        0.0, ge=0.0, doc="extra seconds per decoding sequence in an iteration that also has prefill "
        "tokens; 0 in profiles without it")
    attention_skew_decode: float = spec(
        0.0, ge=0.0, le=1.0, doc="decode attention over contexts of unequal length: the share of the gap "
        "to a batch where every sequence had the longest context that it pays (LLMServingSim's alpha, "
        "pure-decode iterations); 0 in profiles without it")
    attention_skew_mixed: float = spec(
        0.0, ge=0.0, le=1.0, doc="the same share in iterations that also carry prefill tokens")
    lora: LoraCost = field(kw_only=True)  # required: a missing cost would silently be free
    merge: RankCost = field(kw_only=True)
    unmerge: RankCost = field(kw_only=True)
    switch: RankCost | None = None  # fused unmerge+merge in one pass (rank = sum of both); else the sum
    adapter_load: Transfer = field(default_factory=lambda: Transfer(bandwidth_bytes_per_s=25e9))
    swap: Transfer = field(default_factory=lambda: Transfer(bandwidth_bytes_per_s=25e9))
    kv_transfer: Transfer = field(default_factory=lambda: Transfer(bandwidth_bytes_per_s=12.5e9))


@dataclass(frozen=True, slots=True)
class BaselineCost:
    """What one baseline system costs beyond this profile's kernels (module docstring)."""

    how: str = spec(choices=("measured", "cited", "derived"),
                    doc="measured here (a benchmark's command in provenance), cited from a named "
                    "publication, or derived from a cited figure by a stated computation")
    provenance: str = spec(nonempty=True, doc="what was measured or cited, on what, with which command")
    step_cost_factor: float = spec(
        1.0, gt=0.0, le=1000.0, doc="seconds of one of the system's iterations / this profile's at the same "
        "shape (for peft: transformers + PEFT eager forward against dlora's executor); 1 = this profile's kernels")


@dataclass(frozen=True, slots=True)
class BaselineCosts:
    """Per baseline policy (registry names); an absent entry = this profile's own kernels."""

    peft: BaselineCost | None = None
    vllm: BaselineCost | None = None


@dataclass(frozen=True, slots=True)
class Range:
    max_batch_tokens: int = spec(ge=1)
    max_decode_seqs: int = spec(ge=1)
    max_context_tokens: int = spec(ge=1)


@dataclass(frozen=True, slots=True)
class Profile:
    format: str = spec(choices=(FORMAT,))
    provenance: Provenance = spec()
    model: ModelShape = spec()
    memory: Memory = spec()
    latency: Latency = spec()
    range: Range = spec()
    fit_error: dict[str, float] = spec(factory=dict)
    baselines: BaselineCosts = spec(factory=BaselineCosts, doc="what the compared systems cost "
                                    "beyond this profile's kernels (optional; module docstring)")

    def dump(self) -> str:
        data = to_plain(self)
        if not any(data["baselines"].values()):  # absent: profiles written before it read the same
            del data["baselines"]
        return yaml.safe_dump(data, sort_keys=False, width=100)


def load_profile(path: str | Path) -> Profile:
    """Load and validate a profile YAML; errors name the file and key path."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile {p}: no such file")
    try:
        data = read_yaml_mapping(p, "profile", where=f"profile {p}")
    except ConfigError as exc:
        raise ProfileError(str(exc)) from None
    try:
        return load_into(Profile, data)
    except ConfigError as exc:
        raise ProfileError(f"profile {p}: {exc}") from None


def replace(profile: Profile, **changes: Any) -> Profile:
    return dataclasses.replace(profile, **changes)
