"""Tables a person reads fit an 80-column terminal without cutting cells."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from dlora.labels import label, number, percent, rate, seconds, short
from dlora.output import StatusLine, comparison_tables, latency_table, print_report, summary_table
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


def render(*tables) -> str:  # type: ignore[no-untyped-def]
    console = Console(width=80, record=True, color_system=None)
    for t in tables:
        console.print(t)
    return console.export_text()


def fits_80(text: str) -> bool:
    return "…" not in text and max(len(line) for line in text.splitlines()) <= 80


def test_summary_puts_latency_percentiles_in_columns_of_ms() -> None:
    sc = load_scenario(QUICKSTART, ["workload.num_requests=60", "run.progress=false"])
    report = build_report(simulate(sc))
    text = render(summary_table(report), latency_table(report))
    assert fits_80(text)
    assert "latency (ms)" in text and "p99" in text and "req/s" in text and "tokens/s" in text
    assert "SLO attainment (latency/token <= 500 ms)" in text
    lpt = report.summary["latency_per_token_s"]["mean"]
    assert number(lpt * 1e3) in text  # the mean in ms at three significant digits


def test_numbers_keep_three_significant_digits_with_units() -> None:
    assert seconds(0.4328393546280812) == "433 ms"
    assert seconds(0.0135) == "13.5 ms" and seconds(2.5e-5) == "25 us" and seconds(205.3) == "205 s"
    assert seconds(1234.5) == "1,234 s" and seconds(None) == "-"
    assert number(15.0) == "15.0" and number(7.571) == "7.57" and number(3205.2) == "3,205"
    assert short(35.5) == "35.5" and short(36.0) == "36" and rate(64) == "64 req/s"
    assert percent(0.6038) == "60.4%" and percent(-0.87, signed=True) == "-87.0%"


def test_sweep_columns_are_headed_in_words_with_units_and_split_to_fit() -> None:
    assert label("latency_per_token_s.mean").text == "mean latency per output token (ms)"
    assert label("ttft_s.p90").text == "P90 TTFT (ms)"
    assert label("workload.arrival.rate_per_s").text == "arrival rate (req/s)"
    assert label("some.thing_tokens").text == "thing (tokens)"
    metrics = ["latency_per_token_s.mean", "latency_per_token_s.p90", "ttft_s.p90", "tpot_s.p99",
               "throughput_rps", "migrations"]
    rows = [{"variant": "round_robin_with_a_long_name", "workload.arrival.rate_per_s": r,
             "latency_per_token_s.mean": 0.4328, "latency_per_token_s.p90": 0.61, "ttft_s.p90": 12.5,
             "tpot_s.p99": 0.0151, "throughput_rps": 35.51, "migrations": 1234} for r in (8, 16)]
    cols = ["variant", "workload.arrival.rate_per_s", *metrics]
    tables = comparison_tables("sweep", rows, cols, keys=2)
    assert len(tables) >= 2
    text = render(*tables)
    assert fits_80(text)
    assert "latency_per_token_s" not in text and "round_robin_with_a_long_name" in text
    assert "433" in text and "12,500" in text and "1,234" in text and "16" in text
    assert all(t.columns[1].header == "arrival rate (req/s)" for t in tables)  # in every part


def test_status_line_off_a_terminal_prints_each_stage_once() -> None:
    console = Console(width=80, record=True, color_system=None, force_terminal=False)
    with StatusLine(console) as status:
        status("loading the model")
        status.progress(3, 40)  # counts are for a terminal's transient line only
        status("replaying 40 requests")
    lines = console.export_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("s] loading the model") and lines[1].endswith("s] replaying 40 requests")
    quiet = Console(record=True, force_terminal=False)
    with StatusLine(quiet, enabled=False) as status:
        status("nothing")
    assert quiet.export_text() == ""
