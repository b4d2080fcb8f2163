"""Strict scenario loading: every problem is one line naming the key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlora.errors import ConfigError
from dlora.scenario import load_scenario, scenario_from_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def base() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


@pytest.mark.parametrize("sets, message", [
    (["workload.arrival.rate_per_s=-1"], "workload.arrival.rate_per_s: must be > 0, got -1"),
    (["cluster.replicas=0"], "cluster.replicas: must be >= 1, got 0"),
    (["cluster.replicas=two"], "cluster.replicas: must be an integer, got 'two'"),
    (["cluster.replicaz=2"], "cluster.replicaz: unknown key (allowed: replicas,"),
    (["cluster.preemption=never"], "cluster.preemption: must be one of 'recompute', 'swap', 'auto', got 'never'"),
    (["policies.batching=fastest"], "policies.batching.name: must be one of"),
    (["policies.dispatch.params.x=1"], "policies.dispatch.params.x: unknown key"),
    (["adapters.ranks=[16, 0]"], "adapters.ranks[1]: must be >= 1, got 0"),
    (["adapters.names=[a, b]"], "adapters.names: must list 32 entries (adapters.count), got 2"),
    (["slo.latency_per_token_s=0"], "slo.latency_per_token_s: must be > 0, got 0"),
    (["run.fast_path=maybe"], "run.fast_path: must be true or false, got 'maybe'"),
    (["model.profile="], "model.profile: must not be empty"),
    (["workload.arrival.kind=trace", "workload.arrival.path=missing.csv", "workload.arrival.rate_per_s=null",
      "workload.lengths.override=true"], "missing.csv"),
    (["sweep.values=[1, 2]"], "sweep.parameter: required when values are given"),
])
def test_bad_values_name_the_key_path(sets, message):
    with pytest.raises(ConfigError) as info:
        load_scenario(QUICKSTART, sets)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_section_and_not_a_mapping():
    data = base()
    del data["workload"]
    with pytest.raises(ConfigError, match="workload: required"):
        scenario_from_dict(data, QUICKSTART.parent)
    data = base()
    data["cluster"] = [1, 2]
    with pytest.raises(ConfigError, match="cluster: must be a mapping"):
        scenario_from_dict(data, QUICKSTART.parent)


def test_empty_trace_file_is_an_error(tmp_path):
    trace = tmp_path / "empty.csv"
    trace.write_text("")
    data = base()
    data["workload"] = {"arrival": {"kind": "trace", "path": str(trace)}}
    with pytest.raises(ConfigError, match="empty"):
        scenario_from_dict(data, tmp_path)


def test_overrides_reach_any_field_and_policy_shorthand():
    sc = load_scenario(QUICKSTART, ["cluster.replicas=7", "policies.batching=merged_only",
                                    "adapters.ranks=[8, 16]", "seed=3"])
    assert sc.cluster.replicas == 7 and sc.policies.batching.name == "merged_only"
    assert sc.adapters.ranks == (8, 16) and sc.seed == 3


def test_bad_sweep_point_fails_before_any_work():
    data = base()
    data["sweep"] = {"parameter": "cluster.replicas", "values": [1, -2]}
    with pytest.raises(ConfigError, match="cluster.replicas: must be >= 1, got -2"):
        scenario_from_dict(data, QUICKSTART.parent)
