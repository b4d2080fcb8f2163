"""The paper's figures inside one replica (`dlora reproduce`): dynamic batching as skew grows
(Fig. 10, with the artifact's merged-only rule and the price-gap reference beside the three
systems) and the overheads of dLoRA's decisions (Fig. 13)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..scenario import Scenario
from .figure import Figure, Settings, fmt_cell, load_paper, sweep_table, with_variants
from .run import run_sweep

# ---------------------------------------------------------------- Fig. 10
FIG10_FACTORS = {"unmerged_only": 1.9, "merged_only": 1.6}  # the paper's lowest factors
MARGIN = 0.9  # checks accept 90% of a stated factor
GUARD_COST = 1.03  # the starvation guard may cost at most 3% against a dormant guard


MERGED_RULES = {"merged_only": "", "merged_only_arrival": " (the artifact's rule: oldest by arrival)"}


def fig10_checks(f: Figure, by_alpha: dict[Any, dict[str, float]]) -> None:
    """The paper's Fig. 10 trends, with margins, on {alpha: {variant: mean latency per token}};
    the merged-only claims for each merged_only rule present (`MERGED_RULES`)."""
    alphas = sorted(by_alpha)
    lo, hi = by_alpha[alphas[0]], by_alpha[alphas[-1]]
    f.check("unmerged_only worsens with skew (>= 5% from lowest to highest alpha)",
            hi["unmerged_only"] >= 1.05 * lo["unmerged_only"],
            f"{fmt_cell(lo['unmerged_only'])} -> {fmt_cell(hi['unmerged_only'])} s/token")
    rules = [m for m in MERGED_RULES if m in lo]
    for m in rules:
        f.check(f"merged_only{MERGED_RULES[m]} improves with skew (>= 5% from lowest to highest alpha)",
                hi[m] <= 0.95 * lo[m], f"{fmt_cell(lo[m])} -> {fmt_cell(hi[m])} s/token")
    for base, factor in FIG10_FACTORS.items():
        for variant in ([base] if base != "merged_only" else rules):
            got = [by_alpha[a][variant] / by_alpha[a]["credit"] for a in alphas]
            f.check(f"credit >= {MARGIN * factor:.3g}x better than {base}{MERGED_RULES.get(variant, '')} at every "
                    f"skew (paper >= {factor}x)", min(got) >= MARGIN * factor, ", ".join(f"{fmt_cell(g)}x" for g in got))
    if all("credit_dormant" in by_alpha[a] for a in alphas):
        cost = [by_alpha[a]["credit"] / by_alpha[a]["credit_dormant"] for a in alphas]
        f.check(f"the starvation guard costs <= {GUARD_COST - 1:.0%} against a dormant guard at every skew",
                max(cost) <= GUARD_COST, ", ".join(f"{c - 1:+.1%}" for c in cost))


def free_lora_profile(sc: Scenario, out_dir: Path) -> Path:
    """A copy of the scenario's profile whose LoRA side path costs nothing (`latency.lora` at
    zero): unmerged iterations at the merged price. unmerged_only on it is Fig. 10's price-gap
    reference: what the merged-vs-unmerged price alone is worth, with FCFS batches and no switch."""
    import yaml

    from ..config import read_yaml_mapping
    from ..scenario import resolve

    path = resolve(sc, sc.model.profile)
    data = read_yaml_mapping(path, "profile")
    lora = data["latency"]["lora"]
    for k in lora:
        lora[k] = 0.0
    data["provenance"] = {**data["provenance"], "notes": f"{path.name} with latency.lora at zero (dlora "
                          "reproduce: Fig. 10's price-gap reference, not a measurement)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "profile-free-lora.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out.resolve()


def fig10(s: Settings) -> Figure:
    f = Figure("fig10", "Fig. 10: dynamic batching on one replica as skew grows",
               "Unmerged-only gets worse and merged-only better as skew grows; dLoRA is best at every "
               "skew, with 1.9-2.4x lower average latency than unmerged-only and 1.6-3.9x lower than merged-only.")
    sets = ["workload.num_requests=200", "sweep.values=[0.0, 1.0, 3.0]"] if s.quick else []
    sc = load_paper("fig10-dynamic-batching.yaml", sets, s)
    dormant = {"policies.batching": {"name": "credit", "params": {
        "credit_fire": 1e12, "credit_floor": -1e12, "max_skip_s": None}}}
    arrival = {"policies.batching": {"name": "merged_only", "params": {"oldest": "arrival"}}}
    free = {"policies.batching.name": "unmerged_only", "model.profile": str(free_lora_profile(sc, s.out_dir / "fig10"))}
    sc = load_paper("fig10-dynamic-batching.yaml",
               [*sets, with_variants(sc, credit_dormant=dormant, merged_only_arrival=arrival, unmerged_free_lora=free)], s)
    outcome = run_sweep(sc, s.out_dir / "fig10")
    f.plots += [p for p in outcome.paths if p.suffix == ".png"]
    by_alpha = sweep_table(outcome.sweep_rows, "workload.popularity.alpha", "latency_per_token_s.mean")
    f.columns = ["alpha", "unmerged_only", "merged_only", "merged_only_arrival", "credit", "credit_dormant",
                 "unmerged_free_lora", "worse baseline / credit", "worse (artifact rule) / credit",
                 "price gap (unmerged_only / unmerged_free_lora)", "guard cost"]
    for alpha, v in by_alpha.items():
        worse = max(v["unmerged_only"], v["merged_only"])
        worse_artifact = max(v["unmerged_only"], v["merged_only_arrival"])
        f.rows.append({"alpha": alpha, **v, "worse baseline / credit": worse / v["credit"],
                       "worse (artifact rule) / credit": worse_artifact / v["credit"],
                       "price gap (unmerged_only / unmerged_free_lora)": v["unmerged_only"] / v["unmerged_free_lora"],
                       "guard cost": f"{v['credit'] / v['credit_dormant'] - 1:+.1%}"})
    fig10_checks(f, by_alpha)
    ratios = [r["worse baseline / credit"] for r in f.rows]
    alphas = sorted(by_alpha)
    m_lo, m_hi = by_alpha[alphas[0]]["merged_only"], by_alpha[alphas[-1]]["merged_only"]
    f.ours = (f"the worse baseline's mean latency per token is {fmt_cell(min(ratios))}-{fmt_cell(max(ratios))}x "
              f"credit's; merged_only goes {fmt_cell(m_lo)} -> {fmt_cell(m_hi)} s/token from alpha "
              f"{alphas[0]} to {alphas[-1]}" + (" (it improves with skew, as in the paper)." if m_hi < m_lo else
              " (worse with skew, unlike the paper: see the note on the inversion below)."))
    f.deviations += [
        "Mean latency per token (s) in the table; the sweep's P90 is in fig10/sweep.json. credit_dormant is "
        "the credit policy with its starvation guard off (fire 1e12, no wait trigger): 'guard cost' is the "
        "default guard's price. merged_only_arrival is merged_only with `oldest: arrival`, the artifact's "
        "merge rule (the paper's merged-only); merged_only (the default rule) merges the adapter of the "
        "first request in the replica's priority order. unmerged_free_lora is unmerged_only on a copy of the "
        "profile whose LoRA side path costs nothing (fig10/profile-free-lora.yaml): every batch at the merged "
        "price, FCFS, no switch. 'price gap' is what the merged-vs-unmerged price alone is worth over "
        "unmerged_only; credit's factor over unmerged_only beyond it comes from its order (serving an "
        "adapter's requests together). The stated 1.9x over unmerged_only needs a price gap the modern "
        "profile does not have (unmerged about 1.2x merged at batch 16, against 1.8x in the artifact's "
        "costs).",
        "merged_only's inversion (issue 12: 0.208 -> 0.303 -> 0.282 s/token at alpha 0 / 1 / 3) came from the "
        "artifact's rule under overload (docs/findings/merged_only_skew.md): the adapter of the oldest request "
        "by arrival, at 4 req/s where merged_only completes 1.6, so cold adapters' requests grow oldest and "
        "their small merged batches hold the replica (alpha 3: 29% of iterations, 3.1 requests each, for 8% "
        "of the requests; hot batches 13.8). Not the switch cost (x0.01: 0.208 / 0.284 / 0.281), not power law vs the paper's stride "
        "(MAF1 stand-in stride 1 / 8 / 32 / 64: 0.241 / 0.271 / 0.323 / 0.358), not the lengths as such "
        "(x0.25 lengths at 16 req/s, the same token load: 0.177 / 0.247 / 0.230); at 1.5 req/s it follows "
        "the paper at the ends (0.135 / 0.163 / 0.093). This revision plans over running requests first "
        "(the admission contract), so merged_only now keeps the adapter of the earliest-admitted running "
        "request, draining one adapter at a time (8-10 switches a run): not the artifact's rule, and the "
        "reason the figure's trend now matches.",
    ]
    if s.quick:
        f.deviations.append("Quick mode: 200 requests per point, skew alpha in {0, 1, 3}.")
    return f


# ---------------------------------------------------------------- Fig. 13
def fig13(s: Settings) -> Figure:
    from ..report import build_report
    from ..sim.driver import simulate

    f = Figure("fig13", "Fig. 13: overheads of dLoRA's decisions",
               "Solver time is 0.2-2.3% of run time and mode switching 0.8-1.8%.")
    sets = ["policies.batching=credit", "workload.num_requests=2400",
            "workload.arrival.rate_per_s=20"]
    sc = load_paper("fig11a-load-balancing.yaml", sets, s)
    t0 = time.perf_counter()
    res = simulate(sc, measure_scheduler=True)
    rep = build_report(res)
    mig = res.migrator.stats()
    run_s = rep.summary["duration_s"]
    totals = rep.summary["totals"]
    sched = res.scheduler_wall_s / totals["busy_s"] if totals["busy_s"] else 0.0
    solver = mig.get("solver_wall_s", 0.0) / run_s if run_s else 0.0
    switch = totals["switch_s"] / totals["busy_s"] if totals["busy_s"] else 0.0
    f.columns = ["overhead", "share", "how measured"]
    f.rows = [
        {"overhead": "scheduler (policy + admission)", "share": sched,
         "how measured": "wall time of schedule() per iteration / simulated busy time of the same iterations"},
        {"overhead": "migration solver", "share": solver,
         "how measured": f"solver wall time / simulated run time ({mig.get('solver_calls', 0)} calls)"},
        {"overhead": "mode switching", "share": switch, "how measured": "simulated switch time / busy time"},
    ]
    f.ours = (f"scheduler {sched:.2%}, solver {solver:.2%}, switching {switch:.2%} of run time "
              f"(simulation itself took {time.perf_counter() - t0:.1f} s).")
    f.check("solver <= 5% of run time (paper 0.2-2.3%)", solver <= 0.05, f"{solver:.2%}")
    f.check("mode switching <= 5% of busy time (paper 0.8-1.8%)", switch <= 0.05, f"{switch:.2%}")
    f.deviations.append("Scheduler and solver times are this machine's Python wall times set against the "
                        "simulated GPU time; the paper measured them in its live system.")
    return f
