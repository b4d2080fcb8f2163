"""Committed latency profiles (profiles/*.yaml, DESIGN.md section 5): each loads, predicts sane,
monotone times, and the derived ones reproduce the Vidur measurements they came from within the
fit error they state. The comparisons with the data skip when ../shared/data is absent."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dlora.errors import ProfileError
from dlora.latency import LatencyModel
from dlora.profile import Profile, load_profile
from dlora.types import BatchMode, BatchShape

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiling"
DERIVED = ("a800-llama-2-7b.yaml", "a800-llama-2-13b.yaml", "a800-llama-2-70b-tp4.yaml")
needs_data = pytest.mark.skipif(not (DATA / "a100").is_dir(), reason="../shared/data not present")


def model(name: str, allow_extrapolation: bool = False) -> LatencyModel:
    return LatencyModel(load_profile(REPO / "profiles" / name), allow_extrapolation)


def prefill(tokens: int, mode: BatchMode = BatchMode.MERGED) -> BatchShape:
    return BatchShape(prefill_tokens=tokens, prefill_seqs=1, prefill_context_tokens=tokens,
                      decode_seqs=0, decode_context_tokens=0, mode=mode, adapter_ranks=(),
                      lora_tokens=0, lora_token_rank=0,
                      prefill_attention_pairs=tokens * (tokens + 1) // 2)


@functools.cache
def derive_script() -> ModuleType:
    """scripts/derive_profile.py as a module (it is a script, not part of the package)."""
    path = REPO / "scripts" / "derive_profile.py"
    spec = importlib.util.spec_from_file_location("derive_profile", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def test_expected_profiles_are_committed() -> None:
    names = {p.name for p in PROFILES}
    assert {*DERIVED, "cpu-tiny-synthetic.yaml"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_predictions_are_monotone_and_consistent(path: Path) -> None:
    profile = load_profile(path)
    assert isinstance(profile, Profile)
    m = LatencyModel(profile)
    r = profile.range
    grid = sorted({1, 2, 7, 64, 100, 513, r.max_batch_tokens // 2, r.max_batch_tokens})
    times = [m.step_s(prefill(n)) for n in grid]
    assert all(t > 0 for t in times)
    assert times == sorted(times)
    curve = profile.latency.linear
    xs = range(1, r.max_batch_tokens + 1, 7)
    assert all(curve(a) <= curve(b) for a, b in zip(xs, xs[1:], strict=False))
    seqs = [1, 2, 16, min(64, r.max_decode_seqs), r.max_decode_seqs]
    decode = [m.decode_step_s(b, 128, BatchMode.MERGED) for b in seqs]
    assert decode == sorted(decode)
    contexts = (1, 64, 256, r.max_context_tokens)
    by_context = [m.decode_step_s(8, c, BatchMode.MERGED) for c in contexts]
    assert by_context == sorted(by_context) and by_context[0] < by_context[-1]
    merged = m.decode_step_s(16, 256, BatchMode.MERGED)
    unmerged = [m.decode_step_s(16, 256, BatchMode.UNMERGED, num_adapters=k) for k in (1, 4, 16)]
    assert merged < unmerged[0] <= unmerged[1] <= unmerged[2]
    assert m.decode_step_s(16, 256, BatchMode.UNMERGED, rank=64) > unmerged[0]
    assert 0 < m.switch_s(None, 8) < m.switch_s(16, 16) < m.switch_s(64, 64)
    assert m.load_s(profile.model.adapter_bytes(16)) > 0
    assert m.kv_capacity_bytes() // m.kv_bytes_per_token > r.max_context_tokens


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_out_of_range_shapes_raise_unless_extrapolation_allowed(path: Path) -> None:
    profile = load_profile(path)
    r = profile.range
    too_many_tokens = prefill(r.max_batch_tokens + 1)
    with pytest.raises(ProfileError, match="beyond the profile's measured range"):
        LatencyModel(profile).step_s(too_many_tokens)
    with pytest.raises(ProfileError, match="decoding sequences"):
        LatencyModel(profile).decode_step_s(r.max_decode_seqs + 1, 16, BatchMode.MERGED)
    lenient = LatencyModel(profile, allow_extrapolation=True)
    assert lenient.step_s(too_many_tokens) > lenient.step_s(prefill(r.max_batch_tokens))
    assert lenient.decode_step_s(r.max_decode_seqs + 1, 16, BatchMode.MERGED) > 0


def test_7b_decode_is_in_a_sane_band_and_70b_is_slower() -> None:
    m7, m70 = model("a800-llama-2-7b.yaml"), model("a800-llama-2-70b-tp4.yaml")
    one = m7.decode_step_s(1, 1, BatchMode.MERGED)
    assert 0.010 <= one <= 0.030
    assert m7.decode_step_s(16, 512, BatchMode.MERGED) < 0.030
    m13 = model("a800-llama-2-13b.yaml")
    for batch in (1, 16, 64):
        t7 = m7.decode_step_s(batch, 512, BatchMode.MERGED)
        assert t7 < m13.decode_step_s(batch, 512, BatchMode.MERGED)
        assert t7 < m70.decode_step_s(batch, 512, BatchMode.MERGED)
    assert m70.model.tensor_parallel == 4 and m70.profile.memory.device_bytes == 4 * 80 * 2**30


@pytest.mark.parametrize("name", DERIVED)
def test_derived_profiles_state_their_provenance(name: str) -> None:
    p = load_profile(REPO / "profiles" / name)
    assert p.provenance.how == "derived" and p.provenance.sources
    assert any("mlp.csv" in s for s in p.provenance.sources)
    assert {"linear_max_rel", "linear_mean_rel"} <= set(p.fit_error)
    assert p.fit_error["linear_max_rel"] < 0.15
    assert 15 <= len(p.latency.linear.tokens) <= 25
    if "13b" in name:
        assert "No measured 13B data" in p.provenance.notes


@needs_data
@pytest.mark.parametrize("target_index", range(len(DERIVED)))
def test_linear_curve_matches_the_measured_sums(target_index: int) -> None:
    d = derive_script()
    target = d.TARGETS[target_index]
    tables = {v: d.read_ops(DATA / "a100" / v / "mlp.csv", 1) for v in d.VIDUR_MODELS}
    hw = d.derive_hardware(tables)
    ops = d.read_ops(DATA / "a100" / target.vidur / "mlp.csv", target.shape.tensor_parallel)
    sums = d.linear_target(target, ops, d.LLAMA_7B if target.scaled else target.shape, hw)
    profile = load_profile(REPO / "profiles" / target.file)
    curve, stated = profile.latency.linear, profile.fit_error["linear_max_rel"]
    errors = [abs(curve(n) - s) / s for n, s in sums.items()]
    assert max(errors) <= stated + 1e-4
    assert sum(errors) / len(errors) <= profile.fit_error["linear_mean_rel"] + 1e-4
    if not target.scaled:  # the measured part alone is the README's sum at one token
        measured_1 = sum(ops[1][op] for op in d.OPS) * target.shape.num_layers
        assert measured_1 < curve(1) < measured_1 * 1.5


@needs_data
def test_committed_profiles_match_a_fresh_derivation(tmp_path: Path) -> None:
    d = derive_script()
    for path in d.derive(DATA, tmp_path):
        fresh, committed = load_profile(path), load_profile(REPO / "profiles" / path.name)
        assert dataclasses.replace(fresh, provenance=committed.provenance) == committed, path.name


@pytest.mark.parametrize(("text", "needle"), [
    (b"format: dlora-profile/1\nformat: dlora-profile/1\n", r"line 2: .*write each key once"),
    (b"notes: caf\xe9\n", r"line 1: not UTF-8 text; save the profile as UTF-8"),
    (b"- a list\n", r"the profile must be a mapping of sections"),
    (b"a: [unclosed\n", r"not valid YAML at line"),
])
def test_a_profile_file_is_read_as_strictly_as_a_scenario(tmp_path: Path, text: bytes, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ProfileError, match=rf"^profile {path}: {needle}"):
        load_profile(path)
