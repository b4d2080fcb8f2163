"""Next-token sampling: greedy, or temperature + top-p with a per-request seed.

Randomness is a pure function of (seed, output index): the request's `torch.Generator` is
re-seeded before each draw, so a request preempted, recomputed or migrated to another replica
samples exactly the tokens it would have sampled uninterrupted.
"""

from __future__ import annotations

import torch

from dlora.types import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)
_MIX = 0x9E3779B97F4A7C15


def step_seed(seed: int, output_index: int) -> int:
    """A 63-bit seed for the draw of output token `output_index`."""
    return ((seed * _MIX) ^ (output_index * 0xBF58476D1CE4E5B9) ^ 0x94D049BB133111EB) & (
        (1 << 63) - 1
    )


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with tokens outside the smallest set of cumulative probability >= top_p masked."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams | None],
    seeds: list[int],
    output_indexes: list[int],
    generator: torch.Generator | None = None,
) -> list[int]:
    """One token per row of `logits` (N, vocab) float32."""
    greedy = logits.argmax(-1).tolist()
    out: list[int] = []
    gen = generator or torch.Generator(device=logits.device)
    for i, p in enumerate(params):
        p = p or _GREEDY
        if p.temperature <= 0.0:
            out.append(int(greedy[i]))
            continue
        row = top_p_filter(logits[i] / p.temperature, p.top_p)
        gen.manual_seed(step_seed(seeds[i], output_indexes[i]))
        out.append(int(torch.multinomial(row.softmax(-1), 1, generator=gen).item()))
    return out
