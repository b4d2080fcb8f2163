"""Bad profiles and bad shapes (dlora/profile.py): LoRA, merge and unmerge costs are required;
a request's context beyond the measured range raises unless extrapolation is allowed; profiles
without the mixed-iteration terms load with them at 0; Qwen3's head_dim override sizes the KV
cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlora.errors import ProfileError
from dlora.latency import LatencyModel
from dlora.profile import load_profile
from dlora.types import BatchMode, BatchShape

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "profiles" / "cpu-tiny-synthetic.yaml"  # range: 1024 tokens, 64 seqs, 512 context


def decode(seqs: int, context: int, longest: int = 0) -> BatchShape:
    return BatchShape(prefill_tokens=0, prefill_context_tokens=0, decode_seqs=seqs,
                      decode_context_tokens=seqs * context, mode=BatchMode.MERGED, adapter_ranks=(),
                      lora_tokens=0, lora_token_rank=0, prefill_attention_pairs=0,
                      max_context_tokens=longest)


@pytest.mark.parametrize("key", ["lora", "merge", "unmerge"])
def test_lora_and_switch_costs_are_required(tmp_path: Path, key: str) -> None:
    data = yaml.safe_load(TINY.read_text())
    del data["latency"][key]
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=f"latency.{key}: required"):
        load_profile(bad)


def test_profiles_without_mixed_terms_load_with_zero() -> None:
    assert "attention_mixed" not in TINY.read_text()
    lat = load_profile(TINY).latency
    assert lat.attention_mixed_s_per_decode_token == 0 and lat.attention_mixed_s_per_decode_seq == 0


def test_a_context_beyond_the_range_raises_unless_extrapolation_allowed() -> None:
    profile = load_profile(TINY)
    strict, lenient = LatencyModel(profile), LatencyModel(profile, allow_extrapolation=True)
    assert strict.step_s(decode(2, 500, longest=512)) > 0
    with pytest.raises(ProfileError, match="100000 tokens of context.*allow_extrapolation"):
        strict.step_s(decode(1, 1000, longest=100_000))
    with pytest.raises(ProfileError, match="tokens of context"):  # no longest given: the mean
        strict.step_s(decode(4, 600))
    with pytest.raises(ProfileError, match="tokens of context"):
        strict.decode_step_s(1, 100_000, BatchMode.MERGED)
    assert lenient.step_s(decode(1, 100_000, longest=100_000)) > strict.step_s(decode(1, 500))


def test_batch_shape_records_the_longest_context() -> None:
    from dlora.types import Batch, BatchItem, Request

    items = (BatchItem(1, None, 300, 1, True), BatchItem(2, None, 0, 40, True))
    reqs = (Request(1, None, 0.0, 300, 10), Request(2, None, 0.0, 40, 10))
    batch = Batch(0, 0, BatchMode.UNMERGED, None, items, reqs)
    assert batch.shape({}).max_context_tokens == 301


def test_head_dim_override_sizes_kv_and_projections(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["model"].update(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim_override=32)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    shape = load_profile(path).model
    assert shape.head_dim == 32 and shape.module_dims("q") == (64, 128) and shape.module_dims("o") == (128, 64)
    assert shape.kv_bytes_per_token == 2 * shape.num_layers * 2 * 32 * shape.dtype_bytes
