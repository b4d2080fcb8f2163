"""Prefix caching in whole simulations: system prompts per adapter are computed once per
replica, so prefill work and TTFT drop; turning the cache off restores full prefills."""

from __future__ import annotations

from pathlib import Path

from dlora.report import build_report
from dlora.scenario import load_scenario
from dlora.sim.driver import simulate

QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.yaml"
BASE = ["workload.num_requests=300", "workload.arrival.rate_per_s=8", "cluster.replicas=2",
        "workload.prefix={kind: per_adapter, tokens: 512}", "run.progress=false",
        "workload.lengths={kind: uniform, prompt_range: [600, 1000], output_range: [8, 64]}"]


def _summary(caching: bool) -> dict:
    sc = load_scenario(QUICKSTART, [*BASE, f"cluster.prefix_caching={'true' if caching else 'false'}"])
    return build_report(simulate(sc)).summary


def test_system_prompts_are_cached_per_adapter_and_cut_ttft():
    on, off = _summary(True), _summary(False)
    assert off["prefix_cache_hit_rate"] == 0.0
    # 512 of 600-1000 prompt tokens are the adapter's system prompt; 32 adapters over 2 replicas
    assert 0.3 < on["prefix_cache_hit_rate"] < 0.65
    assert on["ttft_s"]["mean"] < 0.8 * off["ttft_s"]["mean"]
    assert on["completed"] == off["completed"] == 300
