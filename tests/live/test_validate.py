"""`dlora validate` on a tiny live scenario: the side-by-side table's fields and validate.json."""

from __future__ import annotations

import json

from live_helpers import LIVE_DEMO
from typer.testing import CliRunner

from dlora.cli import app
from dlora.studies.validate import METRICS, compare, fresh_copy
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
