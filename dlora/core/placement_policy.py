"""Placement in a running cluster: which replica holds which adapter, kept up to date
(PAPER.md section 4, proactive).

`Placer` owns the arrival history (`DecayedRates`), the current target `Placement` and its
re-computation: `initial(view)` places adapters before any history (uniform shares, or the
static round-robin layout), `replan(view, now)` re-runs `place_adapters` on the decayed
popularity (proactive: placement follows popularity). Re-placement is driven by arrivals: the
driver calls `replan` every `placement_interval_s` (a cheap check) and it re-places once
`replan_window_requests` requests arrived since the last placement, so a 30-100 s probe at a few
req/s re-places several times (a fixed 60 s period never fired inside such probes). A
re-placement keeps the current placement unless the greedy's new one raises the objective (the
worst-served adapter's capacity ratio, `placement_ratios`, under today's shares) by
`replan_min_gain` (5%), or the current one has adapters on dead replicas: on Fig. 11a's
stationary workload, 8 replicas, every re-placement otherwise moved about 18 of the 40 slots
(386 loads and 352 drops in 20 re-placements at 48 req/s; 60 and 22 with the margin). Both return
`DropAdapter` / `LoadAdapter` actions that the cluster applies; a replica pays a load in its next
batch (`ReplicaScheduler.prefetch_adapter`). Drops of adapters still in use are refused by the
replica, so residency may lag the target; dispatchers read both (`holders` and the view).
Pure: reads no clock, touches no replica.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import spec
from ..errors import ConfigError
from ..types import Adapter
from ..views import Action, ClusterView, DropAdapter, LoadAdapter
from .context import DispatchContext
from .placement import (
    AdapterDemand,
    Placement,
    PlacementProblem,
    ReplicaCapacity,
    diff_placement,
    place_adapters,
    placement_ratios,
    round_robin_placement,
)
from .popularity import DecayedRates

log = logging.getLogger(__name__)

PLACEMENT_KINDS = ("none", "round_robin", "proactive")


@dataclass(frozen=True, slots=True)
class PlacementParams:
    """Placement settings shared by the placement-aware dispatchers (`policies.dispatch.params`)."""

    placement: str = spec("proactive", choices=PLACEMENT_KINDS,
                          doc="none: load on demand; round_robin: static; proactive: dLoRA greedy")
    placement_interval_s: float = spec(5.0, gt=0, doc="seconds between re-placement checks (proactive)")
    replan_window_requests: int = spec(100, ge=0, doc="re-place after this many arrivals since the last "
                                       "placement (0: at every check)")
    replan_min_gain: float = spec(0.05, ge=0, doc="keep the current placement unless the new one raises the "
                                  "worst-served adapter's capacity ratio by this relative margin (0: always switch)")
    half_life_s: float = spec(120.0, gt=0, doc="half-life of the per-adapter arrival history")
    prior_rate: float = spec(0.01, ge=0, doc="req/s added to every adapter's rate (unseen ones)")
    target_fraction: float = spec(0.9, gt=0, le=1.0, doc="stop replicating at this share of ideal")
    max_copies: int | None = spec(None, ge=1, doc="copies per adapter at most (None: replicas)")
    adapter_memory_fraction: float = spec(0.1, gt=0, lt=1.0,
                                          doc="unified pool: share of memory placement may fill")


class Placer:
    """Target placement of adapters over replicas, and the actions that realise it."""

    def __init__(self, params: PlacementParams, adapters: Mapping[int, Adapter], num_replicas: int,
                 max_adapter_slots: int | None, adapter_memory_bytes: int) -> None:
        self.params = params
        self.kind: str = params.placement
        self.interval_s: float | None = params.placement_interval_s if self.kind == "proactive" else None
        self.adapters = adapters
        self.num_replicas = num_replicas
        self.slots = max_adapter_slots if max_adapter_slots is not None else max(1, len(adapters))
        self.adapter_memory_bytes = adapter_memory_bytes
        self.rates = DecayedRates(params.half_life_s)
        self.placement = Placement(frozenset())
        self._holders: dict[int, tuple[int, ...]] = {}
        self.num_replans = 0
        self.num_kept = 0  # re-placements whose target was not better by `replan_min_gain`
        self.arrivals_since_plan = 0
        self.num_loads = 0
        self.num_drops = 0

    # ---- history ----
    def record(self, adapter_id: int | None, now: float) -> None:
        if adapter_id is not None:
            self.rates.record(adapter_id, now)
            self.arrivals_since_plan += 1

    def holders(self, adapter_id: int) -> tuple[int, ...]:
        """Replicas the target placement puts `adapter_id` on (possibly not yet resident)."""
        return self._holders.get(adapter_id, ())

    # ---- decisions ----
    def initial(self, view: ClusterView) -> list[Action]:
        """Placement before any arrival: round-robin, or dLoRA's greedy on uniform shares."""
        if self.kind == "none" or not self.adapters:
            return []
        if self.kind == "round_robin":
            target = round_robin_placement(len(self.adapters), self.num_replicas)
        else:
            try:
                target = self._solve(view, {k: 1.0 for k in self.adapters})
            except ConfigError as exc:
                log.warning("placement: %s; falling back to round-robin placement", exc)
                target = round_robin_placement(len(self.adapters), self.num_replicas)
        return self._switch(target)

    def replan(self, view: ClusterView, now: float) -> list[Action]:
        """Re-run the greedy on the decayed popularity; actions for what changed."""
        if self.kind != "proactive" or not self.adapters or not self.window_full():
            return []
        self.arrivals_since_plan = 0
        shares = self.rates.shares(now, sorted(self.adapters), prior=self.params.prior_rate)
        self.num_replans += 1
        try:
            problem = self._problem(view, shares)
            target = place_adapters(problem)
        except ConfigError as exc:  # e.g. replicas died and the rest lack slots: keep the old one
            log.warning("placement kept: %s", exc)
            return []
        if self._keep_current(problem, target):
            self.num_kept += 1
            return []
        return self._switch(target)

    def _keep_current(self, problem: PlacementProblem, target: Placement) -> bool:
        """Hysteresis: the current placement stays while it still covers every adapter on live
        replicas and the target's worst ratio (`placement_ratios`, the greedy's objective) is
        not `replan_min_gain` above the current one's under today's shares. Without it every
        re-placement moved about half the slots (the greedy's ties and small share changes
        reshuffle copies), each move an adapter load and a drop."""
        gain = self.params.replan_min_gain
        cur = self.placement
        if gain <= 0 or not cur.pairs or target == cur:
            return target == cur and bool(cur.pairs)
        alive = {r.id for r in problem.replicas}
        if any(r not in alive for r, _ in cur.pairs) or {k for _, k in cur.pairs} != set(self.adapters):
            return False
        now_ratios, new_ratios = placement_ratios(problem, cur), placement_ratios(problem, target)
        if not now_ratios:
            return True
        worst_now, worst_new = min(now_ratios.values()), min(new_ratios.values())
        return worst_new <= worst_now * (1.0 + gain)

    def window_full(self) -> bool:
        """Enough arrivals since the last placement to re-place (`replan_window_requests`)."""
        window = self.params.replan_window_requests
        return window <= 0 or self.arrivals_since_plan >= window

    def _solve(self, view: ClusterView, shares: dict[int, float]) -> Placement:
        return place_adapters(self._problem(view, shares))

    def _problem(self, view: ClusterView, shares: dict[int, float]) -> PlacementProblem:
        alive = [r for r in view.replicas if r.is_alive] or list(view.replicas)
        return PlacementProblem(
            adapters=tuple(AdapterDemand(k, shares[k], a.size_bytes) for k, a in sorted(self.adapters.items())),
            replicas=tuple(ReplicaCapacity(r.id, float(max(1, r.kv_blocks_total)), self.adapter_memory_bytes,
                                           self.slots) for r in alive),
            current=self.placement if self.placement.pairs else None,
            max_copies=self.params.max_copies, target_fraction=self.params.target_fraction,
        )

    def _switch(self, target: Placement) -> list[Action]:
        loads, drops = diff_placement(self.placement, target)
        self.placement = target
        holders: dict[int, list[int]] = {}
        for r, k in sorted(target.pairs):
            holders.setdefault(k, []).append(r)
        self._holders = {k: tuple(v) for k, v in holders.items()}
        self.num_loads += len(loads)
        self.num_drops += len(drops)
        if loads or drops:
            log.debug("placement: %d loads, %d drops", len(loads), len(drops))
        out: list[Action] = [DropAdapter(r, k) for r, k in drops]
        out += [LoadAdapter(r, k) for r, k in loads]
        return out

    def stats(self) -> dict[str, Any]:
        copies = [len(v) for v in self._holders.values()]
        return {"kind": self.kind, "replans": self.num_replans, "replans_kept": self.num_kept, "loads": self.num_loads,
                "drops": self.num_drops, "max_copies": max(copies, default=0),
                "replicated_adapters": sum(c > 1 for c in copies)}


def make_placer(params: PlacementParams, ctx: DispatchContext) -> Placer:
    """A Placer from dispatcher params and the build's `DispatchContext`."""
    budget = ctx.adapter_budget_bytes
    capacity = ctx.memory_capacity_bytes
    if budget is None:
        if capacity is None:
            capacity = ctx.latency.kv_capacity_bytes()
        budget = int(capacity * params.adapter_memory_fraction)
    return Placer(params, ctx.adapters, ctx.num_replicas, ctx.max_adapter_slots, budget)
