"""Tables a person reads fit an 80-column terminal without cutting cells."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from dlora.output import print_report
from dlora.report import build_report
from dlora.scenario import load_scenario
from dlora.sim.driver import simulate

QUICKSTART = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"


@pytest.mark.parametrize("replicas", [1, 4, 9])
def test_report_tables_fit_80_columns(replicas: int) -> None:
    sc = load_scenario(QUICKSTART, [f"cluster.replicas={replicas}", "workload.num_requests=60", "run.progress=false"])
    report = build_report(simulate(sc))
    console = Console(width=80, record=True, color_system=None)
    print_report(report, console)
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "iterations" in text and "per replica" in text
