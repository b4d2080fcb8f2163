"""The paper's cluster-wide figures (`dlora reproduce`): queueing imbalance (Fig. 2b), end-to-end
throughput under the SLO (Fig. 9), load balancing (Fig. 11a), request lengths (Fig. 11b) and the
number of adapters (Fig. 12)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import to_plain
from ..scenario import Scenario, scenario_from_dict
from .capacity import capacity_by_variant
from .figure import AZURE_TRACE, Figure, Settings, fmt_cell, load_paper, sweep_table
from .run import run_sweep


# ---------------------------------------------------------------- Fig. 2b
def fig2b(s: Settings) -> Figure:
    from ..plots import plot_bars
    from ..report import build_report
    from ..sim.driver import simulate

    f = Figure("fig2b", "Fig. 2b: queueing imbalance across replicas under uniform dispatch",
               "Even round-robin dispatch of a uniform workload leaves replicas imbalanced: output "
               "lengths are unknown and vary, so some replicas queue far more than others.")
    sets = ["workload.num_requests=800"] if s.quick else []
    report = build_report(simulate(load_paper("fig2b-imbalance.yaml", sets, s)))
    shares = [r["queueing_share"] for r in report.replicas]
    f.columns = ["replica", "completed", "queueing share of latency", "mean queueing (s)", "utilisation"]
    f.rows = [{"replica": r["replica"], "completed": r["completed"],
               "queueing share of latency": r["queueing_share"], "mean queueing (s)": r["mean_queueing_s"],
               "utilisation": r["utilisation"]} for r in report.replicas]
    lo, hi = min(shares), max(shares)
    ratio = hi / lo if lo > 0 else math.inf
    f.ours = (f"Queueing share of request latency ranges from {lo:.1%} to {hi:.1%} across the "
              f"{len(shares)} replicas (max / min = {ratio:.2g}x).")
    f.check("max / min queueing share across replicas >= 1.5", ratio >= 1.5, f"{ratio:.3g}x")
    f.plots.append(plot_bars(s.out_dir / "fig2b.png", [f"r{r['replica']}" for r in report.replicas],
                             {"queueing share": shares}, "replica", "queueing share of latency"))
    return f


# ---------------------------------------------------------------- Fig. 9
BASELINE_TIMING = (
    "peft is the dLoRA paper's PEFT (continuous batching, one adapter per forward) timed by the profile's "
    "baselines.peft term where the profile has one (profile.py): on both 7B profiles its forward costs 5.1x "
    "these kernels, a factor derived from S-LoRA's cited 8.6x over its PEFT (Table 3, setting S2, 5 "
    "adapters; scenarios/baselines-slora-s2.yaml reproduces it with S-LoRA's static padded loop), not "
    "measured on a GPU. The 13B and 70B profiles have no term: there peft runs at this project's kernels, "
    "so its ratio is a lower bound. vllm has no term: the profiles' merged iteration is what the artifact's "
    "2023 vLLM fork cost (15 ms at batch 16; the modern profile 15.3 ms); what differs is scheduling (2023 "
    "vLLM did not run prefill beside decode), which is not modelled.")
PANELS = {  # panel -> overrides of fig9-*.yaml (written for 7B)
    "7B": [],
    "13B": ["model.profile=../../profiles/a800-llama-2-13b.yaml"],
    "70B": ["model.profile=../../profiles/a800-llama-2-70b-tp4.yaml", "cluster.replicas=8", "adapters.count=32"],
}
MAX_MODELS = {"7B": 4, "13B": 2, "70B": 2}  # the paper's vLLM: full models resident per replica
PAPER_VLLM_7B_MAF1 = 7.6  # req/s, the paper's vLLM on the 7B MAF1 panel (about 8x below dLoRA)
SYSTEMS = ("dlora", "vllm", "peft", "slora")


def _fig9_caps(s: Settings, sc: Scenario, panel: str) -> dict[str, float]:
    vllm = {"policies.batching": {"name": "vllm", "params": {"max_models": MAX_MODELS[panel]}}}
    raw = to_plain(sc)
    raw.pop("base_dir", None)
    raw["sweep"]["variants"]["vllm"].update(vllm)
    sc = scenario_from_dict(raw, Path(sc.base_dir))
    caps = capacity_by_variant(sc, low=0.1, high=2.0 * sc.cluster.replicas, tol=0.1,
                               requests_per_rate=s.requests_per_rate, on_probe=s.on_probe, rel_tol=s.rel_tol,
                               jobs=s.jobs)
    return {k: v.rate for k, v in caps.items()}


def _ratios(row: dict[str, Any], rate: dict[str, float]) -> None:
    row.update(rate)
    for other in ("vllm", "peft", "slora"):
        row[f"dlora/{other}"] = rate["dlora"] / rate[other] if rate[other] > 0 else math.inf


def fig9(s: Settings) -> Figure:
    from ..plots import plot_bars, plot_sweep

    f = Figure("fig9", "Fig. 9: end-to-end throughput under the SLO (0.5 s/token)",
               "dLoRA reaches up to 57.9x the throughput of vLLM and 26.0x of PEFT; for the 7B "
               "panel on MAF1 about 8x vLLM and 11x PEFT; S-LoRA up to 1.8x higher latency.")
    f.columns = ["panel", "workload", *SYSTEMS, "dlora/vllm", "dlora/peft", "dlora/slora"]
    workloads = ["gamma"] + (["azure"] if AZURE_TRACE.is_file() else [])
    if not AZURE_TRACE.is_file():
        f.deviations.append(f"Azure LLM 2023 trace not found at {AZURE_TRACE}: the trace panels were skipped.")
    panels = ["7B"] if s.profile is not None else ["7B", "13B", "70B"]  # the artifact profile is 7B
    n_small = {"7B": (4, 16), "13B": (4, 16), "70B": (2, 8)}
    for panel in panels:
        for wl in workloads:
            if (s.quick or s.profile is not None) and panel != "7B" and wl == "azure":
                continue
            sets = list(PANELS[panel])
            if s.quick:  # an eighth-size cluster with proportionally fewer adapters
                n, k = n_small[panel]
                sets += [f"cluster.replicas={n}", f"adapters.count={k}"]
            sc = load_paper(f"fig9-{wl}.yaml", sets, s if panel == "7B" else None)
            s.progress(f"fig9 {panel} {wl}: capacity search over 4 systems")
            row: dict[str, Any] = {"panel": f"{panel} ({sc.cluster.replicas} replicas, {sc.adapters.count} adapters)",
                                   "workload": {"gamma": "Zipf-1 Gamma streams", "azure": "Azure LLM conv"}[wl]}
            _ratios(row, _fig9_caps(s, sc, panel))
            f.rows.append(row)
    # the skew sweep: the MAF1 stand-in (ATC'20 statistics) over dLoRA's stride, 7B
    from .maf_standin import maf1_standin_shares

    strides = [1, 8, 64] if s.quick else [1, 4, 16, 64]
    n, k = (4, 16) if s.quick else (32, 128)
    sweep_rows = []
    for stride in strides:
        shares = maf1_standin_shares(k, stride)
        sets = [f"cluster.replicas={n}", f"adapters.count={k}",
                "workload.popularity={kind: gamma_streams, weights: " + json.dumps(shares) + "}"]
        sc = load_paper("fig9-gamma.yaml", sets, s)
        s.progress(f"fig9 MAF1 stand-in stride {stride}: capacity search over 4 systems")
        row = {"panel": f"7B ({n} replicas, {k} adapters)",
               "workload": f"MAF1 stand-in, stride {stride} (top adapter {max(shares):.0%})"}
        _ratios(row, _fig9_caps(s, sc, "7B"))
        row["stride"] = stride
        sweep_rows.append(row)
    scale = 32 / n  # the paper's 32 replicas
    likely = min(sweep_rows, key=lambda r: abs(math.log(max(r["vllm"] * scale, 1e-9) / PAPER_VLLM_7B_MAF1)))
    likely["workload"] += " <- paper's likely point"
    f.rows += sweep_rows
    best_v = max(r["dlora/vllm"] for r in f.rows)
    best_p = max(r["dlora/peft"] for r in f.rows)
    sweep_txt = ", ".join(f"stride {r['stride']}: {fmt_cell(r['dlora/vllm'])}x vllm / {fmt_cell(r['dlora/peft'])}x peft"
                          for r in sweep_rows)
    f.ours = (f"dlora's throughput under the SLO is up to {fmt_cell(best_v)}x vllm's and {fmt_cell(best_p)}x "
              f"peft's (table). Over the MAF1 stand-in's skew: {sweep_txt}. The likely paper point (stride "
              f"{likely['stride']}) is the one whose vllm throughput, scaled to 32 replicas "
              f"({fmt_cell(likely['vllm'] * scale)} req/s), is nearest the paper's about {PAPER_VLLM_7B_MAF1} req/s "
              "(a guess at the paper's skew from its vLLM number, not a fit of dlora's).")
    for r in f.rows:
        where = f"{r['panel']}, {r['workload']}"
        f.check(f"dlora >= 2x vllm ({where})", r["dlora/vllm"] >= 2.0, f"{fmt_cell(r['dlora/vllm'])}x")
        f.check(f"dlora >= 2x peft ({where})", r["dlora/peft"] >= 2.0, f"{fmt_cell(r['dlora/peft'])}x")
        f.check(f"dlora >= 0.95x slora ({where})", r["dlora/slora"] >= 0.95, f"{fmt_cell(r['dlora/slora'])}x")
    short = {"Zipf-1 Gamma streams": "zipf1", "Azure LLM conv": "azure"}
    labels = [f"{r['panel'].split(' ')[0]}\n" + (f"MAF s{r['stride']}" if "stride" in r else short[r["workload"]])
              for r in f.rows]
    f.plots.append(plot_bars(s.out_dir / "fig9.png", labels, {k: [r[k] for r in f.rows] for k in SYSTEMS},
                             "panel / workload", "max rate within SLO (req/s)"))
    f.plots.append(plot_sweep(s.out_dir / "fig9_skew.png", "MAF1 stand-in stride (more skew ->)", [str(x) for x in strides],
                              {k: [r[k] for r in sweep_rows] for k in ("dlora/vllm", "dlora/peft", "dlora/slora")},
                              "dlora's throughput / system's"))
    f.deviations += [
        "Zipf-1 Gamma streams and a MAF1 stand-in built from the Azure Functions 2019 trace's published "
        "statistics (ATC'20: 18.6% of functions take 99.6% of invocations; log-normal invocations per "
        "function, sigma 3.55; dlora/studies/maf_standin.py) stand in for the MAF traces, which are not available.",
        "vllm keeps 4 full models resident per replica for 7B and 2 for 13B and 70B (the paper's setting), "
        "counted whole per replica (a TP-4 replica holds each model across its 4 GPUs).",
        "Profiles are derived from Vidur's A100 operator measurements plus analytic terms, not measured on A800s.",
        "Capacities are coarse near the SLO cliff: bisection stops at 10% (quick) or 5%, and a probe passes only "
        "if its requests finish by about twice the last arrival, so two close settings can land on either side "
        "(quick mode: vllm at stride 1 reaches 11 req/s on the modern profile and 19 under the artifact's, whose "
        "merged cost differs by 2%; probes at 12-19 req/s all stay near 0.11 s/token, the drain test decides).",
        "Baselines are modelled as policies on the same simulator (PAPER.md section 6), not the original systems.",
        BASELINE_TIMING,
    ]
    if s.quick:
        f.deviations.append("Quick mode: clusters of 4 replicas (70B: 2) with proportionally fewer adapters, "
                            "30 x rate requests per probe, bisection to 10%; the Azure trace panel only for 7B; "
                            "strides 1, 8 and 64.")
    return f


# ---------------------------------------------------------------- Fig. 11a
LB_SYSTEMS = ("round_robin", "proactive", "dlora", "combined")


def fig11a_checks(f: Figure, rate: dict[str, float]) -> None:
    f.check("dlora > 1.05x proactive (paper 1.4x)", rate["dlora"] > 1.05 * rate["proactive"],
            f"{fmt_cell(rate['dlora'] / rate['proactive'] if rate['proactive'] else math.inf)}x")
    f.check("proactive > 1.05x round_robin (paper: dlora 3.6x RR)", rate["proactive"] > 1.05 * rate["round_robin"],
            f"{fmt_cell(rate['proactive'] / rate['round_robin'] if rate['round_robin'] else math.inf)}x")


def fig11a(s: Settings) -> Figure:
    from ..plots import plot_bars

    f = Figure("fig11a", "Fig. 11a: load balancing across 8 replicas (throughput under the SLO)",
               "dLoRA's throughput under the SLO is 3.6x round-robin's and 1.4x Proactive's.")
    sets = ["cluster.replicas=4", "adapters.count=16"] if s.quick else []
    sc = load_paper("fig11a-load-balancing.yaml", sets, s)
    s.progress("fig11a: capacity search over round_robin, proactive, dlora, combined")
    caps = capacity_by_variant(sc, low=1.0, high=4.0 * sc.cluster.replicas, tol=0.25,
                               requests_per_rate=s.requests_per_rate, on_probe=s.on_probe, rel_tol=s.rel_tol,
                               jobs=s.jobs)
    rate = {k: v.rate for k, v in caps.items()}
    f.columns = ["system", "max rate within SLO (req/s)", "dlora / system"]
    f.rows = [{"system": k, "max rate within SLO (req/s)": rate[k],
               "dlora / system": rate["dlora"] / rate[k] if rate[k] > 0 else math.inf} for k in LB_SYSTEMS]
    f.ours = (f"dlora {fmt_cell(rate['dlora'])} req/s: {fmt_cell(rate['dlora'] / rate['round_robin'])}x round_robin, "
              f"{fmt_cell(rate['dlora'] / rate['proactive'])}x proactive; combined (substitution + migration) "
              f"{fmt_cell(rate['combined'])} req/s.")
    fig11a_checks(f, rate)
    f.plots.append(plot_bars(s.out_dir / "fig11a.png", list(LB_SYSTEMS), {"req/s": [rate[k] for k in LB_SYSTEMS]},
                             "load balancer", "max rate within SLO (req/s)"))
    f.deviations.append("RR = round-robin placement + cheapest holder; proactive = greedy placement + adapter "
                        "substitution at dispatch; dlora = greedy placement + cheapest holder + co-migration; "
                        "5 adapter slots per replica (the artifact's 4-5); placement re-planned every 100 arrivals, "
                        "kept unless the new one serves the worst-served adapter 5% better (replan_min_gain).")
    if s.quick:
        f.deviations.append("Quick mode: 4 replicas and 16 adapters, 30 x rate requests per probe, bisection to 10%.")
    return f


# ---------------------------------------------------------------- Fig. 11b
def fig11b(s: Settings) -> Figure:
    f = Figure("fig11b", "Fig. 11b: request lengths scaled 1-8x",
               "As lengths grow, dLoRA's latency stays nearly flat while round-robin's grows several-fold.")
    sets = ["workload.num_requests=300", "sweep.values=[1, 4, 8]"] if s.quick else []
    outcome = run_sweep(load_paper("fig11b-length-scaling.yaml", sets, s), s.out_dir / "fig11b")
    f.plots += [p for p in outcome.paths if p.suffix == ".png"]
    table = sweep_table(outcome.sweep_rows, "workload.lengths.scale", "latency_per_token_s.mean")
    f.columns = ["length scale", "round_robin", "dlora"]
    f.rows = [{"length scale": k, **v} for k, v in table.items()]
    scales = sorted(table)
    growth = {v: table[scales[-1]][v] / table[scales[0]][v] for v in ("round_robin", "dlora")}
    f.ours = (f"From {scales[0]}x to {scales[-1]}x lengths, mean latency per token grows "
              f"{fmt_cell(growth['dlora'])}x for dlora and {fmt_cell(growth['round_robin'])}x for round_robin.")
    f.check("dlora's latency grows at most 0.9x as much as round_robin's", growth["dlora"] <= 0.9 * growth["round_robin"],
            f"dlora x{fmt_cell(growth['dlora'])}, round_robin x{fmt_cell(growth['round_robin'])}")
    f.check("dlora nearly flat (grows <= 1.5x)", growth["dlora"] <= 1.5, f"x{fmt_cell(growth['dlora'])}")
    if s.quick:
        f.deviations.append("Quick mode: 300 requests per point, scales 1, 4 and 8.")
    return f


# ---------------------------------------------------------------- Fig. 12
FIG12_SEEDS = 5  # seeds per point: one seed's 128-vs-16 ratio varies by +-14% (quick: +-17%)


def fig12(s: Settings) -> Figure:
    f = Figure("fig12", "Fig. 12: number of adapters (8 replicas, 24 req/s offered)",
               "dLoRA's throughput stays flat from 16 to 128 adapters while vLLM's and PEFT's fall.")
    sets = ["workload.num_requests=600", "sweep.values=[16, 64, 128]"] if s.quick else []
    seeds = FIG12_SEEDS
    systems = ("dlora", "vllm", "peft")
    per_seed: list[dict[Any, dict[str, Any]]] = []
    for seed in range(seeds):
        sc = load_paper("fig12-adapters.yaml", sets + [f"seed={seed}",
            "sweep.variants={dlora: {policies.batching: {name: credit}}, "
            "vllm: {policies.batching: {name: vllm}, policies.dispatch: {name: round_robin, params: {placement: round_robin}}, policies.migration: {name: none}}, "
            "peft: {policies.batching: {name: peft}, policies.dispatch: {name: round_robin, params: {placement: round_robin}}, policies.migration: {name: none}}}"], s)
        outcome = run_sweep(sc, s.out_dir / "fig12" / f"seed{seed}")
        if seed == 0:
            f.plots += [p for p in outcome.paths if p.suffix == ".png"]
        per_seed.append(sweep_table(outcome.sweep_rows, "adapters.count", "throughput_rps"))
    counts = sorted(per_seed[0])
    table = {k: {v: sum(t[k][v] for t in per_seed) / seeds for v in systems} for k in counts}
    f.columns = ["adapters", "dlora", "vllm", "peft"]
    f.rows = [{"adapters": k, **v} for k, v in table.items()]
    change = {v: table[counts[-1]][v] / table[counts[0]][v] for v in systems}
    spread = {v: sorted(t[counts[-1]][v] / t[counts[0]][v] for t in per_seed) for v in systems}
    f.ours = (f"Throughput at {counts[-1]} vs {counts[0]} adapters (mean of {seeds} seeds): "
              + ", ".join(f"{v} x{fmt_cell(change[v])} (one seed: x{fmt_cell(spread[v][0])} to "
                          f"x{fmt_cell(spread[v][-1])})" for v in systems) + ".")
    f.check("dlora flat within 10%", 0.9 <= change["dlora"] <= 1.1, f"x{fmt_cell(change['dlora'])}")
    for other in ("vllm", "peft"):
        f.check(f"{other} falls (by >= 10%)", change[other] <= 0.9, f"x{fmt_cell(change[other])}")
    f.deviations += [f"Throughput is completed requests per second at the offered rate (not the SLO search), "
                     f"the mean over seeds 0-{seeds - 1}: one seed's requests (1,800; quick 600) decide a "
                     "128-vs-16 ratio only to about +-14% (quick +-17%; the spread is in 'Ours'); the plots are "
                     "seed 0's.",
                     BASELINE_TIMING]
    if s.quick:
        f.deviations.append("Quick mode: 600 requests per point, 16, 64 and 128 adapters.")
    return f
