"""`dlora profile`: a very reduced sweep of the demo writes a loadable profile whose predictions
on the held-out points are within its stated fit error; shape-only configs with random weights;
bad model folders exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlora.cli import app
from dlora.latency import LatencyModel
from dlora.profile import load_profile
from dlora.profiling.measure import profile
from dlora.profiling.sweep import Sweep

TINY = Sweep(prefill_tokens=(8, 32, 64), prefill_seqs=(1, 2), decode_seqs=(1, 2, 4),
             decode_context=(8, 32, 64), num_adapters=(1, 2), ranks=(4, 8),
             transfer_tokens=(16, 64, 256), repeats=3, warmup=1)
TINY_FLAGS = ["--repeats", "2", "--max-batch-tokens", "32", "--max-seqs", "2", "--max-context", "32",
              "--ranks", "4,8", "--adapters", "2", "--threads", "1"]


def test_reduced_sweep_predicts_held_out_points_within_the_stated_error(demo_dir: Path,
                                                                        tmp_path: Path) -> None:
    run = profile(model_dir=demo_dir, sweep=TINY, command="test")
    out = tmp_path / "p.yaml"
    out.write_text(run.profile.dump())
    prof = load_profile(out)
    assert prof.provenance.how == "measured" and prof.provenance.torch_version
    assert prof.model.num_layers == 2 and prof.model.hidden_size == 64
    assert prof.range.max_decode_seqs == 4 and prof.range.max_batch_tokens >= 64
    lm = LatencyModel(prof, allow_extrapolation=True)
    held = [m for m in run.steps if m.held_out]
    assert held and any(not m.held_out for m in run.steps)
    groups = {m.point.group for m in held}
    assert {"decode", "unmerged"} <= groups
    for m in held:
        stated = prof.fit_error[f"step_{m.point.group}_max_rel"]
        # scheduler_s is dlora's own host time per iteration, measured apart from the executor
        executor_s = lm.step_s(m.shape) - prof.latency.scheduler_s
        err = abs(executor_s - m.seconds) / m.seconds
        assert err <= stated + 1e-3, (m.point, err, stated)
    fe = prof.fit_error
    for key in ("merge", "unmerge", "adapter_load", "swap", "kv_transfer"):
        assert f"{key}_mean_rel" in fe, key
    assert prof.latency.merge(16) > 0 and prof.latency.adapter_load.bandwidth_bytes_per_s > 0
    assert 0 < prof.latency.scheduler_s < 0.01
    assert fe["step_fit_points"] + fe["step_heldout_points"] == len(run.steps)


def test_cli_profile_with_a_shape_only_config_and_dummy_weights(tmp_path: Path) -> None:
    out = tmp_path / "shape.yaml"
    res = CliRunner().invoke(app, ["profile", "--model-config", "demo", "--dummy-weights",
                                   "--quick", "--out", str(out), *TINY_FLAGS])
    assert res.exit_code == 0, res.output
    prof = load_profile(out)
    assert "random weights" in prof.provenance.model and prof.provenance.how == "measured"
    assert "dlora profile" in prof.provenance.command
    assert prof.range.max_decode_seqs == 2 and prof.fit_error["step_fit_points"] > 0


@pytest.mark.parametrize("args, needle", [
    (["--model", "{tmp}/missing"], "does not exist"),
    (["--model", "{tmp}/empty"], "config.json"),
    (["--model-config", "llama-2-7b"], "--dummy-weights"),
    (["--model-config", "gpt-9", "--dummy-weights"], "unknown"),
    (["--device", "tpu"], "cpu or cuda"),
])
def test_bad_models_and_options_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["profile", "--quick", *[a.format(tmp=tmp_path) for a in args], "--out",
            str(tmp_path / "x.yaml")]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.yaml").exists()


def test_cli_profile_warns_in_one_line_when_the_held_out_error_is_poor(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    import dlora.profiling.measure as measure
    from dlora.profiling.fit import note_poor_fit

    good = load_profile(Path(__file__).resolve().parents[2] / "profiles" / "cpu-demo-measured.yaml")
    bad = note_poor_fit(replace(good, fit_error={**good.fit_error, "step_mean_rel": 1.06, "step_max_rel": 6.17}))
    monkeypatch.setattr(measure, "profile", lambda **kwargs: measure.ProfileRun(bad))
    out = tmp_path / "bad.yaml"
    res = CliRunner().invoke(app, ["profile", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "106% mean / 617% max" in lines[0] and "--repeats" in lines[0]
    assert "Fit warning" in load_profile(out).provenance.notes
