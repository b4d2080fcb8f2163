"""Sampling math (issue 15, defect 4) against reference implementations written here (numpy)
or transformers' own logits processors: logit_bias, repetition (HF's
RepetitionPenaltyLogitsProcessor), frequency and presence penalties (OpenAI's definition),
min_p, top_k, top_p, and their order (vLLM v1: bias, penalties, temperature, min_p, top_k,
top_p); greedy sees the bias and the penalties; seeded draws are reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlora.exec.sampling import (
    apply_logit_bias,
    apply_penalties,
    distribution,
    min_p_filter,
    processed_logits,
    sample,
    top_k_filter,
    top_p_filter,
)
from dlora.types import SamplingParams

VOCAB = 50


def logits_row(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=g) * 3


def ref_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def ref_penalties(x: np.ndarray, prompt: list[int], output: list[int], rep: float, freq: float,
                  pres: float) -> np.ndarray:
    x = x.copy()
    for t in set(prompt) | set(output):  # CTRL / HF: divide positive, multiply negative
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):  # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence
        x[t] -= output.count(t) * freq + pres
    return x


def ref_min_p(x: np.ndarray, min_p: float) -> np.ndarray:
    p = ref_softmax(x)
    return np.where(p < min_p * p.max(), -np.inf, x)


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    kth = np.sort(x)[::-1][k - 1]
    return np.where(x < kth, -np.inf, x)


def ref_top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-x, kind="stable")
    p = ref_softmax(x)[order]
    before = np.cumsum(p) - p  # probability of the more likely tokens
    out = x.copy()
    out[order[before >= top_p]] = -np.inf
    return out


def test_logit_bias_adds_to_the_named_tokens():
    x = logits_row()
    got = apply_logit_bias(x, ((3, 5.0), (7, -100.0)))
    want = x.numpy().copy()
    want[3] += 5.0
    want[7] -= 100.0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("rep", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_hf_repetition_penalty_over_prompt_and_output(rep):
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits_row(1)
    prompt, output = [1, 4, 4, 9], [9, 11, 2]
    got = apply_penalties(x, prompt, output, repetition=rep)
    hf = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([prompt + output]), x[None].clone())[0]
    torch.testing.assert_close(got, hf)
    np.testing.assert_allclose(got.numpy(), ref_penalties(x.numpy(), prompt, output, rep, 0, 0), rtol=1e-6)


def test_frequency_and_presence_penalties_follow_openai_over_output_tokens_only():
    x = logits_row(2)
    prompt, output = [5, 6], [6, 7, 7, 7, 8]
    got = apply_penalties(x, prompt, output, frequency=0.7, presence=-1.5)
    want = ref_penalties(x.numpy(), prompt, output, 1.0, 0.7, -1.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert got[5] == x[5]  # a prompt token is not penalized by frequency/presence


def test_all_penalties_together_and_bias_first():
    x = logits_row(3)
    p = SamplingParams(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=0.9,
                       logit_bias=((2, 3.0), (20, -2.0)))
    prompt, output = [2, 3, 3], [20, 21, 21]
    biased = x.numpy().copy()
    biased[2] += 3.0
    biased[20] -= 2.0
    want = ref_penalties(biased, prompt, output, 1.7, 0.4, 0.9)
    np.testing.assert_allclose(processed_logits(x, p, prompt, output).numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p(min_p):
    from transformers import MinPLogitsWarper

    x = logits_row(4)
    got = min_p_filter(x, min_p).numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref_min_p(x.numpy(), min_p)))
    if min_p > 0:
        hf = MinPLogitsWarper(min_p)(None, x[None].clone())[0]
        np.testing.assert_array_equal(np.isinf(got), torch.isinf(hf).numpy())


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k(k):
    x = logits_row(5)
    np.testing.assert_array_equal(top_k_filter(x, k).numpy(), ref_top_k(x.numpy(), k))
    assert torch.equal(top_k_filter(x, 0), x) and torch.equal(top_k_filter(x, VOCAB), x)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
def test_top_p(top_p):
    x = logits_row(6)
    np.testing.assert_array_equal(np.isinf(top_p_filter(x, top_p).numpy()),
                                  np.isinf(ref_top_p(x.numpy(), top_p)))


def test_the_distribution_applies_temperature_then_min_p_top_k_top_p():
    x = logits_row(7)
    p = SamplingParams(temperature=0.7, min_p=0.02, top_k=12, top_p=0.8)
    ref = ref_top_p(ref_top_k(ref_min_p(x.numpy() / 0.7, 0.02), 12), 0.8)
    np.testing.assert_allclose(distribution(x, p).numpy(), ref_softmax(ref), atol=1e-6)


def test_greedy_sees_bias_and_penalties():
    x = logits_row(8)
    best = int(x.argmax())
    forced = SamplingParams(logit_bias=((best ^ 1, 100.0),))
    assert sample(x[None], [forced], [0], [0]) == [best ^ 1]
    penalized = SamplingParams(presence_penalty=2.0, repetition_penalty=2.0)
    want = int(np.argmax(ref_penalties(x.numpy(), [], [best], 2.0, 0.0, 2.0)))
    assert sample(x[None], [penalized], [0], [1], histories=[((), [best])]) == [want]
    assert sample(x[None], [None], [0], [0]) == [best]


def test_seeded_draws_repeat_and_follow_the_distribution():
    x = logits_row(9)
    p = SamplingParams(temperature=1.0, top_k=3)
    draws = [sample(x[None], [p], [s], [0])[0] for s in range(300)]
    assert draws == [sample(x[None], [p], [s], [0])[0] for s in range(300)]
    allowed = set(torch.topk(x, 3).indices.tolist())
    assert set(draws) <= allowed and len(set(draws)) > 1
    top_1 = SamplingParams(temperature=1.5, top_k=1)
    assert {sample(x[None], [top_1], [s], [0])[0] for s in range(20)} == {int(x.argmax())}


def test_token_logprobs_are_the_raw_log_softmax():
    from dlora.exec.sampling import token_logprobs

    x = logits_row(10)
    ref = x.double().numpy() - np.log(np.exp(x.double().numpy()).sum())
    lp = token_logprobs(x, 4, 3)
    assert lp.token_id == 4 and lp.logprob == pytest.approx(ref[4], abs=1e-5)
    assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:3])
    np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref)[::-1][:3], atol=1e-5)
    assert token_logprobs(x, 4, 0).top == ()
