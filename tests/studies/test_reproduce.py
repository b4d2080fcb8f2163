"""`dlora reproduce --quick` on a reduced set: REPORT.md with every figure's claim, a filled
table, plots; bad input is refused with a clear error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dlora.errors import ConfigError
from dlora.studies.reproduce import reproduce


def test_reduced_quick_reproduce_writes_a_filled_report(tmp_path):
    figures, path = reproduce(tmp_path, quick=True, only=["fig2b", "fig10", "fig13"])
    text = path.read_text()
    assert [f.key for f in figures] == ["fig2b", "fig10", "fig13"]
    for f in figures:
        assert f"**Paper:** {f.claim}" in text and f.ours and f.rows
        for row in f.rows:  # every cell of every row filled
            assert all(row.get(c) is not None for c in f.columns), (f.key, row)
    assert "## Deviations that apply to every figure" in text and "Quick mode" in text
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / img).read_bytes()[:4] == b"\x89PNG"
    assert "| alpha | unmerged_only | merged_only | merged_only_arrival | credit | credit_dormant |" in text
    assert all(f.checks for f in figures) and "Checks (modern profile)" in text


def test_unknown_figure_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown figure 'fig99'"):
        reproduce(tmp_path, quick=True, only=["fig99"])
    p = subprocess.run([sys.executable, "-m", "dlora.cli", "reproduce", "--quick", "--only", "fig99",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 2 and "unknown figure" in p.stderr and "Traceback" not in p.stderr


def test_a_broken_policy_fails_its_figure(tmp_path):
    """Fig. 10's checks on a real sweep whose 'credit' is a policy that never merges: the
    stated factors over unmerged_only cannot hold, so the figure reports 'no' with the reason."""
    from dlora.scenario import load_scenario
    from dlora.studies.reproduce import PAPER, Figure, fig10_checks, fig11a_checks, sweep_table
    from dlora.studies.run import run_sweep

    sc = load_scenario(PAPER / "fig10-dynamic-batching.yaml", [
        "workload.num_requests=120", "sweep.values=[0.0, 3.0]",
        "sweep.variants={unmerged_only: {policies.batching.name: unmerged_only}, "
        "merged_only: {policies.batching.name: merged_only}, credit: {policies.batching.name: unmerged_only}}"])
    rows = run_sweep(sc, tmp_path / "fig10").sweep_rows
    f = Figure("fig10", "t", "c")
    fig10_checks(f, sweep_table(rows, "workload.popularity.alpha", "latency_per_token_s.mean"))
    assert f.shape_matches is False
    assert any("unmerged_only at every skew" in c.name and "1x" in c.detail for c in f.failed)
    g = Figure("fig11a", "t", "c")  # a dlora that balances no better than proactive fails too
    fig11a_checks(g, {"round_robin": 10.0, "proactive": 20.0, "dlora": 20.0, "combined": 20.0})
    assert [c.name.split(" (")[0] for c in g.failed] == ["dlora > 1.05x proactive"]


def test_report_prints_no_with_the_reason(tmp_path):
    from dlora.studies.report_md import write_report_md
    from dlora.studies.reproduce import Figure

    f = Figure("fig12", "Fig. 12", "flat")
    f.check("dlora flat within 10%", False, "x0.5")
    f.columns, f.rows = ["a"], [{"a": 1}]
    text = write_report_md(tmp_path / "REPORT.md", [f], True, 1.0).read_text()
    assert "| no: dlora flat within 10% (x0.5) |" in text and "- no: dlora flat within 10% (x0.5)" in text


def test_the_price_gap_reference_profile_prices_unmerged_batches_as_merged(tmp_path):
    """Fig. 10's `unmerged_free_lora` reference runs on a copy of the profile whose LoRA side
    path costs nothing: an unmerged batch of many adapters then costs what a merged one does,
    and nothing else of the profile changes (switches still cost what they did)."""
    from dlora.latency import LatencyModel
    from dlora.profile import load_profile
    from dlora.scenario import load_scenario, resolve
    from dlora.studies.reproduce import PAPER, free_lora_profile
    from dlora.types import BatchMode

    sc = load_scenario(PAPER / "fig10-dynamic-batching.yaml")
    path = free_lora_profile(sc, tmp_path)
    free, real = LatencyModel(load_profile(path)), LatencyModel(load_profile(resolve(sc, sc.model.profile)))
    merged = real.decode_step_s(16, 512, BatchMode.MERGED)
    assert real.decode_step_s(16, 512, BatchMode.UNMERGED, num_adapters=8) > 1.1 * merged
    assert free.decode_step_s(16, 512, BatchMode.UNMERGED, num_adapters=8) == free.decode_step_s(16, 512, BatchMode.MERGED)
    assert free.decode_step_s(16, 512, BatchMode.MERGED) == merged
    assert free.switch_s(16, 16) == real.switch_s(16, 16) > 0
    assert "latency.lora at zero" in load_profile(path).provenance.notes
