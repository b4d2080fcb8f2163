"""`dlora plan`: the fewest replicas for a target rate, on a scenario worked out by hand.

Every iteration takes 0.1 s (tests/data/flat-profile.yaml) and a replica runs one request at a
time (max_batch_size 1); a request of 1 prompt token and 10 output tokens takes 10 iterations,
so a replica serves exactly 1 req/s at 0.1 s per token when it never queues. Arrivals are
evenly spaced (Gamma with CV 0.001) and dispatched round robin, so each of n replicas sees one
request every n / R seconds: with n >= R nothing queues (0.1 s/token, within the 0.5 s SLO);
with n < R the backlog grows by (1 - n/R) s per request and after 100 x R requests the mean
latency is far above 5 s per request. The answer for R = 3.5 is therefore 4 replicas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from dlora.errors import ConfigError
from dlora.scenario import scenario_from_dict
from dlora.studies.capacity import Probe
from dlora.studies.plan import plan_replicas, step_line
from dlora.studies.tables import plan_answer, plan_reasons, plan_table

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def scenario_dict() -> dict:
    return {
        "name": "plan-by-hand", "seed": 0,
        "model": {"profile": str(DATA / "flat-profile.yaml")},
        "cluster": {"replicas": 1, "max_batch_size": 1},
        "adapters": {"count": 2, "ranks": [8]},
        "workload": {"num_requests": 100, "arrival": {"kind": "gamma", "rate_per_s": 1, "cv": 0.001},
                     "lengths": {"kind": "fixed", "prompt_tokens": 1, "output_tokens": 10}},
        "policies": {"batching": "unmerged_only", "dispatch": "round_robin"},
        "slo": {"latency_per_token_s": 0.5},
        "run": {"progress": False},
        "sweep": {"variants": {"unmerged": {}, "merged": {"policies.batching": {"name": "merged_only"}}}},
    }


def test_plan_finds_the_hand_computed_replica_count():
    sc = scenario_dict()
    result = plan_replicas(scenario_from_dict(sc, DATA), target_rate=3.5)
    assert [v.replicas for v in result.variants] == [4, 4]
    ans = result.answer
    assert ans is not None and ans.replicas == 4 and ans.latency_per_token_s == pytest.approx(0.1)
    tried = [s.replicas for s in result.steps if s.variant == "unmerged"]
    assert tried[:3] == [1, 2, 4] and 3 in tried  # doubling, then bisection
    assert all(not s.probe.ok for s in result.steps if s.replicas < 4)


def test_plan_reports_none_when_even_the_maximum_fails():
    result = plan_replicas(scenario_from_dict(scenario_dict(), DATA), target_rate=3.5,
                           max_replicas=2, requests_per_rate=20)
    assert result.answer is None and all(v.replicas is None for v in result.variants)


def test_plan_rejects_bad_input():
    sc = scenario_from_dict(scenario_dict(), DATA)
    with pytest.raises(ConfigError, match="target-rate must be > 0"):
        plan_replicas(sc, target_rate=0)
    with pytest.raises(ConfigError, match="min replicas"):
        plan_replicas(sc, target_rate=1, min_replicas=5, max_replicas=2)


def test_plan_cli_prints_path_and_writes_plan_json(tmp_path):
    path = tmp_path / "plan.yaml"
    sc = scenario_dict()
    del sc["sweep"]
    path.write_text(yaml.safe_dump(sc))
    p = subprocess.run([sys.executable, "-m", "dlora.cli", "plan", str(path), "--target-rate", "2.5",
                        "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "answer: 3 replicas" in p.stdout and "misses the SLO" in p.stderr
    data = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert data["answer"]["replicas"] == 3
    bad = subprocess.run([sys.executable, "-m", "dlora.cli", "plan", str(path), "--target-rate", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "target-rate must be > 0" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_table_fits_80_columns_and_says_why_fewer_replicas_miss():
    def fake(sc, rate):
        n = sc.cluster.replicas
        if n >= 4:
            return Probe(rate, 0.1, True, 350, 0, 350, slo_latency_per_token_s=0.5)
        return Probe(rate, 0.45, False, 300, 50, 350, "drain", 210.0, 0.5)

    heard: list[str] = []
    steps: list[str] = []
    result = plan_replicas(scenario_from_dict(scenario_dict(), DATA), target_rate=3.5, probe_fn=fake,
                           status=heard.append, on_step=lambda s: steps.append(step_line(s, 3.5)))
    assert heard[0] == "unmerged: 1 replica, probing 3.5 req/s (350 requests)"
    assert steps[0] == ("unmerged: 1 replica at 3.5 req/s -> misses the SLO: 50 of 350 requests unfinished "
                        "at the drain check (210 s simulated): the cluster does not keep up with 3.5 req/s")
    console = Console(width=80, record=True, color_system=None)
    console.print(plan_table("plan-by-hand", result))
    for line in plan_reasons(result):
        console.print(line)
    console.print(plan_answer(result, 256))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "replicas for 3.5 req/s at mean latency/token <= 500 ms" in text and "100 ms" in text
    flat = " ".join(text.split())
    assert "unmerged misses with 3 replicas: 50 of 350 requests unfinished at the drain check" in flat
    assert "answer: 4 replicas with unmerged (mean latency/token 100 ms)" in flat
