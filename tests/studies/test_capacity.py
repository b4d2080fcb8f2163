"""SLO-throughput search: bisection on a known threshold, bracket expansion, a tiny real
scenario with a bounded answer, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.errors import ConfigError
from dlora.scenario import scenario_from_dict
from dlora.studies.capacity import Probe, capacity_by_variant, max_rate_under_slo, scenario_at_rate

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
    def probe(rate):
        return Probe(rate, rate / limit * 0.5, rate <= limit, 1, 0)

    return probe


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
