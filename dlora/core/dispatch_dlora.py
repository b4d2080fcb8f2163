"""dLoRA's proactive dispatch and the placement-aware baselines (PAPER.md sections 4 and 6).

- `dlora` / `proactive`: placement from popularity (`placement_policy.Placer`, re-run as
  arrivals accumulate) and, per request, the cheapest candidate in seconds from the profile.
  A replica's cost is the queued work ahead of the request (the wait for a batch slot, with full
  single-adapter batches discounted because they can run merged) plus the adapter's load time
  when it is not resident; ties go to the smaller backlog. The two differ in their candidates
  (the paper's three load balancers, Fig. 11a, are three pairings of dispatch and migration):
  - `dlora`: the replicas holding the adapter (by placement or resident) only; imbalance is
    the co-migration's to fix (pair with migration `dlora`). dLoRA in Fig. 11a.
  - `proactive`: holders plus the cheapest replica that could load the adapter (dispatch-time
    adapter substitution: a non-holder loads it, evicting an idle adapter). The paper's
    Proactive pairs it with migration `none`; with migration `dlora` it is the combination.
  - RR (the paper's round-robin): `dlora` with `placement: round_robin` (adapter k on replica
    k % n, cheapest holder) and migration `none`.
  Only `load_candidates` differs (`dlora` false, `proactive` true); either may be set.
- `consolidate`: Punica-style packing: the busiest replica that still has batch room.
- `affinity`: a replica that holds the adapter (Ray Serve model multiplexing, Kubernetes
  inference gateways), the least loaded of those; the least loaded overall when none does.

Dispatchers read only the `ClusterView`. Load is `ReplicaView.backlog_s` (seconds to drain at
full-batch throughput), not `queued_work_s`: the latter prices decode at the replica's current
batch size, so under light load it barely grows with the number of requests and ranks replicas
poorly (fig2b: least_loaded queues 10x longer than round-robin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import spec
from ..types import BatchMode, Request
from ..views import ClusterView, ReplicaView
from .context import DispatchContext
from .dispatch import DISPATCHERS, alive, alive_ids
from .placement_policy import PlacementParams, Placer, make_placer

TYPICAL_CONTEXT_TOKENS = 512


class DispatchCost:
    """Seconds a replica would need before a new request of an adapter could run there."""

    def __init__(self, ctx: DispatchContext, merged_discount: bool = True) -> None:
        self.latency = ctx.latency
        self.adapters = ctx.adapters
        self.batch = ctx.max_batch_size
        self.merged_ratio = 1.0
        if merged_discount:
            lat = self.latency
            b = min(self.batch, lat.range.max_decode_seqs)
            ctx_tokens = min(TYPICAL_CONTEXT_TOKENS, lat.range.max_context_tokens)
            merged = lat.decode_step_s(b, ctx_tokens, BatchMode.MERGED)
            unmerged = lat.decode_step_s(b, ctx_tokens, BatchMode.UNMERGED, num_adapters=min(b, 4))
            self.merged_ratio = min(1.0, merged / unmerged) if unmerged > 0 else 1.0
        # replica -> (its requests_per_adapter, the requests in full single-adapter batches);
        # a replica keeps the same tuple until a request arrives or leaves (`queued_s`)
        self._full: dict[int, tuple[tuple[tuple[int | None, int], ...], int]] = {}

    def queued_s(self, r: ReplicaView) -> float:
        """Seconds a new request waits for a batch slot: none while the replica runs fewer than
        `max_batch_size` requests; else until `n + 1 - B` requests finish, one finishing every
        `backlog_s / n` seconds at full-batch throughput, the part in full single-adapter
        batches at the merged speed."""
        n = r.num_requests
        if n < self.batch:
            return 0.0
        wait = (n + 1 - self.batch) * r.backlog_s / n
        if self.merged_ratio >= 1.0:
            return wait
        rpa = r.requests_per_adapter
        memo = self._full.get(r.id)
        if memo is not None and memo[0] is rpa:
            full = memo[1]
        else:
            b = self.batch
            full = sum((c // b) * b for a, c in rpa if a is not None)
            self._full[r.id] = (rpa, full)
        return wait * (1.0 - (full / n) * (1.0 - self.merged_ratio))

    def load_s(self, adapter: int | None, r: ReplicaView) -> float:
        if adapter is None or adapter in r.resident_adapters:
            return 0.0
        return self.latency.load_s(self.adapters[adapter].size_bytes)

    def best(self, adapter: int | None, views: list[ReplicaView]) -> ReplicaView:
        """The cheapest of `views` for a request of `adapter` by the key (cost = `queued_s` +
        `load_s`, then backlog: smaller batches step faster, then requests, then id), the first
        of equal keys, in one pass (a dispatch ranks every holder of the adapter)."""
        b = self.batch
        load = None  # the adapter's load seconds, once needed
        best: ReplicaView | None = None
        best_key: tuple[float, float, int, int] | None = None
        for r in views:
            n, resident, backlog, rid = r.rank_facts()
            cost = 0.0 if n < b else self.queued_s(r)  # (`queued_s` is 0.0 with batch room)
            if adapter is not None and adapter not in resident:
                if load is None:
                    load = self.load_s(adapter, r)
                cost = cost + load
            key = (cost, backlog, n, rid)
            if best_key is None or key < best_key:
                best, best_key = r, key
        if best is None:
            raise ValueError("no replica to choose from")
        return best


def can_load(r: ReplicaView) -> bool:
    """A free adapter slot, or a resident adapter nobody on the replica is waiting for."""
    if r.adapter_slots_free > 0:
        return True
    busy = {a for a, n in r.requests_per_adapter if n > 0}
    return any(a not in busy and a != r.merged_adapter for a in r.resident_adapters)


@dataclass(frozen=True, slots=True)
class DloraDispatchParams(PlacementParams):
    load_candidates: bool = spec(False, doc="also consider the cheapest replica that could load it "
                                 "(adapter substitution; `proactive` sets it)")
    merged_discount: bool = spec(True, doc="count full single-adapter batches at merged speed")


@dataclass(frozen=True, slots=True)
class ProactiveDispatchParams(PlacementParams):
    load_candidates: bool = spec(True, doc="also consider the cheapest replica that could load it "
                                 "(adapter substitution)")
    merged_discount: bool = spec(True, doc="count full single-adapter batches at merged speed")


@DISPATCHERS.register("dlora", DloraDispatchParams)
@DISPATCHERS.register("proactive", ProactiveDispatchParams)
class DloraDispatcher:
    """Cheapest candidate by estimated seconds (module docstring), with proactive placement."""

    def __init__(self, params: DloraDispatchParams | ProactiveDispatchParams, ctx: DispatchContext) -> None:
        self.params = params
        self.placer = make_placer(params, ctx)
        self.costs = DispatchCost(ctx, params.merged_discount)
        self.num_loads_chosen = 0
        self.num_substitutions = 0  # dispatched to a replica neither placed nor holding the adapter

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        """Algorithm: record the arrival; candidates = holders of the adapter (placement or
        resident) plus, optionally, the cheapest other replica that can load it; return the
        candidate with the lowest wait + load seconds (ties: backlog, requests, id)."""
        a = request.adapter_id
        self.placer.record(a, now)
        live = alive_ids(view)
        if a is None:
            return self.costs.best(None, view.views(live)).id
        placed = set(self.placer.holders(a))
        held = placed | set(view.resident_on(a))
        # only the views a decision reads are built (a cluster view may be lazy)
        holders = view.views([i for i in live if i in held])
        cands = list(holders)
        if self.params.load_candidates or not holders:
            others = view.views([i for i in live if i not in held])
            loadable = [r for r in others if can_load(r)] or (others if not holders else [])
            if loadable:
                cands.append(self.costs.best(a, loadable))
        best = self.costs.best(a, cands)
        if a not in best.resident_adapters:
            self.num_loads_chosen += 1
            if best.id not in placed:
                self.num_substitutions += 1
        return best.id

    def stats(self) -> dict[str, Any]:
        return {"placement": self.placer.stats(), "dispatched_to_load": self.num_loads_chosen,
                "substitutions": self.num_substitutions, "merged_ratio": self.costs.merged_ratio}


@dataclass(frozen=True, slots=True)
class ConsolidateParams:
    max_requests: int | None = spec(None, ge=1, doc="room per replica (default: max_batch_size)")
    max_kv_usage: float = spec(0.9, gt=0, le=1.0, doc="a replica above this KV usage has no room")


@DISPATCHERS.register("consolidate", ConsolidateParams)
class Consolidate:
    """Punica-style: the busiest replica that still has room; least loaded when none has."""

    placer: Placer | None = None

    def __init__(self, params: ConsolidateParams, ctx: DispatchContext) -> None:
        self.room = params.max_requests or ctx.max_batch_size
        self.max_kv = params.max_kv_usage

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        reps = alive(view)
        roomy = [r for r in reps if r.num_requests < self.room and r.kv_usage < self.max_kv]
        if roomy:
            return min(roomy, key=lambda r: (-r.num_requests, r.id)).id
        return min(reps, key=lambda r: (r.backlog_s, r.num_requests, r.id)).id


@DISPATCHERS.register("affinity")
class Affinity:
    """A replica where the adapter is resident (least loaded of those), else the least loaded."""

    placer: Placer | None = None

    def __init__(self, params: Any, ctx: DispatchContext | None = None) -> None:
        pass

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        a = request.adapter_id
        live = alive_ids(view)
        held = set(view.resident_on(a)) if a is not None else set()
        ids = [i for i in live if i in held] or list(live)
        return min((view.replicas[i] for i in ids), key=lambda r: (r.backlog_s, r.num_requests, r.id)).id
