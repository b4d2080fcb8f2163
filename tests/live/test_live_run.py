"""`dlora run` on the embedded demo: every request completes with the report filled; bad
model folders and bad scenarios exit 2 with one clear line."""

from __future__ import annotations

import json

from live_helpers import LIVE_DEMO
from typer.testing import CliRunner

from dlora.cli import app

TINY = ["--set", "workload.num_requests=4", "--set", "workload.arrival.rate_per_s=50",
        "--set", "workload.lengths.output_range=[2,6]", "--set", "run.progress=false"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_run_on_the_demo_completes_every_request_and_fills_the_report(tmp_path, demo_home):
    out = tmp_path / "live"
    res = invoke("run", str(LIVE_DEMO), "--out", str(out), *TINY)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["requests"] == s["completed"] == 4 and s["unfinished"] == 0
    for key in ("latency_s", "latency_per_token_s", "ttft_s", "tpot_s", "queueing_s"):
        assert s[key]["mean"] is not None and s[key]["mean"] > 0, key
    assert s["totals"]["iterations"] > 0 and s["totals"]["failed_steps"] == 0
    live = report["live"]
    assert live["iterations"] == s["totals"]["iterations"]
    assert 0 < live["scheduler_share"] < 1 and live["executor_s"] > 0 and live["dead_replicas"] == []
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == 5 and all(",finished," in r for r in rows[1:])
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert (demo_home / "demo" / "config.json").is_file()  # the demo was written, not downloaded


def test_missing_model_folder_exits_2(tmp_path):
    res = invoke("run", str(LIVE_DEMO), *TINY, "--set", f"model.path={tmp_path / 'nope'}")
    assert res.exit_code == 2
    assert "model.path" in res.output and "is not a folder" in res.output
    assert "Traceback" not in res.output


def test_model_folder_without_config_exits_2(tmp_path):
    (tmp_path / "model").mkdir()
    res = invoke("run", str(LIVE_DEMO), *TINY, "--set", f"model.path={tmp_path / 'model'}",
                 "--set", "adapters.paths=[a,b,c,d]")
    assert res.exit_code == 2
    assert "config.json" in res.output and "Traceback" not in res.output


def test_model_folder_without_adapter_paths_exits_2(tmp_path):
    (tmp_path / "model").mkdir()
    res = invoke("run", str(LIVE_DEMO), *TINY, "--set", f"model.path={tmp_path / 'model'}")
    assert res.exit_code == 2 and "adapters.paths" in res.output


def test_a_sweep_is_refused_with_exit_2():
    res = invoke("run", str(LIVE_DEMO), *TINY, "--set",
                 "sweep={parameter: workload.arrival.rate_per_s, values: [1, 2]}")
    assert res.exit_code == 2 and "sweep" in res.output


def test_run_says_each_stage_and_words_the_scheduler_overhead(demo_home):
    from dlora.live.driver import run_live
    from dlora.scenario import load_scenario

    sc = load_scenario(LIVE_DEMO, [a for a in TINY if a != "--set"])
    heard: list[str] = []
    outcome, ok = run_live(sc, None, status=heard.append)
    assert ok
    assert heard[0] == "preparing live-demo: 2 replica(s)"
    assert heard[1] == "loading the embedded demo model into 2 replica(s) with 4 adapter(s)"
    assert heard[2].startswith("replaying 4 requests live (arrivals over ")
    assert outcome.notes[0].startswith("ran 4 requests live in ")
    assert outcome.notes[1].startswith("dlora's own scheduling took ")
    assert outcome.report is not None and "machine" in outcome.report.extra["live"]


def test_scheduler_note_reads_as_a_sentence():
    from dlora.live.driver import scheduler_note

    live = {"scheduler_share": 0.6038, "scheduler_us_per_iteration": 3812.0,
            "executor_ms_per_iteration": 2.5, "iterations": 1215}
    assert scheduler_note(live) == ("dlora's own scheduling took 60% of the iteration time: 3.81 ms per "
                                    "iteration against 2.5 ms of model step (1,215 iterations)")
