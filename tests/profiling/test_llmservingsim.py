"""`dlora profile import llmservingsim`: on a hand-made folder whose times are exact formulas
(tests/data/README.md) the fitted terms come back exactly; bad folders give one-line errors
(exit 2); on LLMServingSim's real RTX PRO 6000 profiles (skipped when ../shared/data is absent)
the profile predicts measured iterations, composed from the rows, within 7%, and the committed
profiles are what the importer writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlora.cli import app
from dlora.errors import ProfileError
from dlora.latency import LatencyModel
from dlora.profile import load_profile
from dlora.profiling.llmservingsim import checks, import_llmservingsim, read_source, row_shape

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "llmservingsim_tiny"
PERF = ROOT / ".." / "shared" / "data" / "llmservingsim" / "profiler" / "perf" / "RTXPRO6000"
LLAMA = PERF / "meta-llama" / "Llama-3.1-8B" / "bf16"
QWEN = PERF / "Qwen" / "Qwen3-32B" / "bf16"
real_data = pytest.mark.skipif(not (LLAMA / "meta.yaml").is_file(), reason="../shared/data is absent")


def test_exact_formulas_come_back_as_the_profile_terms() -> None:
    prof, _ = import_llmservingsim(TINY)
    lat, layers = prof.latency, 32
    assert prof.provenance.how == "measured" and prof.provenance.tensor_parallel == 1
    assert prof.model.num_layers == layers and prof.model.name == "meta-llama/Llama-2-7b-hf"
    assert any("LLMServingSim (MIT" in s and "attention.csv" in s for s in prof.provenance.sources)
    assert "roofline" in prof.provenance.notes and "mixed" in prof.provenance.notes
    for tokens in (1, 16, 128):  # dense + attention fixed / per token + lm_head + sampler fixed
        assert lat.linear(tokens) == pytest.approx((9501 + 25.28 * tokens) * 1e-6, rel=1e-5)
    assert lat.per_seq_s == pytest.approx(0.6e-6 + layers * 0.2e-6, rel=1e-3)
    assert lat.attention_decode_s_per_token == pytest.approx(layers * 0.003e-6, rel=1e-3)
    assert lat.attention_prefill_s_per_pair == pytest.approx(layers * 0.0001e-6, rel=1e-3)
    assert lat.attention_mixed_s_per_decode_token == pytest.approx(layers * 0.002e-6, rel=1e-3)
    assert lat.attention_mixed_s_per_decode_seq == pytest.approx(layers * 0.3e-6, rel=1e-3)
    assert lat.lora.per_token_rank_s > 0 and lat.merge.base_s > 0 and lat.scheduler_s == 0
    fe = prof.fit_error
    assert fe["attention_max_rel"] <= 1e-3 and fe["linear_max_rel"] <= 1e-3
    assert fe["attention_without_mixed_terms_mean_rel"] > 0.01  # the mixed terms are needed
    assert prof.range.max_batch_tokens == 128 and prof.range.max_decode_seqs == 4
    gib = 1 << 30  # the known GPU's memory; reserved = 10% + a 128-token batch's activations + 1 GiB
    assert prof.memory.device_bytes == int(94.97 * gib)
    activations = 128 * (3 * 11008 + 4 * 4096) * 2
    assert prof.memory.reserved_bytes == int((1 - 0.9) * int(94.97 * gib) + activations + gib)
    src = read_source(TINY)
    rows = ((0, 0, 4, 128), (64, 64, 0, 0), (64, 0, 4, 16), (16, 64, 1, 128))
    found = checks(src, prof, None, rows)
    assert len(found) == 4
    for c in found:  # composed from the rows (sequence counts interpolated) vs the profile
        assert c.predicted_s == pytest.approx(c.composed_s, rel=2e-3), c.label


def test_mixed_terms_fire_only_beside_prefill() -> None:
    prof, _ = import_llmservingsim(TINY)
    lat = prof.latency
    plain = replace(prof, latency=replace(lat, attention_mixed_s_per_decode_token=0.0,
                                          attention_mixed_s_per_decode_seq=0.0))
    lm, lm0 = LatencyModel(prof), LatencyModel(plain)
    decode, prefill, mixed = row_shape((0, 0, 4, 128)), row_shape((16, 0, 0, 0)), row_shape((16, 0, 4, 128))
    assert lm.step_s(decode) == lm0.step_s(decode)  # pure decode: bit for bit unchanged
    assert lm.step_s(prefill) == lm0.step_s(prefill)
    extra = 4 * 128 * lat.attention_mixed_s_per_decode_token + 4 * lat.attention_mixed_s_per_decode_seq
    assert lm.step_s(mixed) - lm0.step_s(mixed) == pytest.approx(extra, rel=1e-9)
    assert extra > 0.05 * lm0.step_s(mixed) - lm0.step_s(prefill)  # noticeable here


def test_cli_writes_a_loadable_profile(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    res = CliRunner().invoke(app, ["profile", "import", "llmservingsim", str(TINY), "--out", str(out)])
    assert res.exit_code == 0, res.output
    prof = load_profile(out)
    assert prof.provenance.command.startswith("dlora profile import llmservingsim")
    assert prof.latency.attention_mixed_s_per_decode_token > 0


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(TINY, d)
    return d


def _meta(d: Path, **changes: object) -> None:
    meta = yaml.safe_load((d / "meta.yaml").read_text())
    meta.update(changes)
    (d / "meta.yaml").write_text(yaml.safe_dump(meta))


@pytest.mark.parametrize("break_it, args, needle", [
    (lambda d: (d / "tp1" / "attention.csv").unlink(), [], "attention.csv: no such file"),
    (lambda d: (d / "meta.yaml").unlink(), [], "no meta.yaml"),
    (lambda d: _meta(d, model="acme/Unknown-7B"), [], "pass --config PATH"),
    (lambda d: None, ["--tp", "2"], "no tp2/ (available: --tp 1)"),
    (lambda d: _meta(d, hardware="NEWGPU"), [], "--device-memory-gib"),
    (lambda d: _meta(d, variant="int3"), [], "variant 'int3'"),
    (lambda d: (d / "tp1" / "dense.csv").write_text("layer,tokens,ms\nqkv_proj,1,3\n"), [],
     "missing column(s) time_us"),
    (lambda d: (d / "tp1" / "per_sequence.csv").write_text("layer,sequences,time_us\nlm_head,1,x\n"), [],
     "line 2: time_us 'x' is not a number"),
])
def test_bad_folders_exit_2_with_one_line(tmp_path: Path, break_it, args: list[str], needle: str) -> None:
    d = _copy(tmp_path)
    break_it(d)
    out = tmp_path / "x.yaml"
    res = CliRunner().invoke(app, ["profile", "import", "llmservingsim", str(d), "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_unknown_model_and_gpu_work_when_given(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    _meta(d, model="acme/Unknown-7B", hardware="NEWGPU")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, '
                   '"num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}')
    prof, _ = import_llmservingsim(d, config=cfg, device_memory_gib=80)
    assert prof.model.name == "acme/Unknown-7B" and prof.memory.device_bytes == 80 << 30
    with pytest.raises(ProfileError, match="hf_overrides intermediate_size"):
        cfg.write_text(cfg.read_text().replace("11008", "14336"))
        import_llmservingsim(d, config=cfg, device_memory_gib=80)


@real_data
@pytest.mark.parametrize("folder, tp, committed", [
    (LLAMA, 1, "rtxpro6000-llama-3.1-8b.yaml"), (QWEN, 2, "rtxpro6000-qwen3-32b-tp2.yaml")])
def test_real_profiles_predict_composed_iterations(folder: Path, tp: int, committed: str) -> None:
    prof, found = import_llmservingsim(folder, tp=tp)
    assert prof.provenance.tensor_parallel == tp and prof.memory.device_bytes == tp * int(94.97 * (1 << 30))
    labels = {c.label for c in found}
    assert {"32 decodes @ 1024", "prefill 2048", "prefill 512 + 32 decodes @ 1024"} <= labels
    for c in found:  # measured rows composed into a whole iteration vs the fitted profile
        assert abs(c.rel_error) < 0.07, (c.label, c.composed_s, c.predicted_s)
    fe = prof.fit_error
    assert fe["linear_mean_rel"] < 0.03 and fe["attention_decode_mean_rel"] < 0.15
    assert fe["attention_mean_rel"] < fe["attention_without_mixed_terms_mean_rel"]
    assert fe["attention_decode_mean_rel"] < fe["attention_without_mixed_terms_decode_mean_rel"] / 3
    lat = prof.latency  # decode attention beside a prefill costs about twice its decode-only figure
    assert 0.5 < lat.attention_mixed_s_per_decode_token / lat.attention_decode_s_per_token < 3
    on_disk = load_profile(ROOT / "profiles" / committed)
    assert on_disk.latency == prof.latency and on_disk.range == prof.range
    assert on_disk.memory == prof.memory and on_disk.model == prof.model


def test_the_import_command_runs_without_torch(tmp_path: Path) -> None:
    """`dlora profile import llmservingsim` needs no torch (only the measuring modules load it)."""
    out = tmp_path / "p.yaml"
    code = ("import sys\nfrom dlora.cli import main\n"
            f"sys.argv = ['dlora', 'profile', 'import', 'llmservingsim', {str(TINY)!r}, '--out', {str(out)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False" and out.is_file()
