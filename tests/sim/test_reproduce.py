"""`dlora reproduce --quick` on a reduced set: REPORT.md with every figure's claim, a filled
table, plots; bad input is refused with a clear error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dlora.errors import ConfigError
from dlora.sim.reproduce import reproduce


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
    assert "| alpha | unmerged_only | merged_only | credit |" in text


def test_unknown_figure_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown figure 'fig99'"):
        reproduce(tmp_path, quick=True, only=["fig99"])
    p = subprocess.run([sys.executable, "-m", "dlora.cli", "reproduce", "--quick", "--only", "fig99",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 2 and "unknown figure" in p.stderr and "Traceback" not in p.stderr
