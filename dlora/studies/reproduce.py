"""`dlora reproduce`: run the paper's scenarios (PAPER.md section 7) and write REPORT.md with
tables, PNG plots, the paper's claim beside ours for every figure, and every deviation stated.

Each figure is a function that takes the settings (quick or full), runs library functions that
exist for users too (sweeps, the SLO-throughput search) on the committed scenarios in
`scenarios/paper/`, and returns a `Figure`. Quick mode shrinks clusters, request counts and
sweep points so the whole set runs in minutes on a laptop CPU; it says so in the report.

Every 7B figure runs twice: on the modern derived profile (`a800-llama-2-7b.yaml`) and under
the costs the paper's artifact measured (`a800-llama-2-7b-artifact.yaml`: 15 ms merged vs
27 ms unmerged at batch 16, 20 ms switches), so the report shows the paper, this project on
modern kernels and this project under the paper's costs. Each figure's `checks` test the
paper's stated trend with a margin; a failed check prints "no" with its reason."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import to_plain
from ..errors import ConfigError
from ..scenario import Scenario, load_scenario, scenario_from_dict
from .capacity import capacity_by_variant
from .run import run_sweep

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "scenarios" / "paper"
AZURE_TRACE = ROOT.parent / "shared" / "data" / "azure_llm_inference_2023" / "AzureLLMInferenceTrace_conv.csv"


ARTIFACT_PROFILE = "../../profiles/a800-llama-2-7b-artifact.yaml"
PROFILES = {"modern": None, "artifact": ARTIFACT_PROFILE}  # tag -> 7B profile override


@dataclass
class Settings:
    quick: bool
    out_dir: Path
    progress: Callable[[str], None] = lambda msg: None
    profile: str | None = None  # overrides the 7B scenarios' profile (the artifact's costs)
    jobs: int = 1  # capacity searches at once (`capacity_by_variant`)

    @property
    def requests_per_rate(self) -> float:
        return 30.0 if self.quick else 100.0

    @property
    def rel_tol(self) -> float:
        """Stop bisecting when the bracket is this share of the rate."""
        return 0.1 if self.quick else 0.05

    def on_probe(self, variant: str, p: Any) -> None:
        lat = "-" if p.latency_per_token_s is None else f"{p.latency_per_token_s:.3g}"
        self.progress(f"  {variant or 'probe'} {p.rate:.3g} req/s: {lat} s/token {'ok' if p.ok else 'over'}")


@dataclass(frozen=True)
class Check:
    name: str  # the paper's trend, with its margin
    ok: bool
    detail: str  # our numbers behind the verdict


@dataclass
class Figure:
    key: str
    title: str
    claim: str
    ours: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    profile: str = "modern"
    artifact: Figure | None = None  # the same figure under the artifact's costs

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def shape_matches(self) -> bool | None:
        return all(c.ok for c in self.checks) if self.checks else None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _load(name: str, sets: list[str], s: Settings | None = None) -> Scenario:
    """A paper scenario with `sets`; under `s.profile`, 7B scenarios take that profile."""
    if s is not None and s.profile is not None and not any(x.startswith("model.profile=") for x in sets):
        sets = [f"model.profile={s.profile}", *sets]
    return load_scenario(PAPER / name, sets)


def _variants(sc: Scenario, **changes: dict[str, Any]) -> str:
    """A `sweep.variants=...` override: the scenario's variants with `changes` merged in."""
    assert sc.sweep is not None and sc.sweep.variants is not None
    out = {k: dict(v) for k, v in sc.sweep.variants.items()}
    for name, extra in changes.items():
        out.setdefault(name, {}).update(extra)
    return "sweep.variants=" + json.dumps(out)


def fmt_cell(v: Any) -> str:
    """A table cell: 3 significant digits, "-" for none, "inf" for an unbounded ratio."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3g}"
    return str(v)


def sweep_table(rows: list[dict[str, Any]], parameter: str, metric: str) -> dict[Any, dict[str, Any]]:
    """{parameter value: {variant: metric}} from a sweep's rows."""
    table: dict[Any, dict[str, Any]] = {}
    for r in rows:
        table.setdefault(r[parameter], {})[r["variant"]] = r[metric]
    return table


# ---------------------------------------------------------------- Fig. 2b
def fig2b(s: Settings) -> Figure:
    from ..plots import plot_bars
    from ..report import build_report
    from ..sim.driver import simulate

    f = Figure("fig2b", "Fig. 2b: queueing imbalance across replicas under uniform dispatch",
               "Even round-robin dispatch of a uniform workload leaves replicas imbalanced: output "
               "lengths are unknown and vary, so some replicas queue far more than others.")
    sets = ["workload.num_requests=800"] if s.quick else []
    report = build_report(simulate(_load("fig2b-imbalance.yaml", sets, s)))
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
            sc = _load(f"fig9-{wl}.yaml", sets, s if panel == "7B" else None)
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
        sc = _load("fig9-gamma.yaml", sets, s)
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
    sc = _load("fig10-dynamic-batching.yaml", sets, s)
    dormant = {"policies.batching": {"name": "credit", "params": {
        "credit_fire": 1e12, "credit_floor": -1e12, "max_skip_s": None}}}
    arrival = {"policies.batching": {"name": "merged_only", "params": {"oldest": "arrival"}}}
    free = {"policies.batching.name": "unmerged_only", "model.profile": str(free_lora_profile(sc, s.out_dir / "fig10"))}
    sc = _load("fig10-dynamic-batching.yaml",
               [*sets, _variants(sc, credit_dormant=dormant, merged_only_arrival=arrival, unmerged_free_lora=free)], s)
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
    sc = _load("fig11a-load-balancing.yaml", sets, s)
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
    outcome = run_sweep(_load("fig11b-length-scaling.yaml", sets, s), s.out_dir / "fig11b")
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
def fig12(s: Settings) -> Figure:
    f = Figure("fig12", "Fig. 12: number of adapters (8 replicas, 24 req/s offered)",
               "dLoRA's throughput stays flat from 16 to 128 adapters while vLLM's and PEFT's fall.")
    sets = ["workload.num_requests=600", "sweep.values=[16, 64, 128]"] if s.quick else []
    sc = _load("fig12-adapters.yaml", sets + [
        "sweep.variants={dlora: {policies.batching: {name: credit}}, "
        "vllm: {policies.batching: {name: vllm}, policies.dispatch: {name: round_robin, params: {placement: round_robin}}, policies.migration: {name: none}}, "
        "peft: {policies.batching: {name: peft}, policies.dispatch: {name: round_robin, params: {placement: round_robin}}, policies.migration: {name: none}}}"], s)
    outcome = run_sweep(sc, s.out_dir / "fig12")
    f.plots += [p for p in outcome.paths if p.suffix == ".png"]
    table = sweep_table(outcome.sweep_rows, "adapters.count", "throughput_rps")
    f.columns = ["adapters", "dlora", "vllm", "peft"]
    f.rows = [{"adapters": k, **v} for k, v in table.items()]
    counts = sorted(table)
    change = {v: table[counts[-1]][v] / table[counts[0]][v] for v in ("dlora", "vllm", "peft")}
    f.ours = (f"Throughput at {counts[-1]} vs {counts[0]} adapters: dlora x{fmt_cell(change['dlora'])}, "
              f"vllm x{fmt_cell(change['vllm'])}, peft x{fmt_cell(change['peft'])}.")
    f.check("dlora flat within 10%", 0.9 <= change["dlora"] <= 1.1, f"x{fmt_cell(change['dlora'])}")
    for other in ("vllm", "peft"):
        f.check(f"{other} falls (by >= 10%)", change[other] <= 0.9, f"x{fmt_cell(change[other])}")
    f.deviations += ["Throughput is completed requests per second at the offered rate (not the SLO search).",
                     BASELINE_TIMING]
    if s.quick:
        f.deviations.append("Quick mode: 600 requests per point, 16, 64 and 128 adapters.")
    return f


# ---------------------------------------------------------------- Fig. 13
def fig13(s: Settings) -> Figure:
    from ..report import build_report
    from ..sim.driver import simulate

    f = Figure("fig13", "Fig. 13: overheads of dLoRA's decisions",
               "Solver time is 0.2-2.3% of run time and mode switching 0.8-1.8%.")
    sets = ["policies.batching=credit", "workload.num_requests=2400",
            "workload.arrival.rate_per_s=20"]
    sc = _load("fig11a-load-balancing.yaml", sets, s)
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


FIGURES: dict[str, Callable[[Settings], Figure]] = {
    "fig2b": fig2b, "fig9": fig9, "fig10": fig10, "fig11a": fig11a, "fig11b": fig11b, "fig12": fig12, "fig13": fig13,
}
ARTIFACT_FIGURES = ("fig9", "fig10", "fig11a", "fig11b", "fig12")  # 7B figures that depend on the costs


def reproduce(out_dir: Path, quick: bool, only: list[str] | None = None,
              progress: Callable[[str], None] = lambda msg: None,
              artifact: bool = True, jobs: int = 1) -> tuple[list[Figure], Path]:
    keys = only or list(FIGURES)
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        raise ConfigError(f"--only: unknown figure {unknown[0]!r} (known: {', '.join(FIGURES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(quick, out_dir, progress, jobs=jobs)
    art = Settings(quick, out_dir / "artifact", progress, profile=ARTIFACT_PROFILE, jobs=jobs)
    figures = []
    t0 = time.perf_counter()
    for key in keys:
        progress(f"{key}: running")
        t = time.perf_counter()
        fig = FIGURES[key](settings)
        fig.seconds = time.perf_counter() - t
        progress(f"{key}: done in {fig.seconds:.0f} s")
        if artifact and key in ARTIFACT_FIGURES:
            progress(f"{key} (artifact profile): running")
            art.out_dir.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            fig.artifact = FIGURES[key](art)
            fig.artifact.profile = "artifact"
            fig.artifact.seconds = time.perf_counter() - t
            progress(f"{key} (artifact profile): done in {fig.artifact.seconds:.0f} s")
        figures.append(fig)
    from .report_md import write_report_md

    path = write_report_md(out_dir / "REPORT.md", figures, quick, time.perf_counter() - t0,
                           left_out=[k for k in FIGURES if k not in keys])
    return figures, path
