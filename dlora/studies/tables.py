"""What `dlora capacity`, `plan` and `validate` print on stdout: rich tables that fit 80
columns, numbers at sensible precision with units, and each verdict's reason in words (the
full search paths and values are in capacity.json / plan.json / validate.json)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rich.table import Table

from ..labels import count, number, percent, rate, replicas, seconds, short
from .capacity import CapacityResult, Probe
from .plan import PlanResult

if TYPE_CHECKING:  # validate loads the live driver; capacity and plan need not
    from .validate import Validation

NBSP = "\u00a0"  # keeps "64 x" on one line when a cell wraps


def _path(probes: list[Probe]) -> str:
    return ", ".join(f"{short(p.rate)}{'' if p.ok else NBSP + 'x'}" for p in probes)


def capacity_table(name: str, slo_s: float, results: Mapping[str, CapacityResult]) -> Table:
    """One row per variant: the largest rate that passed, the first rate above it that failed
    and the search path (x: failed); `capacity_reasons` says why that rate fails."""
    t = Table(title=f"{name}: highest rate with mean latency/token <= {seconds(slo_s)}", header_style="bold",
              caption="x: the probe failed (why: below; every probe: stderr and capacity.json)")
    t.add_column("variant", overflow="fold")
    t.add_column("max rate (req/s)", justify="right")
    t.add_column("fails at (req/s)", justify="right")
    t.add_column("search path (req/s)")
    for variant, res in results.items():
        t.add_row(variant or name, short(res.rate), short(res.bracket[1]), _path(list(res.path)))
    return t


def capacity_reasons(name: str, results: Mapping[str, CapacityResult]) -> list[str]:
    """Per variant, why the first failing rate above the answer fails (or that none did)."""
    lines = []
    for variant, res in results.items():
        above = [p for p in res.path if not p.ok and p.rate == res.bracket[1]]
        if above:
            lines.append(f"{variant or name} fails at {rate(above[-1].rate)}: {above[-1].reason}")
        else:
            lines.append(f"{variant or name}: no probe failed up to {rate(res.rate)}; raise --high")
    return lines


def plan_table(name: str, result: PlanResult) -> Table:
    """One row per policy variant: the fewest replicas that meet the SLO, the mean latency
    per token there and the replica counts tried; `plan_reasons` says why fewer miss."""
    t = Table(title=f"{name}: replicas for {rate(result.target_rate)} at mean latency/token "
              f"<= {seconds(result.slo_latency_per_token_s)}", header_style="bold",
              caption="x: misses the SLO (why: below; every probe: stderr and plan.json)")
    t.add_column("policy variant", overflow="fold")
    t.add_column("fewest replicas", justify="right")
    t.add_column("mean latency/token", justify="right")
    t.add_column("replicas tried")
    for v in result.variants:
        tried = ", ".join(f"{s.replicas}{'' if s.probe.ok else NBSP + 'x'}" for s in result.steps
                          if s.variant == v.variant)
        t.add_row(v.variant, "-" if v.replicas is None else str(v.replicas),
                  seconds(v.latency_per_token_s), tried)
    return t


def plan_reasons(result: PlanResult) -> list[str]:
    """Per variant, why the largest failing replica count below the answer misses the SLO."""
    lines = []
    for v in result.variants:
        below = [s for s in result.steps if s.variant == v.variant and not s.probe.ok
                 and (v.replicas is None or s.replicas < v.replicas)]
        worst = max(below, key=lambda s: s.replicas, default=None)
        if worst is not None:
            lines.append(f"{v.variant} misses with {replicas(worst.replicas)}: "
                         f"{worst.probe.reason}")
    return lines


def plan_answer(result: PlanResult, max_replicas: int) -> str:
    ans = result.answer
    if ans is None:
        return (f"no policy meets the SLO at {rate(result.target_rate)} with up to "
                f"{max_replicas} replicas")
    return (f"answer: {replicas(ans.replicas or 0)} with {ans.variant} (mean latency/token "
            f"{seconds(ans.latency_per_token_s)})")


VALIDATE_LABELS = {"throughput (output tokens/s)": "throughput (tokens/s)"}


def validate_table(name: str, result: Validation) -> Table:
    """Live against simulated: times in ms; a live range column only over repeated runs;
    the goal column says the bound on |error| and whether it is met."""
    repeated = any(r.live_min != r.live_max for r in result.rows)
    profile = result.profile.rsplit("/", 1)[-1]
    caption = "error = (simulated - live) / live"
    if repeated:
        caption += "; live: the mean over the runs, range: their min-max"
    t = Table(title=f"{name}: live vs simulated ({profile})", header_style="bold", caption=caption)
    t.add_column("metric", no_wrap=True)
    t.add_column("live", justify="right")
    if repeated:
        t.add_column("range", justify="right", no_wrap=True)
    for col in ("simulated", "error", "goal"):
        t.add_column(col, justify="right")
    for r in result.rows:
        label, scale = r.metric, 1.0
        if label.endswith(" (s)"):
            label, scale = label[:-4] + " (ms)", 1e3
        label = VALIDATE_LABELS.get(label, label)
        whole = r.metric in ("mode switches", "completed requests")

        def cell(x: float | None, scale: float = scale, whole: bool = whole) -> str:
            if x is None:
                return "-"
            return count(x) if whole else number(x * scale)

        row = [label, cell(r.live)]
        if repeated:
            row.append("-" if r.live_min is None else f"{cell(r.live_min)}-{cell(r.live_max)}")
        met = {True: " ok", False: " missed", None: ""}[r.meets_goal]
        goal = "" if r.goal is None else f"±{r.goal * 100:.0f}%{met}"
        row += [cell(r.simulated), percent(r.rel_error, signed=True), goal]
        t.add_row(*row)
    return t
