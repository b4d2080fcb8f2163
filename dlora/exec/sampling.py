"""Next-token sampling with vLLM's parameters, in vLLM v1's order (vllm/v1/sample/sampler.py):

1. `logit_bias` added to the raw logits (float32);
2. penalties: repetition (HF's / CTRL's: a logit of a token seen in the prompt or the output is
   divided by the penalty when positive, multiplied when not), then OpenAI's frequency and
   presence penalties over the output tokens: `logit -= frequency * count + presence * (count>0)`;
3. temperature 0: argmax of those logits (greedy); else divide by the temperature, then
   min_p (drop tokens whose probability is below min_p times the largest), top_k (keep the k
   largest logits, ties with the k-th kept), top_p (the smallest set whose probability reaches
   top_p, the token that crosses it kept), and draw from the softmax.

Randomness is a pure function of (seed, output index): the request's `torch.Generator` is
re-seeded before each draw, so a request preempted, recomputed or migrated to another replica
samples exactly the tokens it would have sampled uninterrupted.

Log-probabilities (`token_logprobs`) are those of the raw logits, before any of the steps
above (vLLM's default `logprobs_mode="raw_logprobs"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dlora.types import SamplingParams, TokenLogprobs

_GREEDY = SamplingParams(temperature=0.0)
_MIX = 0x9E3779B97F4A7C15


def step_seed(seed: int, output_index: int) -> int:
    """A 63-bit seed for the draw of output token `output_index`."""
    return ((seed * _MIX) ^ (output_index * 0xBF58476D1CE4E5B9) ^ 0x94D049BB133111EB) & (
        (1 << 63) - 1
    )


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """`logits` (vocab,) plus each (token id, bias)."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
    values = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, values)


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    repetition: float = 1.0,
    frequency: float = 0.0,
    presence: float = 0.0,
) -> torch.Tensor:
    """vLLM's `apply_penalties` for one row `logits` (vocab,): repetition over the prompt and
    output tokens, frequency and presence over the output tokens."""
    vocab, dev = logits.shape[-1], logits.device
    out = torch.tensor(list(output_ids), dtype=torch.long, device=dev)
    counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
    if repetition != 1.0:
        seen = counts > 0
        if prompt_ids:
            seen = seen.clone()
            seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=dev)] = True
        scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, scaled, logits)
    if frequency != 0.0:
        logits = logits - frequency * counts
    if presence != 0.0:
        logits = logits - presence * (counts > 0).to(logits.dtype)
    return logits


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Logits with tokens less likely than min_p times the most likely token masked."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    drop = probs < min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits below the k-th largest masked (k <= 0 or >= vocab: unchanged)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with tokens outside the smallest set of cumulative probability >= top_p masked."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _adjusts(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or (
        p.presence_penalty != 0.0
    )


def processed_logits(
    row: torch.Tensor, p: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """Steps 1-2 (logit_bias, penalties) for one row (vocab,) float32."""
    row = apply_logit_bias(row, p.logit_bias)
    return apply_penalties(
        row, prompt_ids, output_ids, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
    )


def distribution(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Step 3 for a sampled (temperature > 0) row: the probabilities drawn from."""
    row = min_p_filter(row / p.temperature, p.min_p)
    return top_p_filter(top_k_filter(row, p.top_k), p.top_p).softmax(-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams | None],
    seeds: list[int],
    output_indexes: list[int],
    generator: torch.Generator | None = None,
    histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
) -> list[int]:
    """One token per row of `logits` (N, vocab) float32. `histories`: each row's (prompt ids,
    output ids so far), which the penalties read (None: no history, penalties see nothing)."""
    greedy = logits.argmax(-1).tolist()
    out: list[int] = []
    gen = generator or torch.Generator(device=logits.device)
    for i, p in enumerate(params):
        p = p or _GREEDY
        row = logits[i]
        if _adjusts(p):
            prompt_ids, output_ids = histories[i] if histories is not None else ((), ())
            row = processed_logits(row.float(), p, prompt_ids, output_ids)
        elif p.temperature <= 0.0:
            out.append(int(greedy[i]))
            continue
        if p.temperature <= 0.0:
            out.append(int(row.argmax(-1).item()))
            continue
        gen.manual_seed(step_seed(seeds[i], output_indexes[i]))
        out.append(int(torch.multinomial(distribution(row, p), 1, generator=gen).item()))
    return out


def token_logprobs(row: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    """The sampled token's log-probability and the `num_top` largest (log-softmax of the raw
    logits `row` (vocab,), float32)."""
    logp = row.float().log_softmax(-1)
    top: tuple[tuple[int, float], ...] = ()
    if num_top > 0:
        values, ids = torch.topk(logp, min(num_top, logp.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token_id, float(logp[token_id].item()), top)
