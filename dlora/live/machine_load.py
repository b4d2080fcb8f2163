"""How busy the machine was with other work during a live run: the CPU time other processes
took on this process's CPUs, and the time the hypervisor stole, read from /proc/stat (Linux)
before and after the run. A live run's timings are only worth comparing when both are small;
`dlora validate` and `dlora run` warn otherwise. Elsewhere (no /proc/stat) nothing is measured
and nothing is claimed."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
BUSY_SHARE_WARN = 0.25  # other processes' CPU time / (wall x CPUs) above this: warn
STEAL_SHARE_WARN = 0.10


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall_s: float
    own_cpu_s: float  # this process, every thread
    busy_s: float  # every process on our CPUs (user, nice, system, irq, softirq)
    steal_s: float
    cpus: int


def _our_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def sample(stat: Path = PROC_STAT) -> CpuSample | None:
    """The counters now; None where /proc/stat cannot be read."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ours = _our_cpus()
    busy = steal = 0.0
    cpus = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in ours:
            continue
        v = [float(x) for x in fields[:8]] + [0.0] * (8 - len(fields[:8]))
        busy += v[0] + v[1] + v[2] + v[5] + v[6]
        steal += v[7]
        cpus += 1
    if cpus == 0:
        return None
    use = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSample(time.monotonic(), use.ru_utime + use.ru_stime, busy / tick, steal / tick, cpus)


def other_load(before: CpuSample | None, after: CpuSample | None) -> dict[str, Any]:
    """Shares of the CPUs' time over the interval: `other_cpu_share` (other processes),
    `steal_share`; empty when either sample is missing or the interval is too short to say."""
    if before is None or after is None:
        return {}
    wall = after.wall_s - before.wall_s
    if wall < 0.5:
        return {}
    capacity = wall * after.cpus
    others = (after.busy_s - before.busy_s) - (after.own_cpu_s - before.own_cpu_s)
    return {"cpus": after.cpus, "other_cpu_share": max(0.0, others / capacity),
            "steal_share": max(0.0, (after.steal_s - before.steal_s) / capacity),
            "own_cpu_share": (after.own_cpu_s - before.own_cpu_s) / capacity}


def busy_warning(load: dict[str, Any], what: str = "the live timings",
                 advice: str = "rerun on an idle machine (stop other jobs first)") -> str | None:
    """A warning to print when other work took a real share of the machine, else None."""
    others = load.get("other_cpu_share", 0.0)
    steal = load.get("steal_share", 0.0)
    if others <= BUSY_SHARE_WARN and steal <= STEAL_SHARE_WARN:
        return None
    parts = [f"other processes used {others * 100:.0f}% of its {load['cpus']} CPUs"]
    if steal > STEAL_SHARE_WARN:
        parts.append(f"the hypervisor stole {steal * 100:.0f}%")
    return (f"warning: the machine was busy during the live run ({' and '.join(parts)}), so "
            f"{what} include waiting for a CPU and should not be trusted; {advice}")
