"""Batches for the LoRA kernel tests: adapter-popularity patterns x mixed ranks (punica style)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dlora.kernels import make_segments

MIXED_RANKS = (4, 8, 16, 64)
PATTERNS = (
    "all_distinct",  # every token its own adapter (decode, BGMV-like)
    "uniform",  # adapters drawn uniformly, tokens in arrival order (many short segments)
    "uniform_sorted",  # the same, grouped by adapter (SGMV-like)
    "skewed",  # power-law popularity
    "identical",  # one adapter for the whole batch
    "some_none",  # tokens without LoRA mixed in
    "prefill",  # long segments, several token blocks each
)


@dataclass(frozen=True, slots=True)
class LoraCase:
    per_token: list[int]
    ranks: tuple[int, ...]
    x: torch.Tensor
    y: torch.Tensor
    a_packed: torch.Tensor
    bt_packed: torch.Tensor
    rank_offsets: torch.Tensor
    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    scales: torch.Tensor

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    def adapter_rows(self, k: int) -> slice:
        start = int(self.rank_offsets[k])
        return slice(start, start + self.ranks[k])


def adapter_pattern(name: str, num_tokens: int, num_adapters: int, seed: int = 0) -> list[int]:
    """Adapter index per token for one popularity pattern."""
    rng = np.random.default_rng(seed)
    if name == "all_distinct":
        return [t % num_adapters for t in range(num_tokens)]
    if name in ("uniform", "uniform_sorted"):
        drawn = rng.integers(0, num_adapters, size=num_tokens).tolist()
        return sorted(drawn) if name == "uniform_sorted" else drawn
    if name == "skewed":
        weights = 1.0 / np.arange(1, num_adapters + 1) ** 1.5
        return rng.choice(num_adapters, size=num_tokens, p=weights / weights.sum()).tolist()
    if name == "identical":
        return [num_adapters - 1] * num_tokens
    if name == "some_none":
        drawn = rng.integers(-1, num_adapters, size=num_tokens)
        drawn[:2] = -1
        return drawn.tolist()
    if name == "prefill":
        lengths = (37, 5, 20, 1)
        adapters = (num_adapters - 1, -1, 0, 1)
        return [a for a, n in zip(adapters, lengths, strict=True) for _ in range(n)]
    raise ValueError(f"unknown pattern {name!r}")


def make_case(
    per_token: list[int],
    ranks: tuple[int, ...] = MIXED_RANKS,
    d_in: int = 64,
    d_out: int = 48,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoraCase:
    """Random weights of the given ranks, activations, and a non-zero base output ``y``."""
    gen = torch.Generator().manual_seed(seed)
    sum_r = sum(ranks)
    num_tokens = len(per_token)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    seg_starts, seg_adapters = make_segments(per_token)
    offsets = torch.tensor([0, *np.cumsum(ranks).tolist()], dtype=torch.int64)
    return LoraCase(
        per_token=list(per_token),
        ranks=tuple(ranks),
        x=randn(num_tokens, d_in),
        y=randn(num_tokens, d_out),
        a_packed=randn(sum_r, d_in, scale=d_in**-0.5),
        bt_packed=randn(sum_r, d_out, scale=0.5),
        rank_offsets=offsets,
        seg_starts=seg_starts,
        seg_adapters=seg_adapters,
        scales=torch.linspace(0.5, 2.0, len(ranks)),
    )


def pattern_case(
    name: str, dtype: torch.dtype = torch.float32, num_tokens: int = 24, **kwargs
) -> LoraCase:
    """A batch of one popularity pattern; ``all_distinct`` gets one adapter per token."""
    if "ranks" not in kwargs:
        count = num_tokens if name == "all_distinct" else len(MIXED_RANKS)
        kwargs["ranks"] = tuple(MIXED_RANKS[k % len(MIXED_RANKS)] for k in range(count))
    per_token = adapter_pattern(name, num_tokens, len(kwargs["ranks"]))
    return make_case(per_token, dtype=dtype, **kwargs)


def naive_per_token(case: LoraCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token in float64: ``(v, y + delta)``, an independent check of the reference."""
    v = torch.zeros(len(case.per_token), case.max_rank, dtype=torch.float64)
    y = case.y.double().clone()
    for t, k in enumerate(case.per_token):
        if k < 0:
            continue
        rows = case.adapter_rows(k)
        v[t, : case.ranks[k]] = case.a_packed[rows].double() @ case.x[t].double()
        y[t] += float(case.scales[k]) * (case.bt_packed[rows].double().T @ v[t, : case.ranks[k]])
    return v, y


TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 4e-2, "atol": 4e-2},
}
