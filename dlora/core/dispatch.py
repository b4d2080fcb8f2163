"""Dispatchers: which replica gets an arriving request (PAPER.md section 4 for `dlora`).

A dispatcher reads an immutable `ClusterView` and returns a replica id; it never touches
replicas. The dLoRA dispatcher and the placement-aware baselines live in `dispatch_dlora.py`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..registry import Registry
from ..types import ClusterView, ReplicaView, Request


class Dispatcher(Protocol):
    def choose(self, request: Request, view: ClusterView, now: float) -> int: ...


DISPATCHERS: Registry[Dispatcher] = Registry("dispatcher")


def alive(view: ClusterView) -> list[ReplicaView]:
    out = [r for r in view.replicas if r.is_alive]
    if not out:
        raise RuntimeError("no live replica to dispatch to")
    return out


@DISPATCHERS.register("round_robin")
class RoundRobin:
    """Replicas in turn, skipping dead ones."""

    def __init__(self, params: Any, ctx: Any = None) -> None:
        self._next = 0

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        n = len(view.replicas)
        for _ in range(n):
            r = view.replicas[self._next % n]
            self._next += 1
            if r.is_alive:
                return r.id
        return alive(view)[0].id


@DISPATCHERS.register("least_loaded")
class LeastLoaded:
    """The replica with the least estimated queued work (seconds from the profile); ties go to
    fewer requests, then the lower id."""

    def __init__(self, params: Any, ctx: Any = None) -> None:
        pass

    def choose(self, request: Request, view: ClusterView, now: float) -> int:
        return min(alive(view), key=lambda r: (r.queued_work_s, r.num_requests, r.id)).id
