"""The fast path against stepping every iteration, over random small scenarios.

Every policy, dispatcher and migration, memory and token caps, adapter slots and static adapter
memory: the whole report.json must be byte-identical; on a profile whose measured range the
batches leave (`range`: narrow), the same error. `DLORA_FASTPATH_CASES` sets the number of
cases (a few dozen by default; run a few hundred or more before changing the fast path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlora.errors import ProfileError
from dlora.report import build_report
from dlora.scenario import load_scenario
from dlora.sim.driver import simulate

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
CASES = int(os.environ.get("DLORA_FASTPATH_CASES", "30"))

case_st = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "replicas": st.integers(1, 3),
    "adapters": st.integers(1, 6),
    "ranks": st.sampled_from(["[8]", "[8, 64]", "[16, 32]"]),
    "requests": st.integers(3, 40),
    "rate": st.sampled_from([2, 10, 40]),
    "batch": st.sampled_from([2, 4, 16]),
    "tokens": st.sampled_from([32, 64, 512, 4096]),
    "memory": st.sampled_from([0.002, 0.004, 0.02, 1.0]),
    "slots": st.sampled_from(["null", "1", "2"]),
    "adapter_memory": st.sampled_from(["unified", "static"]),
    "preemption": st.sampled_from(["recompute", "swap", "auto"]),
    "batching": st.sampled_from(["unmerged_only", "merged_only", "credit", "credit_guard", "credit_live",
                                 "credit_frac", "vllm", "peft", "slora"]),
    "dispatch": st.sampled_from(["round_robin", "least_loaded", "dlora", "proactive"]),
    "migration": st.sampled_from(["none", "dlora"]),
    "prefix": st.sampled_from(["none", "per_adapter", "groups"]),
    "caching": st.booleans(),
    "range": st.sampled_from(["wide", "wide", "wide", "narrow"]),
})


@pytest.fixture(scope="module")
def narrow_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's profile measured over a narrow range: batches of more than 96 tokens
    or 3 decoding sequences are beyond it (contexts stay inside: at most 128 + 48 - 1)."""
    data = yaml.safe_load((ROOT / "profiles" / "a800-llama-2-7b.yaml").read_text())
    data["range"] = {"max_batch_tokens": 96, "max_decode_seqs": 3, "max_context_tokens": 200}
    path = tmp_path_factory.mktemp("profiles") / "narrow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _overrides(c: dict, narrow: Path | None = None) -> list[str]:
    out = [
        f"seed={c['seed']}", f"cluster.replicas={c['replicas']}", f"adapters.count={c['adapters']}",
        f"adapters.ranks={c['ranks']}", f"workload.num_requests={c['requests']}",
        f"workload.arrival.rate_per_s={c['rate']}", f"cluster.max_batch_size={c['batch']}",
        f"cluster.max_batched_tokens={c['tokens']}", f"cluster.memory_fraction={c['memory']}",
        f"cluster.max_adapter_slots={c['slots']}", f"cluster.adapter_memory={c['adapter_memory']}",
        f"cluster.preemption={c['preemption']}",
        f"policies.dispatch={c['dispatch']}",
        "workload.lengths={kind: uniform, prompt_range: [1, 128], output_range: [1, 48]}",
        "run.progress=false", f"cluster.prefix_caching={'true' if c['caching'] else 'false'}",
    ]
    if c["prefix"] == "per_adapter":
        out.append("workload.prefix={kind: per_adapter, tokens: 48}")
    elif c["prefix"] == "groups":
        out.append("workload.prefix={kind: groups, tokens: 40, groups: 2}")
    if c["batching"] == "credit_guard":  # the starvation guard firing often (seconds-based clocks)
        out.append("policies.batching={name: credit, params: {max_skip_s: 0.05}}")
    elif c["batching"] == "credit_live":  # credits that reach every threshold (whole numbers:
        # repeats found and applied at once, `CreditRepeats._same_run`)
        out.append("policies.batching={name: credit, params: {credit_fire: 6, credit_release: 2, "
                   "credit_floor: -5, max_skip_s: 0.2}}")
    elif c["batching"] == "credit_frac":  # credits that are not whole numbers: one by one
        out.append("policies.batching={name: credit, params: {credit_per_skip: 0.3, credit_fire: 2.5, "
                   "credit_floor: -1.7, credit_release: 0.4}}")
    else:
        out.append(f"policies.batching={c['batching']}")
    if c["adapter_memory"] == "static":
        out.append("cluster.adapter_memory_fraction=0.5")
    if c["migration"] == "dlora":
        out.append("policies.migration={name: dlora, params: {interval_s: 0.5}}")
    if c["range"] == "narrow" and narrow is not None:
        out.append(f"model.profile={narrow}")
    return out


def _report(overrides: list[str], fast: bool) -> tuple[str, list[tuple[object, ...]]]:
    """report.json and what requests.csv adds per request (the executing seconds among them),
    as floats' exact bits; or the error that stopped the run (a batch beyond the profile's
    range), which names the simulated time it was raised at."""
    sc = load_scenario(QUICKSTART, [*overrides, f"run.fast_path={'true' if fast else 'false'}"])
    try:
        result = simulate(sc)
    except ProfileError as exc:
        return f"error: {exc}", []
    times = [(r.id, r.executing_s.hex(), r.first_scheduled_s, r.num_preemptions, r.num_migrations)
             for r in result.requests]
    return build_report(result).to_json(), times


@settings(max_examples=CASES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=case_st)
def test_fast_path_report_equals_stepping(case: dict, narrow_profile: Path) -> None:
    overrides = _overrides(case, narrow_profile)
    assert _report(overrides, True) == _report(overrides, False), overrides


PAPER_SHAPE = [  # 4 replicas of the paper's end-to-end setup (benchmarks/bench_sim_scale.py), 15 s
    "model.profile=../profiles/a800-llama-2-7b.yaml", "cluster.replicas=4", "cluster.max_batch_size=16",
    "cluster.max_batched_tokens=4096", "adapters.count=16", "adapters.ranks=[16]", "workload.num_requests=null",
    "workload.duration_s=15", "workload.arrival={kind: gamma, rate_per_s: 16, cv: 1.0}",
    "workload.popularity={kind: gamma_streams, alpha: 1.0}",
    "workload.lengths={kind: lognormal, prompt_median: 340, prompt_sigma: 0.9, output_median: 360, "
    "output_sigma: 0.7, min_prompt_tokens: 4, max_prompt_tokens: 1024, min_output_tokens: 4, max_total_tokens: 2048}",
    "policies.dispatch=dlora", "policies.migration={name: dlora, params: {interval_s: 5}}", "run.progress=false",
]


@pytest.mark.parametrize("credit", [
    "{credit_fire: 6, credit_release: 2, credit_floor: -5}",
    "{credit_fire: 20, credit_floor: -30, max_skip_s: 2.0}",
    "{credit_per_skip: 0.3, credit_fire: 2.5, credit_floor: -1.7, credit_release: 0.4}",
])
def test_long_credit_moving_repeats_equal_stepping(credit: str) -> None:
    """Merged runs of a hundred iterations and more whose credits cross every threshold (the
    bench, service, the wait trigger), with whole-number credits (the repeats found and applied
    at once: `CreditRepeats._same_run`, `_observe_run`) and not (one by one)."""
    overrides = [*PAPER_SHAPE, f"policies.batching={{name: credit, params: {credit}}}"]
    assert _report(overrides, True) == _report(overrides, False)


@pytest.mark.parametrize("extra", [
    # swaps: swapped-in requests register their prefix blocks again while decoding (per
    # iteration), which gives the waiting requests of their adapter prefix hits
    ["cluster.memory_fraction=0.04", "workload.prefix={kind: per_adapter, tokens: 100}", "cluster.preemption=swap"],
    ["cluster.memory_fraction=0.05", "cluster.preemption=recompute"],
    ["cluster.memory_fraction=0.08", "workload.prefix={kind: groups, tokens: 64, groups: 2}", "cluster.preemption=auto"],
])
def test_jumps_past_waiting_requests_equal_stepping(extra: list[str]) -> None:
    """Near capacity under memory pressure the plan often holds waiting requests admission
    refuses for want of KV (`ReplicaScheduler.blocks_admission`): the fast path covers those
    iterations too (it did, here), with the same report as stepping them."""
    overrides = [*PAPER_SHAPE, "workload.arrival={kind: gamma, rate_per_s: 16, cv: 1.0}",
                 "policies.batching=credit", *extra]
    fast = simulate(load_scenario(QUICKSTART, [*overrides, "run.fast_path=true"]))
    stepped = simulate(load_scenario(QUICKSTART, [*overrides, "run.fast_path=false"]))
    assert fast.fast_path is not None and fast.fast_path["waiting_jumps"] > 0
    assert build_report(fast).to_json() == build_report(stepped).to_json()


def test_a_jump_beyond_the_profile_range_stops_the_run_as_stepping_does(narrow_profile: Path) -> None:
    """Four requests on one replica whose profile was measured up to 3 decoding sequences: the
    iteration after the fourth prefill decodes 4, which stepping refuses. The fast path used to
    cover it with a jump (no view read the replica: round-robin dispatch) and finish the run."""
    overrides = [f"model.profile={narrow_profile}", "cluster.replicas=1", "cluster.max_batch_size=4",
                 "cluster.max_batched_tokens=64", "workload.num_requests=4", "workload.arrival.rate_per_s=10",
                 "policies.dispatch=round_robin", "run.progress=false",
                 "workload.lengths={kind: uniform, prompt_range: [10, 20], output_range: [40, 48]}"]
    fast, stepped = _report(overrides, True), _report(overrides, False)
    assert stepped[0].startswith("error: at ") and "batch of 4 decoding sequences" in stepped[0]
    assert fast == stepped


def test_a_batch_beyond_the_range_that_preemption_shrinks_runs_as_stepping(narrow_profile: Path,
                                                                           tmp_path: Path) -> None:
    """Four requests decode together where the profile measured 3 sequences, but their next
    iteration's KV blocks do not fit: stepping preempts one and runs 3, inside the range. The
    fast path must leave that iteration to stepping, not stop the run (a review found it did)."""
    trace = tmp_path / "four.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens,adapter\n" + "0,16,40,\n" * 4)
    overrides = [f"model.profile={narrow_profile}", "cluster.replicas=1", "cluster.max_batch_size=4",
                 "cluster.max_batched_tokens=64", "cluster.kv_blocks=6", "cluster.prefix_caching=false",
                 "adapters.count=1", "adapters.ranks=[1]", f"workload.arrival={{kind: trace, path: {trace}}}",
                 "workload.lengths=null", "workload.num_requests=4", "policies.dispatch=round_robin",
                 "run.progress=false"]
    fast, stepped = _report(overrides, True), _report(overrides, False)
    assert not stepped[0].startswith("error") and json.loads(stepped[0])["summary"]["preemptions"] > 0
    assert fast == stepped


def test_requests_beyond_the_profile_context_stop_the_run_before_it_starts(tmp_path: Path) -> None:
    """A request whose last decode iteration would read more context than the profile measured
    is refused before any work (stepping used to stop at that iteration, the fast path later),
    unless the scenario allows extrapolation."""
    overrides = ["workload.num_requests=20", "run.progress=false",
                 "workload.lengths={kind: fixed, prompt_tokens: 4000, output_tokens: 120}"]
    sc = load_scenario(QUICKSTART, overrides)
    with pytest.raises(ProfileError, match=r"of 20 requests reach a context beyond the profile's measured "
                                           r"range \(4096 tokens\), up to 4119 \(request 0: 4000 prompt"):
        simulate(sc)
    ok = simulate(load_scenario(QUICKSTART, [*overrides, "model.allow_extrapolation=true"]))
    assert sum(r.finish_s is not None for r in ok.requests) == 20
    # a request asking for no output still generates a token: its prompt alone is its context
    table = tmp_path / "lengths.csv"
    table.write_text("prompt_tokens,output_tokens\n4097,0\n")
    with pytest.raises(ProfileError, match=r"up to 4097 \(request 0: 4097 prompt \+ 0 output"):
        simulate(load_scenario(QUICKSTART, ["workload.num_requests=1", "run.progress=false",
                                            f"workload.lengths={{kind: empirical, path: {table}}}"]))
    # a request arriving after the horizon is never simulated: not checked
    late = tmp_path / "late.csv"
    late.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,100,10\n50.0,4000,200\n")
    cut = simulate(load_scenario(QUICKSTART, [f"workload.arrival={{kind: trace, path: {late}}}", "run.horizon_s=5",
                                              "workload.lengths=null", "workload.num_requests=2", "run.progress=false"]))
    assert sum(r.finish_s is not None for r in cut.requests) == 1
    # a request no replica could hold is rejected on its own, as before, beyond the range or not
    small = simulate(load_scenario(QUICKSTART, [*overrides, "cluster.memory_fraction=0.003"]))
    assert len(small.cluster.rejected) == 20
