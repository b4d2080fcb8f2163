"""Dispatchers: which replica gets an arriving request (PAPER.md section 4 for `dlora`).

A dispatcher reads an immutable `ClusterView` and returns a replica id; it never touches
replicas. The dLoRA dispatcher and the placement-aware baselines live in `dispatch_dlora.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..config import spec
from ..registry import Registry
from ..types import Request
from ..views import ClusterView, ReplicaView
from .context import DispatchContext

if TYPE_CHECKING:
    from .placement_policy import Placer


class Dispatcher(Protocol):
    @property
    def placer(self) -> Placer | None:
        """The adapter placement a placement-aware dispatcher keeps (`Cluster.place` runs it)."""
        ...

    def choose(self, request: Request, view: ClusterView, now: float) -> int: ...


DISPATCHERS: Registry[Dispatcher] = Registry("dispatcher")


def alive(view: ClusterView) -> list[ReplicaView]:
    """The views of the live replicas (builds every one: use `alive_ids` where ids suffice)."""
    return [view.replicas[i] for i in alive_ids(view)]


def alive_ids(view: ClusterView) -> tuple[int, ...]:
    out = view.alive()
    if not out:
        raise RuntimeError("no live replica to dispatch to")
    return out


@dataclass(frozen=True, slots=True)
class RoundRobinParams:
    placement: str = spec("none", choices=("none", "round_robin"),
                          doc="round_robin: static placement, requests go to their adapter's holders")


@DISPATCHERS.register("round_robin", RoundRobinParams)
class RoundRobin:
    """Replicas in turn, skipping dead ones. With `placement: round_robin` (the paper's RR),
    adapter k lives on replica k % n and its requests take its holders in turn."""

    def __init__(self, params: Any, ctx: DispatchContext | None = None) -> None:
        self._next = 0
        self._next_of: dict[int, int] = {}
        self.placer: Placer | None = None
        if params.placement != "none" and ctx is not None:
            from .placement_policy import PlacementParams, make_placer

            self.placer = make_placer(PlacementParams(placement=params.placement), ctx)

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        a = request.adapter_id
        if self.placer is not None and a is not None:
            live = set(view.alive())
            holders = [h for h in self.placer.holders(a) if h in live]
            if holders:
                i = self._next_of.get(a, 0)
                self._next_of[a] = i + 1
                return holders[i % len(holders)]
        n = len(view.replicas)
        live = set(alive_ids(view))
        for _ in range(n):
            i = self._next % n
            self._next += 1
            if i in live:
                return i
        return min(live)


@DISPATCHERS.register("least_loaded")
class LeastLoaded:
    """The replica with the least estimated backlog (seconds to drain its requests at full-batch
    throughput, from the profile); ties go to fewer requests, then the lower id."""

    placer: Placer | None = None

    def __init__(self, params: Any, ctx: DispatchContext | None = None) -> None:
        pass

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        return min(alive(view), key=lambda r: (r.backlog_s, r.num_requests, r.id)).id
