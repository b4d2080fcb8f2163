"""Whole-cluster runs with placement, every dispatcher and co-migration: no request lost or
duplicated across migrations (property test), migrations happen under forced imbalance, and the
fast path stays identical to stepping with migration on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlora.report import build_report
from dlora.scenario import scenario_from_dict
from dlora.sim.driver import simulate
from dlora.types import RequestStatus

ROOT = Path(__file__).resolve().parents[2]
DISPATCH = ["dlora", "proactive", "round_robin", "least_loaded", "consolidate", "affinity"]


def scenario(replicas=3, adapters=6, slots=3, n=80, rate=200.0, dispatch="dlora", dparams=None,
             migration="dlora", mparams=None, alpha=1.0, out=(4, 40), fast=True, seed=0):  # fmt: skip
    data = {
        "seed": seed,
        "model": {"profile": str(ROOT / "profiles" / "cpu-tiny-synthetic.yaml")},
        "cluster": {"replicas": replicas, "max_batch_size": 4, "max_batched_tokens": 256,
                    "max_adapter_slots": slots},
        "adapters": {"count": adapters, "ranks": [8, 16]},
        "workload": {"num_requests": n, "arrival": {"kind": "poisson", "rate_per_s": rate},
                     "popularity": {"kind": "zipf", "alpha": alpha},
                     "lengths": {"kind": "uniform", "prompt_range": [4, 64], "output_range": list(out)}},
        "policies": {"dispatch": {"name": dispatch, "params": dparams or {}},
                     "migration": {"name": migration, "params": mparams or {}}},
        "run": {"fast_path": fast, "progress": False},
    }
    return scenario_from_dict(data, ROOT)


def check_exactly_once(res) -> None:  # type: ignore[no-untyped-def]
    reqs = res.requests
    assert all(r.status == RequestStatus.FINISHED for r in reqs)
    assert all(r.generated_tokens == r.output_tokens for r in reqs)
    assert sum(rep.stats.finished for rep in res.cluster.replicas) == len(reqs)
    assert all(not rep.unfinished for rep in res.cluster.replicas)
    assert not any(res.cluster.deferred.values())
    moved_in = sum(rep.stats.migrated_in for rep in res.cluster.replicas)
    moved_out = sum(rep.stats.migrated_out for rep in res.cluster.replicas)
    assert moved_in == moved_out == sum(r.num_migrations for r in reqs) == res.cluster.num_migrations
    for rep in res.cluster.replicas:
        assert rep.memory.kv_used_blocks == 0
        rep.memory.check()


FAST_MIGRATION = {"interval_s": 0.05, "count_imbalance": 3, "time_limit_s": 5.0, "max_candidates": 12}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replicas=st.integers(2, 4),
    adapters=st.integers(1, 8),
    dispatch=st.sampled_from(DISPATCH),
    alpha=st.floats(0.0, 2.0),
    rate=st.floats(50.0, 400.0),
    mode=st.sampled_from(["auto", "recompute", "transfer"]),
    seed=st.integers(0, 50),
)
def test_every_request_finishes_exactly_once_across_migrations(replicas, adapters, dispatch, alpha,
                                                               rate, mode, seed):  # fmt: skip
    slots = max(2, -(-adapters // replicas))
    sc = scenario(replicas, adapters, slots, 60, rate, dispatch, None, "dlora",
                  {**FAST_MIGRATION, "mode": mode}, alpha, seed=seed)  # fmt: skip
    check_exactly_once(simulate(sc))


def test_forced_imbalance_migrates():
    # round-robin placement and one very hot adapter: replica 0 gets almost everything
    sc = scenario(3, 6, 3, 120, 300.0, "round_robin", {"placement": "round_robin"}, "dlora",
                  FAST_MIGRATION, alpha=3.0)  # fmt: skip
    res = simulate(sc)
    check_exactly_once(res)
    stats = res.migrator.stats()
    assert res.cluster.num_migrations > 0 and stats["moves"] >= res.cluster.num_migrations
    assert stats["solver_calls"] > 0
    off = simulate(scenario(3, 6, 3, 120, 300.0, "round_robin", {"placement": "round_robin"}, "none",
                            alpha=3.0))  # fmt: skip
    def busiest(result) -> int:  # type: ignore[no-untyped-def]
        return max(sum(r.replica == i for r in result.requests) for i in range(3))

    assert busiest(res) < busiest(off)  # migration spread the work


def _without_wall_time(report_json: str) -> dict:
    data = json.loads(report_json)
    for key in ("solver_wall_s", "solver_max_wall_s", "solver_share_of_simulated"):
        data["migration"].pop(key, None)
    return data


@pytest.mark.parametrize("dispatch,dparams", [("dlora", {"placement_interval_s": 0.1}),
                                              ("round_robin", {"placement": "round_robin"})])
def test_fast_path_identical_to_stepping_with_migration(dispatch, dparams):
    reports = []
    for fast in (True, False):
        sc = scenario(3, 6, 3, 100, 250.0, dispatch, dparams, "dlora", FAST_MIGRATION, alpha=1.5,
                      out=(20, 120), fast=fast)  # fmt: skip
        res = simulate(sc)
        check_exactly_once(res)
        reports.append(_without_wall_time(build_report(res).to_json()))
    assert reports[0]["summary"]["migrations"] > 0
    assert reports[0] == reports[1]


def test_placement_keeps_slots_and_covers_adapters():
    sc = scenario(3, 7, 3, 150, 300.0, "dlora", {"placement_interval_s": 0.05, "half_life_s": 0.2},
                  "none", alpha=2.0)  # fmt: skip
    res = simulate(sc)
    check_exactly_once(res)
    placer = res.cluster.placer
    assert placer.num_replans > 0
    for k in range(7):
        assert placer.holders(k)
    for rep in res.cluster.replicas:
        assert len(placer.placement.adapters_on(rep.id)) <= 3
        assert len(rep.memory.adapters) <= 3
    assert len(placer.holders(0)) >= len(placer.holders(6))


@pytest.mark.parametrize("name", ["fig2b-imbalance", "fig11a-load-balancing", "fig11b-length-scaling",
                                  "fig12-adapters"])
def test_paper_scenarios_load_with_every_sweep_point(name):
    from dlora.scenario import load_scenario

    sc = load_scenario(ROOT / "scenarios" / "paper" / f"{name}.yaml")  # validates every point
    assert sc.cluster.replicas == 8
    assert sc.description.splitlines()[0]
