"""Workloads: config validation, arrival processes, popularity, lengths, trace loaders."""

from __future__ import annotations

import re
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import yaml

from dlora.config import load_into
from dlora.errors import ConfigError, WorkloadError
from dlora.workload import (
    WorkloadConfig,
    build_requests,
    function_shares,
    load_azure_functions_2019,
    load_azure_functions_2021,
    load_azure_llm_trace,
    load_function_trace,
    load_generic_trace,
    load_lengths_table,
    merged_gamma_streams,
    power_law_shares,
)

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
AZURE_CONV = SHARED / "azure_llm_inference_2023" / "AzureLLMInferenceTrace_conv.csv"
SHAREGPT = SHARED / "lengths" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
NAMES = [f"adapter-{i}" for i in range(8)]
FIXED = {"kind": "fixed", "prompt_tokens": 16, "output_tokens": 8}
PAPER_FILTERS = {
    "min_prompt_tokens": 4,
    "max_prompt_tokens": 1024,
    "min_output_tokens": 4,
    "max_total_tokens": 2048,
}


def cfg_of(data: dict[str, Any]) -> WorkloadConfig:
    return load_into(WorkloadConfig, data, "workload")


def build(data: dict[str, Any], names: list[str] = NAMES, seed: int = 0, base: Path = DATA):
    return build_requests(cfg_of(data), names, np.random.default_rng(seed), base)


def poisson(n: int = 1000, rate: float = 10.0, **extra: Any) -> dict[str, Any]:
    return {
        "num_requests": n,
        "arrival": {"kind": "poisson", "rate_per_s": rate},
        "lengths": FIXED,
        **extra,
    }


def adapter_counts(reqs: list, num: int = len(NAMES)) -> np.ndarray:
    return np.bincount([r.adapter_id for r in reqs], minlength=num)


def check_well_formed(reqs: list, num_adapters: int = len(NAMES)) -> None:
    assert [r.id for r in reqs] == list(range(len(reqs)))
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times)
    assert all(r.adapter_id is None or 0 <= r.adapter_id < num_adapters for r in reqs)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in reqs)


# ---- validation: every error names the key path -------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"arrival": {"kind": "burst", "rate_per_s": 1}}, "workload.arrival.kind: must be one of"),
        (
            {"arrival": {"kind": "poisson"}},
            "workload.arrival.rate_per_s: required for kind 'poisson'",
        ),
        (
            {"arrival": {"kind": "poisson", "rate_per_s": -1}},
            "workload.arrival.rate_per_s: must be > 0",
        ),
        (
            {"arrival": {"kind": "gamma", "rate_per_s": 1}},
            "workload.arrival.cv: required for kind 'gamma'",
        ),
        (
            {"arrival": {"kind": "gamma", "rate_per_s": 1, "cv": 0}},
            "workload.arrival.cv: must be > 0",
        ),
        (
            {"arrival": {"kind": "poisson", "rate_per_s": 1, "cv": 2}},
            "workload.arrival.cv: not used by kind 'poisson'",
        ),
        ({"arrival": {"kind": "trace"}}, "workload.arrival.path: required for kind 'trace'"),
        (
            {"arrival": {"kind": "trace", "path": "t.csv", "rate_scale": 2, "rate_per_s": 3}},
            "workload.arrival.rate_scale: set either",
        ),
        (
            {"arrival": {"kind": "poisson", "rate_per_s": 1, "burst": 3}},
            "workload.arrival.burst: unknown key",
        ),
        ({"popularity": {"kind": "zipf"}}, "workload.popularity.alpha: required for kind 'zipf'"),
        (
            {"popularity": {"kind": "uniform", "alpha": 1}},
            "workload.popularity.alpha: not used by kind 'uniform'",
        ),
        (
            {"popularity": {"kind": "weights", "weights": [0, 0]}},
            "workload.popularity.weights: at least one",
        ),
        (
            {"popularity": {"kind": "gamma_streams"}},
            "workload.popularity.alpha: kind 'gamma_streams' needs exactly one",
        ),
        ({"popularity": {"kind": "function_trace"}}, "workload.popularity.path: required"),
        (
            {"lengths": {"kind": "fixed", "prompt_tokens": 4}},
            "workload.lengths.output_tokens: required",
        ),
        (
            {
                "lengths": {
                    "kind": "fixed",
                    "prompt_tokens": 4,
                    "output_tokens": 4,
                    "max_total_tokens": 9,
                }
            },
            "workload.lengths.max_total_tokens: not used",
        ),
        (
            {"lengths": {"kind": "uniform", "prompt_range": [9, 3], "output_range": [1, 2]}},
            "workload.lengths.prompt_range: must be [low, high]",
        ),
        (
            {
                "lengths": {
                    "kind": "lognormal",
                    "prompt_mean": 9,
                    "prompt_median": 9,
                    "prompt_sigma": 1,
                }
            },
            "workload.lengths.prompt_mean: kind 'lognormal' needs exactly one",
        ),
        (
            {
                "lengths": {
                    "kind": "empirical",
                    "path": "x.csv",
                    "min_prompt_tokens": 9,
                    "max_prompt_tokens": 3,
                }
            },
            "workload.lengths.max_prompt_tokens: must be >= min_prompt_tokens",
        ),
        ({"lengths": {}}, "workload.lengths.kind: required for arrival kind 'poisson'"),
        ({"num_requests": None}, "workload.num_requests: set num_requests or duration_s"),
    ],
)
def test_validation_errors_name_the_key_path(data: dict[str, Any], message: str) -> None:
    merged = poisson() | data
    with pytest.raises(ConfigError) as err:
        cfg_of(merged)
    assert str(err.value).startswith(message), str(err.value)


def test_cross_section_checks() -> None:
    trace = {"kind": "trace", "path": "azure_llm_2023_small.csv"}
    with pytest.raises(ConfigError, match=r"^workload.lengths.kind: the arrival trace carries"):
        cfg_of({"arrival": trace, "lengths": FIXED})
    with pytest.raises(ConfigError, match=r"^workload.popularity.kind: 'gamma_streams' generates"):
        cfg_of({"arrival": trace, "popularity": {"kind": "gamma_streams", "alpha": 1}})
    with pytest.raises(ConfigError, match=r"^workload.popularity.kind: 'trace' takes adapters"):
        cfg_of(poisson(popularity={"kind": "trace"}))
    with pytest.raises(ConfigError, match=r"^workload.lengths.override: only applies"):
        cfg_of(poisson(lengths=FIXED | {"override": True}))


def test_build_time_errors_name_the_key_path_and_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^workload.popularity.weights: has 2 entries but there are 8"
    ):
        build(poisson(popularity={"kind": "weights", "weights": [1, 2]}))
    missing = {"arrival": {"kind": "trace", "path": "nope.csv"}}
    with pytest.raises(
        ConfigError, match=r"^workload.arrival.path: file .*nope.csv does not exist"
    ):
        build(missing)
    empty = {"arrival": {"kind": "trace", "path": "generic_trace_empty.csv"}}
    with pytest.raises(
        ConfigError, match=r"^workload.arrival.path: file .*generic_trace_empty.csv is empty"
    ):
        build(empty)
    (tmp_path / "blank.csv").write_text("")
    lengths = {"kind": "empirical", "path": str(tmp_path / "blank.csv")}
    with pytest.raises(ConfigError, match=r"^workload.lengths.path: file .*blank.csv is empty"):
        build(poisson(lengths=lengths))
    funcs = {"kind": "function_trace", "path": "missing_functions.csv"}
    with pytest.raises(ConfigError, match=r"^workload.popularity.path: file .*missing_functions"):
        build(poisson(popularity=funcs))
    (tmp_path / "bad.csv").write_text("num_prefill_tokens,num_decode_tokens\n12,x\n")
    with pytest.raises(ConfigError, match=r"^workload.lengths.path: .*bad.csv, line 2: cannot parse"):
        build(poisson(lengths={"kind": "empirical", "path": str(tmp_path / "bad.csv")}))


# ---- synthetic arrivals ------------------------------------------------------------------


def test_same_seed_same_requests_bit_for_bit() -> None:
    data = poisson(
        2000,
        popularity={"kind": "zipf", "alpha": 1.0},
        lengths={
            "kind": "lognormal",
            "prompt_mean": 300,
            "prompt_sigma": 1.0,
            "output_median": 100,
            "output_sigma": 0.7,
        },
    )

    def key(reqs: list) -> list[tuple]:
        return [(r.id, r.adapter_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs]

    assert key(build(data, seed=7)) == key(build(data, seed=7))
    assert key(build(data, seed=7)) != key(build(data, seed=8))


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_interarrival_cv_and_rate(cv: float) -> None:
    data = {
        "num_requests": 40_000,
        "arrival": {"kind": "gamma", "rate_per_s": 4.0, "cv": cv},
        "lengths": FIXED,
    }
    reqs = build(data)
    check_well_formed(reqs)
    gaps = np.diff([0.0] + [r.arrival_s for r in reqs])
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert 1.0 / gaps.mean() == pytest.approx(4.0, rel=0.05)


def test_poisson_duration_and_both_limits() -> None:
    reqs = build(
        {"duration_s": 200.0, "arrival": {"kind": "poisson", "rate_per_s": 20}, "lengths": FIXED}
    )
    assert reqs[-1].arrival_s < 200.0
    assert len(reqs) == pytest.approx(4000, rel=0.08)
    capped = build(poisson(10_000, rate=20.0, duration_s=50.0))
    assert len(capped) < 10_000 and capped[-1].arrival_s < 50.0
    few = build(poisson(30, rate=20.0, duration_s=1000.0))
    assert len(few) == 30


def test_merged_streams_take_the_first_arrivals() -> None:
    rng = np.random.default_rng(3)
    times, stream = merged_gamma_streams(rng, np.array([1.0, 0.0, 3.0]), 2.0, 5.0, 5000)
    assert len(times) == 5000 and times[0] > 5.0 and np.all(np.diff(times) >= 0)
    assert 1 not in set(stream.tolist())
    assert (stream == 2).mean() == pytest.approx(0.75, abs=0.03)


# ---- popularity --------------------------------------------------------------------------


def test_uniform_and_weights() -> None:
    counts = adapter_counts(build(poisson(16_000)))
    assert counts.min() > 1700 and counts.max() < 2300
    weights = [4, 0, 0, 0, 0, 0, 0, 1]
    counts = adapter_counts(
        build(poisson(5000, popularity={"kind": "weights", "weights": weights}))
    )
    assert counts[1:7].sum() == 0
    assert counts[0] / counts.sum() == pytest.approx(0.8, abs=0.03)


def test_zipf_skew_grows_with_alpha() -> None:
    top_shares = []
    for alpha in (0.0, 0.5, 1.0, 2.0):
        counts = adapter_counts(build(poisson(8000, popularity={"kind": "zipf", "alpha": alpha})))
        assert alpha == 0.0 or counts[0] == counts.max()
        top_shares.append(counts[0] / counts.sum())
        assert top_shares[-1] == pytest.approx(power_law_shares(8, alpha)[0], abs=0.03)
    assert top_shares == sorted(top_shares) and top_shares[-1] > 2 * top_shares[0] + 0.3


def test_gamma_streams_rates_follow_power_law_and_stream_cv() -> None:
    data = {
        "num_requests": 30_000,
        "arrival": {"kind": "gamma", "rate_per_s": 8, "cv": 2.0},
        "popularity": {"kind": "gamma_streams", "alpha": 1.0},
        "lengths": FIXED,
    }
    reqs = build(data)
    check_well_formed(reqs)
    counts = adapter_counts(reqs)
    np.testing.assert_allclose(counts / counts.sum(), power_law_shares(8, 1.0), atol=0.02)
    t0 = np.array([r.arrival_s for r in reqs if r.adapter_id == 0])
    gaps = np.diff(t0)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)
    assert len(t0) / t0[-1] == pytest.approx(8 * power_law_shares(8, 1.0)[0], rel=0.1)


# ---- function traces (dLoRA's stride mapping) ----------------------------------------------


@pytest.fixture(params=["2019", "2021"])
def function_trace(request: pytest.FixtureRequest):
    if request.param == "2019":
        return load_azure_functions_2019(DATA / "azure_functions_2019_small.csv")
    return load_azure_functions_2021(DATA / "azure_functions_2021_small.csv")


def test_function_trace_loaders_give_hourly_counts(function_trace) -> None:
    counts = function_trace.bin_counts(3600.0, 0.0, 3 * 3600.0)
    by_name = dict(zip(function_trace.functions, counts.tolist(), strict=True))
    first = {re.findall(r"\d", name)[0]: c for name, c in by_name.items()}
    assert first["1"] == [30, 20, 10] and first["4"] == [0, 10, 20]  # F1 sums two trigger rows
    assert counts.sum() == 210 and counts.sum(axis=0).tolist() == [75, 65, 70]
    assert function_trace.bin_counts(1800.0, 0.0, 3 * 3600.0).sum(axis=0)[:2].tolist() == [75, 0]


@pytest.mark.parametrize(
    ("stride", "adapter0_by_hour"),
    [(1, [60, 30, 30]), (2, [55, 45, 40]), (3, [60, 50, 40]), (6, [75, 65, 70])],
)
def test_stride_mapping_shares(function_trace, stride: int, adapter0_by_hour: list[int]) -> None:
    counts = function_trace.bin_counts(3600.0, 0.0, 3 * 3600.0)
    shares = function_shares(counts, 2, stride, sort=True)
    np.testing.assert_allclose(shares[0], np.array(adapter0_by_hour) / [75, 65, 70])
    np.testing.assert_allclose(shares.sum(axis=0), 1.0)
    # stride 2: blocks [F1 F2] [F3 F4] [F5 F6] go to adapters 0, 1, 0


def test_unsorted_mapping_uses_file_order() -> None:
    trace = load_azure_functions_2019(DATA / "azure_functions_2019_small.csv")
    shares = function_shares(trace.bin_counts(10_800.0, 0.0, 10_800.0), 2, 1, sort=False)
    assert shares[0, 0] == pytest.approx(70 / 210)  # F3, F6, F5 (F7 never invoked: dropped)


@pytest.mark.parametrize(
    "name", ["azure_functions_2019_small.csv", "azure_functions_2021_small.csv"]
)
def test_function_trace_workload_equal_requests_per_bin(name: str) -> None:
    data = {
        "num_requests": 9000,
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "popularity": {"kind": "function_trace", "path": name, "stride": 3},
        "lengths": FIXED,
    }
    reqs = build(data, names=["a", "b"])
    check_well_formed(reqs, 2)
    adapters = np.array([r.adapter_id for r in reqs])
    for b, expected in enumerate((60 / 75, 50 / 65, 40 / 70)):  # 3000 requests per hour bin
        assert (adapters[3000 * b : 3000 * (b + 1)] == 0).mean() == pytest.approx(
            expected, abs=0.04
        )
    assert reqs[-1].arrival_s == pytest.approx(9000 / 4.0, rel=0.05)


def test_function_trace_time_bins_follow_duration() -> None:
    data = {
        "duration_s": 3000.0,
        "arrival": {"kind": "poisson", "rate_per_s": 5.0},
        "popularity": {
            "kind": "function_trace",
            "path": "azure_functions_2019_small.csv",
            "format": "azure_functions_2019",
        },
        "lengths": FIXED,
    }
    reqs = build(data, names=["a", "b"])
    t = np.array([r.arrival_s for r in reqs])
    a = np.array([r.adapter_id for r in reqs])
    assert t.max() < 3000.0 and len(t) == pytest.approx(15_000, rel=0.05)
    assert (a[t < 1000] == 0).mean() == pytest.approx(60 / 75, abs=0.03)  # stride 1
    assert (a[(t >= 1000) & (t < 2000)] == 0).mean() == pytest.approx(30 / 65, abs=0.03)


def test_function_trace_bins_must_be_whole_minutes_for_2019() -> None:
    data = {
        "num_requests": 10,
        "arrival": {"kind": "poisson", "rate_per_s": 1.0},
        "popularity": {
            "kind": "function_trace",
            "path": "azure_functions_2019_small.csv",
            "bin_s": 90,
        },
        "lengths": FIXED,
    }
    with pytest.raises(ConfigError, match=r"^workload.popularity.bin_s: .*multiple of 60"):
        build(data)
    assert len(load_function_trace(DATA / "azure_functions_2021_small.csv").functions) == 6


# ---- request traces ----------------------------------------------------------------------


def test_azure_llm_2023_loader_on_small_file() -> None:
    trace = load_azure_llm_trace(DATA / "azure_llm_2023_small.csv")
    np.testing.assert_allclose(trace.arrival_s, [0.0, 0.5, 0.75, 2.25, 2.5, 63.6234567])
    assert trace.prompt_tokens.tolist() == [374, 1200, 396, 879, 91, 4200]
    assert trace.output_tokens.tolist() == [44, 1, 109, 241, 16, 601]


def test_trace_replay_lengths_rate_scale_and_truncation() -> None:
    base = {"arrival": {"kind": "trace", "path": "azure_llm_2023_small.csv"}}
    reqs = build(base)
    check_well_formed(reqs)
    assert [r.output_tokens for r in reqs] == [44, 1, 109, 241, 16, 601]
    fast = build({"arrival": base["arrival"] | {"rate_scale": 2.0}, "num_requests": 4})
    assert [r.arrival_s for r in fast] == [0.0, 0.25, 0.375, 1.125]
    paced = build({"arrival": base["arrival"] | {"rate_per_s": 1.0}})
    assert paced[-1].arrival_s == pytest.approx(5.0)  # 5 gaps at 1 request/s on average
    assert len(build(base | {"duration_s": 2.3})) == 4
    with pytest.raises(ConfigError, match=r"^workload.num_requests: 7 exceeds the 6 requests"):
        build(base | {"num_requests": 7})
    scaled = build(base | {"lengths": {"scale": 2.0, "max_total_tokens": 2000}})
    assert [r.prompt_tokens for r in scaled] == [748, 2400, 792, 1758, 182]
    sampled = build(base | {"lengths": FIXED | {"override": True}})
    assert {r.output_tokens for r in sampled} == {8}


def test_generic_trace_with_adapter_column() -> None:
    data = {
        "arrival": {"kind": "trace", "path": "generic_trace_small.csv", "format": "generic"},
        "popularity": {"kind": "trace"},
    }
    reqs = build(data, names=["alpha", "beta", "gamma"])
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.5, 2.0, 3.0]
    assert [r.adapter_id for r in reqs] == [1, 0, None, 2, 0]
    assert [r.prompt_tokens for r in reqs] == [200, 100, 300, 400, 500]
    with pytest.raises(ConfigError, match=r"^workload.arrival.path: adapter 'gamma' in"):
        build(data, names=["alpha", "beta"])
    drawn = build(data | {"popularity": {"kind": "zipf", "alpha": 1.0}}, names=["alpha", "beta"])
    assert all(r.adapter_id in (0, 1) for r in drawn)


def test_generic_trace_without_header_and_relative_paths(tmp_path: Path) -> None:
    trace = load_generic_trace(DATA / "generic_trace_noheader.csv")
    assert trace.arrival_s.tolist() == [0.0, 0.25, 1.0] and trace.adapters is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n1,2,3\n")
    reqs = build({"arrival": {"kind": "trace", "path": "sub/t.csv"}}, base=tmp_path)
    assert (reqs[0].arrival_s, reqs[0].prompt_tokens, reqs[0].output_tokens) == (1.0, 2, 3)
    with pytest.raises(WorkloadError, match="does not exist"):
        load_azure_llm_trace(tmp_path / "absent.csv")


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="../shared/data is absent")
def test_real_azure_conversation_trace() -> None:
    trace = load_azure_llm_trace(AZURE_CONV)
    assert len(trace) == 19_366
    gaps = np.diff(trace.arrival_s)
    assert (len(trace) - 1) / trace.arrival_s[-1] == pytest.approx(5.5, abs=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.1, abs=0.05)
    assert trace.prompt_tokens.mean() == pytest.approx(1155, abs=1)
    reqs = build(
        {
            "arrival": {"kind": "trace", "path": str(AZURE_CONV), "rate_per_s": 11.0},
            "popularity": {"kind": "zipf", "alpha": 1.0},
        }
    )
    assert len(reqs) == 19_366 and reqs[-1].arrival_s == pytest.approx(19_365 / 11.0)


# ---- lengths -----------------------------------------------------------------------------


def test_empirical_lengths_with_paper_filters() -> None:
    table = load_lengths_table(DATA / "lengths_small.csv")
    assert len(table) == 8
    lengths = {"kind": "empirical", "path": "lengths_small.csv", **PAPER_FILTERS}
    reqs = build(poisson(4000, lengths=lengths))
    pairs = {(r.prompt_tokens, r.output_tokens) for r in reqs}
    assert pairs == {(100, 200), (500, 400), (1024, 1024), (64, 16)}
    doubled = build(poisson(4000, lengths=lengths | {"scale": 2.0}))
    assert [r.prompt_tokens for r in doubled] == [2 * r.prompt_tokens for r in reqs]
    with pytest.raises(ConfigError, match=r"^workload.lengths.path: no row of"):
        build(poisson(10, lengths=lengths | {"min_output_tokens": 5000}))


@pytest.mark.skipif(not SHAREGPT.is_file(), reason="../shared/data is absent")
def test_real_sharegpt_lengths_with_paper_filters() -> None:
    lengths = {"kind": "empirical", "path": str(SHAREGPT), **PAPER_FILTERS}
    reqs = build(poisson(5000, lengths=lengths))
    prompt = np.array([r.prompt_tokens for r in reqs])
    output = np.array([r.output_tokens for r in reqs])
    assert prompt.min() >= 4 and prompt.max() <= 1024 and output.min() >= 4
    assert (prompt + output).max() <= 2048


def test_uniform_and_lognormal_lengths() -> None:
    uniform = {"kind": "uniform", "prompt_range": [4, 20], "output_range": [7, 7]}
    reqs = build(poisson(3000, lengths=uniform | {"max_total_tokens": 20}))
    prompt = np.array([r.prompt_tokens for r in reqs])
    assert prompt.min() == 4 and prompt.max() == 13 and {r.output_tokens for r in reqs} == {7}
    lognormal = {
        "kind": "lognormal",
        "prompt_median": 400,
        "prompt_sigma": 0.8,
        "output_mean": 120,
        "output_sigma": 0.5,
        "max_prompt_tokens": 1024,
    }
    reqs = build(poisson(20_000, lengths=lognormal))
    prompt = np.array([r.prompt_tokens for r in reqs])
    output = np.array([r.output_tokens for r in reqs])
    # median of a lognormal truncated at 1024: its 0.5 * P(X <= 1024) quantile
    kept = NormalDist().cdf(np.log(1024 / 400) / 0.8)
    truncated_median = 400 * np.exp(0.8 * NormalDist().inv_cdf(0.5 * kept))
    assert prompt.max() <= 1024 and np.median(prompt) == pytest.approx(truncated_median, rel=0.03)
    assert output.mean() == pytest.approx(120, rel=0.03)


# ---- documented examples -----------------------------------------------------------------

EXAMPLES = """
poisson_zipf_fixed:
  num_requests: 500
  arrival: {kind: poisson, rate_per_s: 4}
  popularity: {kind: zipf, alpha: 1.0}
  lengths: {kind: fixed, prompt_tokens: 256, output_tokens: 128}
gamma_weights_lognormal:
  duration_s: 60
  arrival: {kind: gamma, rate_per_s: 4, cv: 2}
  popularity: {kind: weights, weights: [4, 2, 1, 1]}
  lengths: {kind: lognormal, prompt_median: 300, prompt_sigma: 1.0, output_mean: 120,
            output_sigma: 0.6, max_total_tokens: 2048}
streams_uniform:
  num_requests: 500
  arrival: {kind: gamma, rate_per_s: 4, cv: 1}
  popularity: {kind: gamma_streams, alpha: 1.0}
  lengths: {kind: uniform, prompt_range: [4, 1024], output_range: [4, 512]}
function_trace_empirical:
  num_requests: 400
  arrival: {kind: gamma, rate_per_s: 4, cv: 1}
  popularity: {kind: function_trace, path: azure_functions_2021_small.csv,
               format: azure_functions_2021, stride: 2, bin_s: 3600, sort: true}
  lengths: {kind: empirical, path: lengths_small.csv, min_prompt_tokens: 4,
            max_prompt_tokens: 1024, min_output_tokens: 4, max_total_tokens: 2048}
azure_trace:
  arrival: {kind: trace, path: azure_llm_2023_small.csv, format: azure_llm_2023, rate_scale: 2}
  popularity: {kind: uniform}
  lengths: {scale: 2, max_total_tokens: 4096}
generic_trace_override:
  num_requests: 4
  arrival: {kind: trace, path: generic_trace_small.csv, format: generic}
  popularity: {kind: trace}
  lengths: {override: true, kind: fixed, prompt_tokens: 64, output_tokens: 64}
"""


@pytest.mark.parametrize("name", list(yaml.safe_load(EXAMPLES)))
def test_documented_examples_build(name: str) -> None:
    reqs = build(yaml.safe_load(EXAMPLES)[name], names=["alpha", "beta", "gamma", "delta"])
    assert reqs
    check_well_formed(reqs, 4)


# ---- bad trace rows (issue 13): the file and line, before the run -----------------------


@pytest.mark.parametrize("row, message", [
    ("-1.0,10,5", "arrival_s must be a finite number >= 0"),
    ("nan,10,5", "arrival_s must be a finite number >= 0"),
    ("inf,10,5", "arrival_s must be a finite number >= 0"),
    ("1e999,10,5", "arrival_s must be a finite number >= 0"),
    ("1.5,-3,5", "prompt_tokens must be >= 1"),
    ("1.5,3,-5", "output_tokens must be >= 1"),
    ("1.5,nan,5", "cannot parse"),
])
def test_bad_trace_rows_name_the_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(f"arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n{row}\n2.0,4,4\n")
    pattern = rf"^workload.arrival.path: .*t.csv, line 3: {re.escape(message)}"
    with pytest.raises(ConfigError, match=pattern):
        build({"arrival": {"kind": "trace", "path": "t.csv"}}, base=tmp_path)


def test_bad_azure_rows_lengths_tables_and_function_traces(tmp_path: Path) -> None:
    (tmp_path / "az.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:47.00,10,-5\n")
    with pytest.raises(WorkloadError, match=r"az.csv, line 3: GeneratedTokens must be >= 0"):
        load_azure_llm_trace(tmp_path / "az.csv")
    (tmp_path / "az.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n2023-11-16 18:15:nan,10,5\n")
    with pytest.raises(WorkloadError, match=r"az.csv, line 3: TIMESTAMP must be a finite number"):
        load_azure_llm_trace(tmp_path / "az.csv")
    for cell in ("inf", "nan", "-4"):
        (tmp_path / "len.csv").write_text(f"num_prefill_tokens,num_decode_tokens\n10,5\n{cell},3\n")
        with pytest.raises(WorkloadError, match=r"len.csv, line 3: .* must be finite numbers >= 0"):
            load_lengths_table(tmp_path / "len.csv")
    (tmp_path / "f.csv").write_text("app,func,end_timestamp,duration\na,f,1.0,0.5\na,f,inf,0.5\n")
    with pytest.raises(WorkloadError, match=r"f.csv, line 3: end_timestamp - duration must be a finite"):
        load_azure_functions_2021(tmp_path / "f.csv")


def test_non_utf8_trace_files_name_the_key_path_and_line(tmp_path: Path) -> None:
    header = b"arrival_s,prompt_tokens,output_tokens\n"
    (tmp_path / "head.csv").write_bytes(header + b"\xff0.0,10,5\n1.0,3,3\n")
    (tmp_path / "late.csv").write_bytes(header + b"0.0,10,5\n1.0,3,3\n2.0,3,\xe93\n")
    for name, line in (("head.csv", 2), ("late.csv", 4)):
        with pytest.raises(ConfigError, match=rf"^workload.arrival.path: .*{name}, line {line}: not UTF-8"):
            build({"arrival": {"kind": "trace", "path": name}}, base=tmp_path)
    (tmp_path / "len.csv").write_bytes(b"num_prefill_tokens,num_decode_tokens\n10,5\n\xe9,3\n")
    with pytest.raises(ConfigError, match=r"^workload.lengths.path: .*len.csv, line 3: not UTF-8"):
        build(poisson(lengths={"kind": "empirical", "path": "len.csv"}), base=tmp_path)


def test_a_generic_trace_carries_prefix_groups(tmp_path):
    from dlora.workload import build_requests
    from dlora.workload.config import WorkloadConfig

    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens,prefix_group,prefix_tokens\n"
                     "0.0,100,5,3,64\n0.5,40,5,3,64\n1.0,80,5,,\n")
    cfg = load_into(WorkloadConfig, {"arrival": {"kind": "trace", "path": str(trace), "format": "generic"}})
    reqs = build_requests(cfg, ["a"], np.random.default_rng(0), tmp_path)
    assert [(r.prefix_group, r.prefix_tokens) for r in reqs] == [(3, 64), (3, 40), (None, 0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens,prefix_group\n0.0,1,1,2\n")
    cfg = load_into(WorkloadConfig, {"arrival": {"kind": "trace", "path": str(bad), "format": "generic"}})
    with pytest.raises(ConfigError, match="prefix_group and prefix_tokens"):
        build_requests(cfg, ["a"], np.random.default_rng(0), tmp_path)
