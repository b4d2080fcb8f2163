"""The profile's `baselines` term (dlora/profile.py, issue 12): absent = today's timing, a
present term scales the compute terms for its own policy only, peft's static batches pad, and
bad values are one-line errors naming the key path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dlora.errors import ProfileError
from dlora.latency import LatencyModel
from dlora.profile import BaselineCost, BaselineCosts, load_profile
from dlora.types import BatchMode, BatchShape

REPO = Path(__file__).resolve().parents[1]
A800 = REPO / "profiles" / "a800-llama-2-7b.yaml"
TINY = REPO / "profiles" / "cpu-tiny-synthetic.yaml"


def shape(prefill: tuple[int, ...] = (), decode: tuple[int, ...] = (), rank: int = 16) -> BatchShape:
    """Fresh prompts of these lengths and decoding sequences at these contexts, one adapter."""
    tokens = sum(prefill) + len(decode)
    return BatchShape(
        prefill_tokens=sum(prefill), prefill_seqs=len(prefill), prefill_context_tokens=sum(prefill),
        decode_seqs=len(decode), decode_context_tokens=sum(decode), mode=BatchMode.UNMERGED,
        adapter_ranks=(rank,), lora_tokens=tokens, lora_token_rank=tokens * rank,
        prefill_attention_pairs=sum(p * (p + 1) // 2 for p in prefill),
        max_context_tokens=max((*prefill, *decode)), decode_max_context_tokens=max(decode, default=0))


def with_peft(factor: float, static: bool) -> LatencyModel:
    p = load_profile(A800)
    cost = BaselineCost(how="measured", provenance="test", step_cost_factor=factor)
    return LatencyModel(dataclasses.replace(p, baselines=BaselineCosts(peft=cost)), baseline="peft",
                        static_batches=static)


def test_absent_term_is_todays_timing_for_every_policy() -> None:
    p = load_profile(TINY)
    assert p.baselines == BaselineCosts()
    plain = LatencyModel(p)
    shapes = [shape(prefill=(30, 200)), shape(decode=(40, 300, 100)), shape((50,), (70, 90))]
    for name in ("peft", "vllm", "slora", "credit", None):
        m = LatencyModel(p, baseline=name)
        assert m.baseline_cost is None and m.latency is p.latency
        assert [m.step_s(s) for s in shapes] == [plain.step_s(s) for s in shapes]
    assert with_peft(1.0, False).latency == load_profile(A800).latency  # factor 1, continuous: the same


def test_the_term_prices_its_own_policy_only() -> None:
    p = load_profile(A800)
    assert p.baselines.peft is not None
    for name in ("slora", "credit", "unmerged_only", "vllm"):
        assert LatencyModel(p, baseline=name).latency is p.latency
    s = shape(decode=(100,) * 16)
    base = LatencyModel(p).step_s(s)
    assert with_peft(3.0, False).step_s(s) == pytest.approx(3.0 * base)
    assert LatencyModel(p).switch_s(16, 16) == with_peft(3.0, False).switch_s(16, 16)  # copies unchanged


def test_static_batches_pad_decode_to_the_longest_and_fresh_prompts_to_the_longest() -> None:
    plain, static = with_peft(1.0, False), with_peft(1.0, True)
    even, uneven = shape(decode=(400,) * 8), shape(decode=(50,) * 7 + (400,))
    assert static.step_s(even) == pytest.approx(plain.step_s(even))  # no gap, no padding
    assert static.step_s(uneven) == pytest.approx(plain.step_s(even))  # every row at 400
    prompts = shape(prefill=(20, 20, 20, 500))
    assert static.step_s(prompts) == pytest.approx(plain.step_s(shape(prefill=(500,) * 4)))
    one = shape(prefill=(300,))
    assert static.step_s(one) == plain.step_s(one)


def _bad(tmp_path: Path, peft: object) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["baselines"] = {"peft": peft}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


GOOD = {"how": "measured", "provenance": "bench", "step_cost_factor": 2.0}


@pytest.mark.parametrize(("change", "match"), [
    ({"step_cost_factor": 0}, r"baselines\.peft\.step_cost_factor"),
    ({"step_cost_factor": -1.5}, r"baselines\.peft\.step_cost_factor"),
    ({"step_cost_factor": "fast"}, r"baselines\.peft\.step_cost_factor"),
    ({"step_cost_factor": float("nan")}, r"baselines\.peft\.step_cost_factor"),
    ({"static_batches": True}, r"baselines\.peft\.static_batches"),  # the policy's parameter
    ({"how": "guessed"}, r"baselines\.peft\.how"),
    ({"provenance": ""}, r"baselines\.peft\.provenance"),
    ({"padding": 1}, r"baselines\.peft\.padding"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ProfileError, match=match) as exc:
        load_profile(_bad(tmp_path, {**GOOD, **change}))
    assert "\n" not in str(exc.value)


def test_unknown_baselines_are_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["baselines"] = {"slora": GOOD}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"baselines\.slora") as exc:
        load_profile(path)
    assert "\n" not in str(exc.value)


def test_a_profile_without_the_term_dumps_without_it() -> None:
    assert "baselines" not in load_profile(TINY).dump()
    assert "step_cost_factor: 5.1" in load_profile(A800).dump()


@pytest.mark.parametrize("name", ["cpu-demo-measured", "a800-llama-2-7b", "a800-llama-2-7b-artifact"])
def test_shipped_terms_state_how_they_were_obtained(name: str) -> None:
    cost = load_profile(REPO / "profiles" / f"{name}.yaml").baselines.peft
    assert cost is not None and cost.step_cost_factor > 1
    if name.startswith("cpu"):
        assert cost.how == "measured" and "bench_baseline_costs.py" in cost.provenance
    else:
        assert cost.how == "derived" and "cited" in cost.provenance and "8.6x" in cost.provenance
