"""SLO-throughput search: bisection on a known threshold, bracket expansion, a tiny real
scenario with a bounded answer, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from dlora.config import to_plain
from dlora.errors import ConfigError
from dlora.scenario import scenario_from_dict
from dlora.studies.capacity import (
    Probe,
    SloLost,
    capacity_by_variant,
    max_rate_under_slo,
    probe,
    probe_line,
    scenario_at_rate,
)
from dlora.studies.tables import capacity_reasons, capacity_table
from dlora.types import Request
from dlora.workload.traces import load_azure_llm_trace

ROOT = Path(__file__).resolve().parents[2]


def tiny(**sweep):
    data = {
        "model": {"profile": str(ROOT / "profiles" / "cpu-tiny-synthetic.yaml")},
        "cluster": {"replicas": 1, "max_batch_size": 1, "max_batched_tokens": 64},
        "adapters": {"count": 1},
        "workload": {"num_requests": 50, "arrival": {"kind": "poisson", "rate_per_s": 10},
                     "lengths": {"kind": "fixed", "prompt_tokens": 8, "output_tokens": 10}},
        "slo": {"latency_per_token_s": 0.01},
        "run": {"progress": False},
    }
    if sweep:
        data["sweep"] = sweep
    return scenario_from_dict(data, ROOT)


def threshold(limit):
    def judge(rate):
        return Probe(rate, rate / limit * 0.5, rate <= limit, 1, 0, slo_latency_per_token_s=0.5)

    return judge


def test_bisection_finds_a_known_threshold_within_tol():
    res = max_rate_under_slo(tiny(), 1.0, 16.0, tol=0.1, probe_fn=threshold(7.3))
    assert 7.2 <= res.rate <= 7.3
    assert res.bracket[0] == res.rate and res.bracket[1] - res.bracket[0] <= 0.1
    assert [p.rate for p in res.path[:2]] == [1.0, 16.0]


def test_bracket_expands_when_high_passes_and_low_failing_gives_zero():
    res = max_rate_under_slo(tiny(), 1.0, 4.0, tol=0.5, probe_fn=threshold(20.0))
    assert [p.rate for p in res.path[:4]] == [1.0, 4.0, 8.0, 16.0]
    assert 19.5 <= res.rate <= 20.0
    none = max_rate_under_slo(tiny(), 1.0, 4.0, probe_fn=threshold(0.5))
    assert none.rate == 0.0 and len(none.path) == 1
    with pytest.raises(ConfigError):
        max_rate_under_slo(tiny(), 4.0, 1.0)


def test_scenario_at_rate_sets_rate_and_request_count():
    sc = scenario_at_rate(tiny(), 12.5, requests_per_rate=10)
    assert sc.workload.arrival.rate_per_s == 12.5 and sc.workload.num_requests == 125
    assert scenario_at_rate(tiny(), 3.0, requests_per_rate=None).workload.num_requests == 50


def test_tiny_scenario_has_a_bounded_deterministic_answer():
    # one replica, batch of one, 8 + 10 tokens at about 1.5 ms per step: service about 15 ms a
    # request, so above about 66 req/s the queue grows without bound; with an SLO of 10 ms per
    # token (7x a step) the answer must lie well above 10 and below that.
    sc = tiny()
    a = max_rate_under_slo(sc, 5.0, 20.0, tol=2.0, requests_per_rate=10)
    b = max_rate_under_slo(sc, 5.0, 20.0, tol=2.0, requests_per_rate=10)
    assert 10.0 < a.rate < 66.0
    assert a == b
    assert any(not p.ok for p in a.path)
    assert all(p.latency_per_token_s is not None for p in a.path)


def test_capacity_by_variant_searches_each_variant():
    sc = tiny(variants={"fast": {}, "slow": {"slo.latency_per_token_s": 0.003}})
    res = capacity_by_variant(sc, 5.0, 20.0, tol=4.0, requests_per_rate=5)
    assert set(res) == {"fast", "slow"}
    assert res["slow"].rate < res["fast"].rate


def test_capacity_by_variant_in_worker_processes_gives_the_same_searches():
    sc = tiny(variants={"fast": {}, "slow": {"slo.latency_per_token_s": 0.003}})
    heard: list[tuple[str, float]] = []
    one = capacity_by_variant(sc, 5.0, 20.0, tol=4.0, requests_per_rate=5)
    two = capacity_by_variant(sc, 5.0, 20.0, tol=4.0, requests_per_rate=5, jobs=2,
                              on_probe=lambda v, p: heard.append((v, p.rate)))
    assert one == two  # every probe of every variant, in the same order
    assert heard == [(v, p.rate) for v in one for p in one[v].path]
    with pytest.raises(ConfigError, match="--jobs"):
        capacity_by_variant(sc, 5.0, 20.0, jobs=0)


def test_a_probe_asks_a_trace_for_no_more_requests_than_it_holds():
    data = to_plain(tiny())
    data.pop("base_dir", None)
    data["workload"] = {"arrival": {"kind": "trace", "path": "tests/data/azure_llm_2023_small.csv",
                                    "format": "azure_llm_2023", "rate_per_s": 1.0},
                        "num_requests": 3}
    data["model"]["allow_extrapolation"] = True  # (the trace's contexts are longer than the tiny profile's)
    sc = scenario_from_dict(data, ROOT)
    held = len(load_azure_llm_trace(ROOT / "tests/data/azure_llm_2023_small.csv").arrival_s)
    assert scenario_at_rate(sc, 0.02, requests_per_rate=100).workload.num_requests == 2
    big = scenario_at_rate(sc, 50.0, requests_per_rate=100)  # 5,000 asked of a small trace
    assert big.workload.num_requests == held
    assert probe(sc, 50.0, requests_per_rate=100).requests == held  # runs, no error


def test_verdicts_name_the_metric_the_value_and_the_limit_with_units():
    ok = Probe(1.0, 0.013460243506045329, True, 100, 0, 100, slo_latency_per_token_s=0.5)
    assert ok.reason == "mean latency/token 13.5 ms <= 500 ms (SLO), all 100 requests finished"
    bound = Probe(64.0, 0.4328393546280812, False, 2143, 4257, 6400, "slo", 130.0, 0.5, 0.521)
    assert bound.reason == ("mean latency/token at least 521 ms > 500 ms (SLO) whatever happens next: "
                            "at 130 s simulated, 4,257 of 6,400 requests were unfinished (433 ms over the finished)")
    drain = Probe(64.0, 0.43, False, 5000, 1400, 6400, "drain", 205.3, 0.5)
    assert drain.reason.startswith("1,400 of 6,400 requests unfinished at the drain check (205 s simulated)")
    assert "does not keep up with 64 req/s" in drain.reason
    over = Probe(8.0, 0.61, False, 800, 0, 800, slo_latency_per_token_s=0.5)
    assert over.reason == "mean latency/token 610 ms > 500 ms (SLO)"
    line = probe_line("quickstart", bound)
    assert line.startswith("quickstart: 64 req/s (6,400 requests) -> over the SLO: mean latency/token at least")
    assert "0.43283" not in line


def test_a_real_failing_probe_says_which_check_stopped_it():
    slo = probe(tiny(), 200.0, requests_per_rate=10)
    assert not slo.ok and slo.stopped == "slo" and slo.requests == 2000
    assert "> 10 ms (SLO) whatever happens next" in slo.reason and slo.lower_bound_s > 0.01
    data = to_plain(tiny())
    data.pop("base_dir")
    data["slo"]["latency_per_token_s"] = 100.0  # loose: only the drain check can fail it
    drained = probe(scenario_from_dict(data, ROOT), 200.0, requests_per_rate=10)
    assert not drained.ok and drained.stopped == "drain", drained
    assert "unfinished at the drain check" in drained.reason and "200 req/s" in drained.reason


def test_the_drain_check_fails_unfinished_work_after_twice_the_last_arrival():
    reqs = [Request(i, 0, float(i), 8, 10) for i in range(3)]  # last arrival at 2 s
    check = SloLost(100.0, drain_factor=2.0, token_s=0.1)  # deadline 2 x 2 + 10 x 0.1 = 5 s
    assert not check(4.9, reqs) and check.stopped == ""
    assert check(5.1, reqs) and check.stopped == "drain" and check.stopped_at_s == 5.1


def test_status_hears_each_probe_before_it_runs():
    heard: list[str] = []
    seen: list[float] = []

    def fake(rate):
        heard.append(f"ran {rate:g}")
        seen.append(rate)
        return threshold(7.3)(rate)

    max_rate_under_slo(tiny(), 1.0, 16.0, tol=4.0, probe_fn=fake, status=heard.append)
    assert heard[0] == "probing 1 req/s (100 requests)" and heard[1] == "ran 1"
    assert heard[2] == "probing 16 req/s (1,600 requests)"
    assert len(heard) == 2 * len(seen)


def test_capacity_table_fits_80_columns_and_says_why_the_next_rate_fails():
    results = {v: max_rate_under_slo(tiny(), 1.0, 16.0, tol=0.1, probe_fn=threshold(7.3))
               for v in ("dlora", "vllm-with-a-long-variant-name")}
    console = Console(width=80, record=True, color_system=None)
    console.print(capacity_table("quickstart", 0.5, results))
    for line in capacity_reasons("quickstart", results):
        console.print(line)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "highest rate with mean latency/token <= 500 ms" in text
    assert "7.27" in text and "16\u00a0x" in text  # a failed probe's mark stays beside its rate
    assert "dlora fails at 7.328 req/s: mean latency/token 502 ms > 500 ms (SLO)" in text
