"""`dlora validate --against RUN_DIR`: the real side by hand on a four-request run, the JSON
shape, one-line errors, `cluster.kv_blocks`, and the real LLMServingSim runs (skipped when
../shared/data is absent)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlora.build import load_latency, memory_config
from dlora.cli import app
from dlora.core.memory import MemoryPool
from dlora.scenario import load_scenario
from dlora.studies.against import METRICS, STATS, real_metrics, validate_against
from dlora.studies.vllm_run import load_meta, load_run

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
RUN = DATA / "against_run"
FLAT = DATA / "flat-profile.yaml"
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
EXAMPLES = ROOT.parent / "shared" / "data" / "llmservingsim" / "bench" / "examples" / "RTXPRO6000"
A800_7B = ROOT / "profiles" / "a800-llama-2-7b.yaml"

# By hand (tests/data/README.md): request -> (TTFT, TPOT, latency, queueing) in seconds
BY_HAND = {
    "ttft_s": {"mean": 0.1625, "p50": 0.125, "p90": 0.255},  # [0.1, 0.15, 0.1, 0.3]
    "tpot_s": {"mean": 0.35 / 3, "p50": 0.1, "p90": 0.14},  # [0.1, 0.1, 0.15]
    "latency_s": {"mean": 0.3875, "p50": 0.275, "p90": 0.72},  # [0.3, 0.25, 0.1, 0.9]
    "queueing_s": {"mean": 0.0625, "p50": 0.025, "p90": 0.155},  # [0, 0.05, 0, 0.2]
}


def invoke(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def test_real_side_by_hand():
    run = load_run(RUN)
    assert [r.request_id for r in run.requests] == ["a", "b", "c", "d"]  # sorted by queued_ts
    assert [run.arrival_s(r) for r in run.requests] == pytest.approx([0.0, 0.05, 0.5, 1.0])
    assert run.caps.max_num_seqs == 4 and run.caps.max_num_batched_tokens == 64
    assert run.caps.kv_blocks == 8 and run.caps.block_size == 16 and run.caps.tensor_parallel_size == 1
    real = real_metrics(run)
    for metric, stats in BY_HAND.items():
        for stat, value in stats.items():
            assert real[metric][stat] == pytest.approx(value, abs=1e-9), (metric, stat)
    assert real["throughput_rps"] == pytest.approx(4 / 1.9)


def test_cli_writes_table_json_plot_and_a_rerunnable_scenario(tmp_path):
    out = tmp_path / "val"
    res = invoke("--against", str(RUN), "--profile", str(FLAT), "--out", str(out))
    assert res.exit_code == 0, res.output
    for label in ("TTFT mean (ms)", "TPOT P90 (ms)", "latency P50", "queueing", "throughput", "|Δ latency|"):
        assert label in res.output, label
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    data = json.loads((out / "validation.json").read_text())
    for metric in METRICS:
        assert set(data[metric]) == set(STATS)
        for stat in STATS:
            p = data[metric][stat]
            assert set(p) == {"real", "simulated", "relative_error"}
            assert p["real"] == pytest.approx(BY_HAND[metric][stat], abs=1e-9)
            assert p["relative_error"] == pytest.approx((p["simulated"] - p["real"]) / p["real"], abs=1e-6)
    tp = data["throughput_rps"]
    assert tp["real"] == pytest.approx(4 / 1.9) and tp["simulated"] > 0
    assert data["per_request"]["matched_requests"] == 4
    for m in ("latency_s", "ttft_s"):
        assert data["per_request"][m]["median_absolute_error"] >= 0
    sim = data["simulated"]
    assert sim["completed"] == 4 and sim["preemptions"] >= 0
    assert sim["kv_blocks"] == 8 and 1 <= sim["kv_peak_blocks"] <= 8  # the run's block count, exactly
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "per_request.csv").read_text().splitlines()) == 5
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["completed"] == 4
    scenario = yaml.safe_load((out / "scenario.yaml").read_text())
    assert scenario["cluster"]["max_batch_size"] == 4 and scenario["cluster"]["kv_blocks"] == 8
    assert scenario["policies"]["batching"]["name"] == "unmerged_only"
    # every replayed request is a base-model request, and the scenario reruns the same simulation
    rerun = CliRunner().invoke(app, ["simulate", str(out / "scenario.yaml"), "--out", str(tmp_path / "re"), "-q"])
    assert rerun.exit_code == 0, rerun.output
    assert (tmp_path / "re" / "report.json").read_text() == (out / "report.json").read_text()
    rows = (out / "requests.csv").read_text().splitlines()[1:]
    assert all(row.split(",")[1] == "" for row in rows)


def test_set_overrides_apply_to_the_replay(tmp_path):
    result = validate_against(RUN, FLAT, None, ["cluster.kv_blocks=3", "cluster.max_batch_size=2"])
    assert result.simulated["kv_blocks"] == 3 and result.scenario.cluster.max_batch_size == 2
    assert result.simulated["completed"] == 4


def _copy_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    return run


def _edit_line(path: Path, index: int, **changes):
    lines = path.read_text().splitlines()
    rec = json.loads(lines[index])
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    lines[index] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case, message", [
    ("no requests", "vllm/requests.jsonl: no such file"),
    ("no meta", "vllm/meta.json: no such file"),
    ("missing field", "requests.jsonl, line 2: missing field first_token_ts"),
    ("bad json", "requests.jsonl, line 3: not valid JSON"),
    ("bad count", "requests.jsonl, line 1: output_toks must be a positive integer, got 0"),
    ("out of order", "requests.jsonl, line 4: timestamps out of order"),
    ("meta caps", "meta.json: missing engine_kwargs.max_num_seqs"),
    ("tp", "the run used tensor_parallel_size 2 but profile"),
])
def test_bad_run_folders_exit_2_with_one_line(tmp_path, case, message):
    run = _copy_run(tmp_path)
    reqs, meta = run / "vllm" / "requests.jsonl", run / "vllm" / "meta.json"
    if case == "no requests":
        reqs.unlink()
    elif case == "no meta":
        meta.unlink()
    elif case == "missing field":
        _edit_line(reqs, 1, first_token_ts=None)
    elif case == "bad json":
        lines = reqs.read_text().splitlines()
        lines[2] = lines[2][:-5]
        reqs.write_text("\n".join(lines) + "\n")
    elif case == "bad count":
        _edit_line(reqs, 0, output_toks=0)
    elif case == "out of order":
        _edit_line(reqs, 3, scheduled_ts=99.0)
    else:
        data = json.loads(meta.read_text())
        if case == "meta caps":
            del data["engine_kwargs"]["max_num_seqs"]
        else:
            data["engine_kwargs"]["tensor_parallel_size"] = 2
        meta.write_text(json.dumps(data))
    res = invoke("--against", str(run), "--profile", str(FLAT))
    assert res.exit_code == 2
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_option_errors_exit_2(tmp_path):
    for args, message in (
        (["--against", str(RUN)], "--against needs --profile FILE"),
        (["--profile", str(FLAT)], "--profile goes with --against"),
        ([str(QUICKSTART), "--against", str(RUN), "--profile", str(FLAT)], "not both"),
        ([], "give a scenario YAML, or --against"),
        (["--against", str(tmp_path / "nowhere"), "--profile", str(FLAT)], "nowhere: no such folder"),
        (["--against", str(RUN), "--profile", str(tmp_path / "none.yaml")], "none.yaml: no such file"),
    ):
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output.replace("\n", " "), (args, res.output)


def test_longest_request_must_fit_the_profile(tmp_path):
    profile = yaml.safe_load(FLAT.read_text())
    profile["range"]["max_context_tokens"] = 21  # request b needs 20 + 2 = 22 tokens
    short = tmp_path / "short-range.yaml"
    short.write_text(yaml.safe_dump(profile))
    res = invoke("--against", str(RUN), "--profile", str(short))
    assert res.exit_code == 2
    assert "needs 22 tokens of context, beyond profile" in res.output.replace("\n", " ")
    assert "model.allow_extrapolation=true" in res.output.replace("\n", " ")
    res = invoke("--against", str(RUN), "--profile", str(short), "--set", "model.allow_extrapolation=true")
    assert res.exit_code == 0, res.output
    profile["model"]["max_context_tokens"] = 21  # the model itself: no way around it
    short.write_text(yaml.safe_dump(profile))
    res = invoke("--against", str(RUN), "--profile", str(short), "--set", "model.allow_extrapolation=true")
    assert res.exit_code == 2 and "model.max_context_tokens 21" in res.output.replace("\n", " ")


def test_cluster_kv_blocks_fixes_the_pool():
    sc = load_scenario(QUICKSTART)
    latency = load_latency(sc)
    derived = MemoryPool(memory_config(sc, latency))
    assert derived.total_blocks == latency.kv_capacity_bytes() // derived.block_bytes
    fixed_sc = load_scenario(QUICKSTART, ["cluster.kv_blocks=2588", "cluster.memory_fraction=0.5"])
    pool = MemoryPool(memory_config(fixed_sc, latency))
    assert pool.total_blocks == 2588 and pool.capacity_bytes == 2588 * pool.block_bytes
    pool.load_adapter(0, 3 * pool.block_bytes)  # adapters still take bytes from the pool
    assert pool.kv_capacity_blocks == 2585
    with pytest.raises(Exception, match="cluster.kv_blocks: must be >= 1"):
        load_scenario(QUICKSTART, ["cluster.kv_blocks=0"])


# ---- the real runs (../shared/data/llmservingsim) ----
def _summary(path: Path) -> dict[tuple[str, str], float]:
    """LLMServingSim's validation/summary.txt: (metric, stat) -> vLLM value in ms."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"(TTFT|TPOT|Latency) (Mean|Median|P90)\s+([\d.]+)", line)
        if m:
            out[(m[1], m[2])] = float(m[3])
    return out


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("model", ["Llama-3.1-8B", "Qwen3-32B"])
def test_real_side_matches_llmservingsim_summary(model):
    run = load_run(EXAMPLES / model)
    real = real_metrics(run)
    theirs = _summary(EXAMPLES / model / "validation" / "summary.txt")
    keys = {"TTFT": "ttft_s", "TPOT": "tpot_s", "Latency": "latency_s"}
    stats = {"Mean": "mean", "Median": "p50", "P90": "p90"}
    assert len(theirs) == 9
    for (metric, stat), value in theirs.items():
        assert round(real[keys[metric]][stats[stat]] * 1e3, 1) == pytest.approx(value, abs=0.051), (metric, stat)
    assert len(run.requests) == 300 and run.caps.max_num_seqs == 128


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/data is absent")
def test_replays_the_real_llama_run(tmp_path):
    profile = yaml.safe_load(A800_7B.read_text())  # any profile whose context holds 4,765 tokens
    profile["model"]["max_context_tokens"] = profile["range"]["max_context_tokens"] = 8192
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    result = validate_against(EXAMPLES / "Llama-3.1-8B", path, tmp_path / "out", ["cluster.kv_blocks=20000"])
    assert result.simulated["completed"] == 300 and result.simulated["kv_blocks"] == 20000
    assert result.per_request["matched_requests"] == 300
    assert result.metrics["ttft_s"]["mean"]["real"] == pytest.approx(7.0972, abs=1e-4)
    assert (tmp_path / "out" / "validation.json").is_file()


@pytest.mark.parametrize("meta, blocks, block_size", [
    ({"engine_kwargs": {"max_num_seqs": 2, "max_num_batched_tokens": 8}}, None, None),
    ({"engine_kwargs": {"max_num_seqs": 2, "max_num_batched_tokens": 8, "num_gpu_blocks_override": 40,
                        "block_size": 32}}, 40, 32),
    ({"kv_blocks": 7, "engine_kwargs": {"max_num_seqs": 2, "max_num_batched_tokens": 8}}, 7, None),
    ({"cache_config": {"num_gpu_blocks": 9, "block_size": 16},
      "engine_kwargs": {"max_num_seqs": 2, "max_num_batched_tokens": 8}}, 9, 16),
])
def test_kv_block_count_keys_of_meta_json(tmp_path, meta, blocks, block_size):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    caps = load_meta(path)
    assert (caps.kv_blocks, caps.block_size, caps.tensor_parallel_size) == (blocks, block_size, 1)


def test_against_numbers_have_four_significant_digits_and_no_float_residue():
    from dlora.studies.against_output import _num, _pct

    assert _num(0.1625, 1e3) == "162.5" and _num(0.025, 1e3) == "25.00" and _num(2.10526) == "2.105"
    assert _num(4.274e-15, 1e3) == "0" and _num(None) == "-"
    assert _pct(-1e-9) == "+0.0%" and _pct(-0.308) == "-30.8%"
