"""The live side: the core's scheduler objects driven on wall time by worker threads, with
real executors (DESIGN.md sections 3 and 7).

`run(scenario)` replays a workload (`dlora run`); `create_live_cluster(scenario)` gives a
running cluster a server submits to (`LiveCluster.submit / abort / stop`, token callbacks)."""

from __future__ import annotations

from .clock import Clock, MonotonicClock, VirtualClock
from .driver import LiveResult, LiveSystem, build_live_report, create_live_cluster, run, run_live
from .engine import LiveCluster

__all__ = [
    "Clock",
    "LiveCluster",
    "LiveResult",
    "LiveSystem",
    "MonotonicClock",
    "VirtualClock",
    "build_live_report",
    "create_live_cluster",
    "run",
    "run_live",
]
