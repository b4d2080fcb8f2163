"""`dlora validate` on a tiny live scenario: the side-by-side table's fields and validate.json."""

from __future__ import annotations

import json

from live_helpers import LIVE_DEMO
from rich.console import Console
from typer.testing import CliRunner

from dlora.cli import app
from dlora.studies.tables import validate_table
from dlora.studies.validate import METRICS, Row, Validation, compare, fresh_copy
from dlora.types import Request, RequestStatus

TINY = ["--set", "workload.num_requests=4", "--set", "workload.arrival.rate_per_s=50",
        "--set", "workload.lengths.output_range=[2,6]", "--set", "run.progress=false"]


def test_validate_prints_the_table_and_writes_validate_json(tmp_path, demo_home):
    out = tmp_path / "val"
    res = CliRunner().invoke(app, ["validate", str(LIVE_DEMO), "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    for label in ("mean latency", "P90 latency", "TTFT", "TPOT", "throughput", "mode switches"):
        assert label in res.output, label
    data = json.loads((out / "validate.json").read_text())
    rows = {r["metric"]: r for r in data["rows"]}
    assert set(rows) == {m[0] for m in METRICS}
    assert rows["completed requests"]["live"] == rows["completed requests"]["simulated"] == 4
    for key in ("mean latency (s)", "P90 latency (s)", "mean TTFT (s)", "mean TPOT (s)"):
        r = rows[key]
        assert r["live"] > 0 and r["simulated"] > 0
        assert abs(r["rel_error"] - (r["simulated"] - r["live"]) / r["live"]) < 1e-9
    assert (out / "live" / "report.json").is_file() and (out / "sim" / "report.json").is_file()
    assert data["profile"].endswith(".yaml")


def test_fresh_copy_keeps_the_workload_and_drops_the_run():
    r = Request(7, 2, 1.25, 30, 9, status=RequestStatus.FINISHED, computed_tokens=38,
                generated_tokens=9, replica=1, finish_s=2.0, prompt_token_ids=(1, 2))
    c = fresh_copy(r)
    assert (c.id, c.adapter_id, c.arrival_s, c.prompt_tokens, c.output_tokens) == (7, 2, 1.25, 30, 9)
    assert c.status == RequestStatus.PENDING and c.generated_tokens == 0 and c.finish_s is None


def test_compare_reports_relative_errors_and_switches():
    def summary(lat: float, switches: int) -> dict:
        st = {"mean": lat, "p90": 2 * lat}
        return {"latency_s": st, "ttft_s": st, "tpot_s": {"mean": None, "p90": None},
                "throughput_rps": 1.0, "throughput_output_tokens_per_s": 10.0,
                "totals": {"switches": switches}, "completed": 3}

    rows = {r.metric: r for r in compare(summary(1.0, 4), summary(1.08, 5))}
    assert abs(rows["mean latency (s)"].rel_error - 0.08) < 1e-12
    assert rows["mean latency (s)"].meets_goal is False and rows["P90 TTFT (s)"].meets_goal is True
    assert rows["mean TPOT (s)"].rel_error is None and rows["mode switches"].rel_error == 0.25


def rows_of(spread: bool) -> list[Row]:
    def row(metric, live, sim, err, goal, lo=None, hi=None):  # type: ignore[no-untyped-def]
        return Row(metric, live, sim, err, goal, lo if spread else live, hi if spread else live)

    return [row("mean latency (s)", 0.0342, 0.06336, 0.853, 0.05, 0.030, 0.036),
            row("P90 TTFT (s)", 0.00575, 0.00309, -0.463, 0.10, 0.0055, 0.006),
            row("mean TPOT (s)", None, 0.002, None, 0.10),
            row("throughput (output tokens/s)", 1114.3, 1114.1, -0.002, None, 1114.0, 1114.6),
            row("mode switches", 33.0, 33.0, 0.0, None, 33.0, 33.0)]


def test_validate_table_fits_80_columns_in_ms(tmp_path):
    for spread in (False, True):
        result = Validation("live-demo", "/x/profiles/cpu-demo-measured.yaml", rows_of(spread), None, None)  # type: ignore[arg-type]
        console = Console(width=80, record=True, color_system=None)
        table = validate_table("live-demo", result)
        console.print(table)
        text = console.export_text()
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
        assert "mean latency (ms)" in text and "34.2" in text and "63.4" in text and "+85.3%" in text
        goals = list(table.columns[-1].cells)
        assert goals[:3] == ["±5% missed", "±10% missed", "±10%"] and "throughput (tokens/s)" in text
        assert ("range" in text) == spread and ("30.0-36.0" in text) == spread


def test_validate_says_each_stage_and_warns_when_the_machine_was_busy(demo_home, monkeypatch):
    from dlora.live import driver
    from dlora.scenario import load_scenario
    from dlora.studies.validate import validate

    monkeypatch.setattr(driver.machine_load, "other_load",
                        lambda a, b: {"cpus": 2, "other_cpu_share": 0.9, "steal_share": 0.0})
    sc = load_scenario(LIVE_DEMO, [a for a in TINY if a != "--set"])
    heard: list[str] = []
    result = validate(sc, status=heard.append)
    assert heard[0] == "live run" and heard[-1].startswith("simulating the same 4 requests with ")
    assert any(n.startswith("live run: ") and "dlora's own scheduling took" in n for n in result.notes)
    warning = [n for n in result.notes if n.startswith("warning: the machine was busy")]
    assert len(warning) == 1 and "other processes used 90% of its 2 CPUs" in warning[0]
    assert "--repeats 3" in warning[0]
