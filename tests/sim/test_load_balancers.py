"""The paper's three load balancers (Fig. 11a) and their combination differ by mechanism:
dlora migrates and never substitutes, proactive substitutes (loads at non-holders) and never
migrates, round_robin does neither; all finish every request."""

from __future__ import annotations

from pathlib import Path

from dlora.scenario import load_scenario
from dlora.sim.driver import simulate

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "round_robin": ["policies.dispatch={name: dlora, params: {placement: round_robin}}", "policies.migration=none"],
    "proactive": ["policies.dispatch=proactive", "policies.migration=none"],
    "dlora": [],
    "combined": ["policies.dispatch=proactive"],
}


def run(name: str):  # type: ignore[no-untyped-def]
    sc = load_scenario(ROOT / "scenarios" / "paper" / "fig11a-load-balancing.yaml",
                       ["sweep=null", "cluster.replicas=4", "adapters.count=16", "workload.num_requests=960",
                        "workload.arrival.rate_per_s=32", *VARIANTS[name]])
    res = simulate(sc)
    assert all(r.is_done for r in res.requests)
    stats = res.cluster.dispatcher.stats()
    return res.cluster.num_migrations, stats["substitutions"], stats["placement"]["replans"]


def test_load_balancers_differ_by_mechanism() -> None:
    out = {name: run(name) for name in VARIANTS}
    assert out["round_robin"] == (0, 0, 0)  # static placement, holders only, no migration
    migrations, subs, replans = out["proactive"]
    assert migrations == 0 and subs > 0 and replans > 0
    migrations, subs, replans = out["dlora"]
    assert migrations > 0 and subs == 0 and replans > 0
    migrations, subs, _ = out["combined"]
    assert migrations > 0 and subs > 0
