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


# ---- bad input families (issue 13): one line with the key path or the file and line ----


@pytest.mark.parametrize("sets", [
    ["workload.arrival.rate_per_s=.inf"],
    ["workload.arrival.rate_per_s=.nan"],
    ["workload.lengths.prompt_sigma=.inf"],
    ["workload.lengths.output_median=.inf"],
    ["slo.latency_per_token_s=-.inf"],
    ["cluster.memory_fraction=.nan"],
    ["cluster.expected_output_tokens=.inf"],
    ["adapters.ranks=[16, .inf]"],
    ["workload.num_requests=.inf"],
])
def test_non_finite_numbers_fail_every_bound(sets):
    with pytest.raises(ConfigError) as info:
        load_scenario(QUICKSTART, sets)
    key = sets[0].split("=")[0].replace("ranks", "ranks[1]")
    assert str(info.value).startswith(f"{key}: must be")
    assert "finite" in str(info.value) or "integer" in str(info.value)


def test_duplicate_keys_are_refused_with_the_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text(QUICKSTART.read_text().replace("seed: 0\n", "seed: 0\nseed: 1\n"))
    line = dup.read_text().splitlines().index("seed: 1") + 1
    with pytest.raises(ConfigError, match=rf"dup.yaml: line {line}: duplicate key 'seed' \(first at line {line - 1}\)"):
        load_scenario(dup)
    nested = tmp_path / "nested.yaml"
    nested.write_text(QUICKSTART.read_text().replace("  replicas: 4\n", "  replicas: 4\n  replicas: 8\n"))
    with pytest.raises(ConfigError, match="duplicate key 'replicas'"):
        load_scenario(nested)
    with pytest.raises(ConfigError, match="duplicate key 'replicas'"):
        load_scenario(QUICKSTART, ["cluster={replicas: 1, replicas: 2}"])
    merged = tmp_path / "merge.yaml"  # a key written beside a YAML merge (<<) is no duplicate
    merged.write_text(QUICKSTART.read_text().replace("cluster:\n", "x-base: &c {replicas: 2}\ncluster:\n  <<: *c\n"))
    with pytest.raises(ConfigError, match="x-base: unknown key"):  # parsed fine, then the schema
        load_scenario(merged)


def test_non_utf8_and_deeply_nested_scenarios(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(QUICKSTART.read_bytes().replace(b"name: quickstart", b"name: caf\xe9"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: line \d+: not UTF-8 text"):
        load_scenario(latin1)
    for text in ("a: " + "[" * 5000 + "]" * 5000, "a: " + "{a: " * 5000 + "1" + "}" * 5000):
        deep = tmp_path / "deep.yaml"
        deep.write_text(text)
        with pytest.raises(ConfigError, match="deep.yaml: YAML nested too deeply"):
            load_scenario(deep)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_scenario(QUICKSTART, ["seed=" + "[" * 5000 + "]" * 5000])


def test_adapter_that_never_fits_a_replica_names_adapters_ranks():
    from dlora.build import check_scenario

    check_scenario(load_scenario(QUICKSTART))  # the quickstart is fine
    with pytest.raises(ConfigError, match=r"^adapters.ranks\[0\]: rank 100000 makes adapters of .* no request"):
        check_scenario(load_scenario(QUICKSTART, ["adapters.ranks=[100000]"]))
    with pytest.raises(ConfigError, match=r"^adapters.ranks\[1\]: .*static adapter budget"):
        check_scenario(load_scenario(QUICKSTART, ["adapters.ranks=[1, 16]", "cluster.adapter_memory=static",
                                                  "cluster.adapter_memory_fraction=0.0001"]))
    sweep = ["sweep.variants={big: {adapters.ranks: [100000]}}"]
    with pytest.raises(ConfigError, match=r"^sweep point big: adapters.ranks\[0\]"):
        check_scenario(load_scenario(QUICKSTART, sweep))
