"""Throughput under an SLO (PAPER.md section 7): the largest arrival rate whose average latency
per output token stays within `slo.latency_per_token_s`, found by bisection over rates.

A probe simulates the scenario at one rate (issuing `requests_per_rate * rate` requests, the
paper's 100 x rate, when set) and passes when every request completed by about twice the last
arrival time (the cluster keeps up with the rate) and the mean latency per token is within the SLO. The search expands
the bracket upward while `high` still passes, then bisects until the bracket is narrower than
`tol` (req/s). Deterministic: the same scenario gives the same path. Capacity planning reuses
`max_rate_under_slo`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..build import load_latency
from ..config import set_path, to_plain
from ..errors import ConfigError
from ..labels import count, rate, seconds
from ..report import build_report
from ..scenario import Scenario, scenario_from_dict, sweep_points
from ..sim.driver import simulate
from ..types import BatchMode, Request
from ..workload.build import trace_requests
from ..workload.config import WorkloadConfig

log = logging.getLogger(__name__)
RATE_KEY = "workload.arrival.rate_per_s"
STOP_CHECK_S = 5.0  # simulated seconds between early-stop checks of a probe
DRAIN_FACTOR = 2.0  # a probe's requests must finish by this multiple of its last arrival
HORIZON_FACTOR: float | None = None  # probes run to completion; `slo_lost` stops lost ones early


@dataclass(frozen=True, slots=True)
class Probe:
    rate: float
    latency_per_token_s: float | None  # mean over completed requests
    ok: bool
    completed: int
    unfinished: int
    requests: int = 0  # issued by the probe
    stopped: str = ""  # why the probe was cut short: "drain" or "slo" (see `SloLost`); "" ran out
    stopped_at_s: float | None = None  # simulated time of that stop
    slo_latency_per_token_s: float | None = None  # the limit it was judged against
    lower_bound_s: float | None = None  # stopped "slo": the final mean is at least this

    @property
    def reason(self) -> str:
        """The verdict in words: which metric, its value against the limit, with units."""
        return verdict(self)


@dataclass(frozen=True, slots=True)
class CapacityResult:
    rate: float  # the largest passing rate found (0.0 when even `low` fails)
    path: tuple[Probe, ...]  # every probe, in the order run
    slo_latency_per_token_s: float
    bracket: tuple[float, float]  # (last passing, first failing) rate; inf when none failed

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "slo_latency_per_token_s": self.slo_latency_per_token_s,
                "bracket": list(self.bracket),
                "path": [[p.rate, p.latency_per_token_s, p.ok] for p in self.path],
                "probes": [{"rate": p.rate, "latency_per_token_s": p.latency_per_token_s, "ok": p.ok,
                            "requests": p.requests, "completed": p.completed, "unfinished": p.unfinished,
                            "stopped": p.stopped or None, "stopped_at_s": p.stopped_at_s, "reason": p.reason}
                           for p in self.path]}


def _raw(scenario: Scenario) -> dict[str, Any]:
    data = to_plain(scenario)
    data.pop("base_dir", None)
    data.pop("sweep", None)
    return data


def scenario_at_rate(scenario: Scenario, rate: float, rate_key: str = RATE_KEY,
                     requests_per_rate: float | None = 100.0,
                     horizon_factor: float | None = HORIZON_FACTOR) -> Scenario:
    """The scenario with `rate_key` set to `rate` (and `workload.num_requests` to
    `ceil(requests_per_rate * rate)` when given, at most what a trace arrival holds). With `horizon_factor` and no horizon of its
    own, a probe stops at that multiple of its nominal arrival span (`requests_per_rate`
    seconds) and what is unfinished counts as a violation. By default probes run until every
    request completes (bursty traces can arrive long after the nominal span) and the `slo_lost`
    check ends hopeless ones early."""
    data = copy.deepcopy(_raw(scenario))
    set_path(data, rate_key.split("."), float(rate), f"capacity rate_key {rate_key}")
    if requests_per_rate is not None:
        n = max(1, math.ceil(requests_per_rate * rate))
        held = _trace_requests(scenario.workload, str(scenario.base_dir))
        if held is not None and n > held:  # a trace holds no more: the probe is shorter
            log.info("capacity: %d requests at %.4g req/s, but the trace holds %d: probing with those", n, rate, held)
            n = held
        set_path(data, ["workload", "num_requests"], n, "capacity requests_per_rate")
    run = {**data.get("run", {}), "progress": False}
    if horizon_factor is not None and run.get("horizon_s") is None and requests_per_rate is not None:
        run["horizon_s"] = horizon_factor * max(1.0, requests_per_rate)
    data["run"] = run
    return scenario_from_dict(data, Path(scenario.base_dir))


@functools.lru_cache(maxsize=16)
def _trace_requests(workload: WorkloadConfig, base_dir: str) -> int | None:
    """`trace_requests`, read once per workload (a search probes the same trace many times)."""
    return trace_requests(workload, base_dir)


def probe(scenario: Scenario, rate: float, rate_key: str = RATE_KEY,
          requests_per_rate: float | None = 100.0) -> Probe:
    """Simulate at one rate and judge it against the scenario's SLO."""
    sc = scenario_at_rate(scenario, rate, rate_key, requests_per_rate)
    slo = scenario.slo.latency_per_token_s
    latency = load_latency(sc)
    token_s = latency.decode_step_s(sc.cluster.max_batch_size, 512, BatchMode.UNMERGED,
                                    num_adapters=min(4, sc.cluster.max_batch_size))
    lost = slo_lost(slo, token_s=token_s)
    summary = build_report(simulate(sc, stop_check=(lost, STOP_CHECK_S))).summary
    mean = summary["latency_per_token_s"]["mean"]
    ok = (summary["unfinished"] == 0 and summary["completed"] > 0 and mean is not None
          and mean <= scenario.slo.latency_per_token_s)
    result = Probe(float(rate), mean, ok, summary["completed"], summary["unfinished"], summary["requests"],
                   lost.stopped, lost.stopped_at_s, slo, lost.bound_s if lost.stopped == "slo" else None)
    log.info("capacity probe %s", probe_line("", result))
    return result


class SloLost:
    """A stop check for probes: True once the probe has failed whatever happens next; `stopped`
    and `stopped_at_s` then say why and when.

    - "drain" (sustainability): with `drain_factor`, a rate the cluster cannot keep up with
      fails when work is still unfinished at `drain_factor` x the last arrival time plus the
      longest request's own decode time (its output tokens x `token_s`, the profile's step
      time of a full batch). (Without it, a short probe at any rate drains its fixed backlog
      eventually, and with the paper's loose 0.5 s/token SLO a cluster overloaded several-fold
      would still "meet" it.)
    - "slo": each unfinished request will have latency >= now - arrival over its (known, to
      the judge) output length; finished ones are final; requests not yet arrived count 0, so
      `bound_s` is a true lower bound of the final mean latency per token, and the probe is
      lost once it exceeds the SLO."""

    def __init__(self, slo_latency_per_token_s: float, drain_factor: float | None = DRAIN_FACTOR,
                 token_s: float = 0.0) -> None:
        self.slo_s = slo_latency_per_token_s
        self.drain_factor = drain_factor
        self.token_s = token_s
        self.deadline_s: float | None = None
        self.stopped = ""
        self.stopped_at_s: float | None = None
        self.bound_s = 0.0

    def __call__(self, now: float, requests: list[Request]) -> bool:
        if self.drain_factor is not None and requests:
            if self.deadline_s is None:
                self.deadline_s = (self.drain_factor * max(r.arrival_s for r in requests)
                                   + self.token_s * max(r.output_tokens for r in requests))
            if now > self.deadline_s and not all(r.is_done for r in requests):
                return self._stop("drain", now)
        total = 0.0
        for r in requests:
            if r.finish_s is not None:
                total += (r.finish_s - r.arrival_s) / max(1, r.generated_tokens)
            elif r.arrival_s < now:
                total += (now - r.arrival_s) / max(1, r.output_tokens)
        self.bound_s = total / max(1, len(requests))
        return self.bound_s > self.slo_s and self._stop("slo", now)

    def _stop(self, why: str, now: float) -> bool:
        self.stopped, self.stopped_at_s = why, now
        return True


def slo_lost(slo_latency_per_token_s: float, drain_factor: float | None = DRAIN_FACTOR,
             token_s: float = 0.0) -> SloLost:
    """The probes' stop check (`SloLost`)."""
    return SloLost(slo_latency_per_token_s, drain_factor, token_s)


def verdict(p: Probe) -> str:
    """Why a probe passed or failed, in words with units: "mean latency/token 13.5 ms <= 500 ms
    (SLO), all 100 requests finished", "1,234 of 6,400 requests unfinished at the drain check
    (205 s simulated): the cluster does not keep up with 64 req/s", or "mean latency/token at
    least 512 ms > 500 ms (SLO) whatever happens next: at 130 s simulated, 4,257 of 6,400
    requests were unfinished (433 ms over the finished)"."""
    slo = p.slo_latency_per_token_s
    limit = "the SLO" if slo is None else f"{seconds(slo)} (SLO)"
    mean = seconds(p.latency_per_token_s)
    total = count(p.requests or p.completed + p.unfinished)
    if p.ok:
        return f"mean latency/token {mean} <= {limit}, all {total} requests finished"
    if p.stopped == "drain":
        at = "" if p.stopped_at_s is None else f" ({seconds(p.stopped_at_s)} simulated)"
        return (f"{count(p.unfinished)} of {total} requests unfinished at the drain check{at}: "
                f"the cluster does not keep up with {rate(p.rate)}")
    if p.stopped == "slo":
        least = "" if p.lower_bound_s is None else f" at least {seconds(p.lower_bound_s)}"
        at = "" if p.stopped_at_s is None else f"at {seconds(p.stopped_at_s)} simulated, "
        return (f"mean latency/token{least} > {limit} whatever happens next: {at}{count(p.unfinished)} "
                f"of {total} requests were unfinished ({mean} over the finished)")
    if p.completed == 0:
        return f"no request of {total} completed"
    if p.unfinished:
        return f"{count(p.unfinished)} of {total} requests unfinished when the probe ended"
    return f"mean latency/token {mean} > {limit}"


def probe_line(name: str, p: Probe) -> str:
    """One probe for stderr: "quickstart: 64 req/s (6,400 requests) -> over the SLO: ..." """
    head = f"{name}: " if name else ""
    n = f" ({count(p.requests)} requests)" if p.requests else ""
    return f"{head}{rate(p.rate)}{n} -> {'ok' if p.ok else 'over the SLO'}: {p.reason}"


def max_rate_under_slo(
    scenario: Scenario,
    low: float,
    high: float,
    tol: float = 0.5,
    rate_key: str = RATE_KEY,
    requests_per_rate: float | None = 100.0,
    max_expansions: int = 6,
    probe_fn: Callable[[float], Probe] | None = None,
    on_probe: Callable[[Probe], None] | None = None,
    rel_tol: float = 0.0,
    status: Callable[[str], None] | None = None,
) -> CapacityResult:
    """Largest rate in req/s (within `tol`) whose mean latency per token meets the SLO.

    `low` < `high` bracket the search; when `high` passes, it doubles up to `max_expansions`
    times. Bisection stops when the bracket is narrower than `tol` or `rel_tol` x the rate.
    `probe_fn(rate)` replaces the simulation (tests); `on_probe` sees every probe and
    `status` hears what is about to run ("probing 64 req/s (6,400 requests)")."""
    if not 0 < low < high:
        raise ConfigError(f"capacity search needs 0 < low < high, got low={low}, high={high}")
    if not tol > 0:
        raise ConfigError(f"capacity search needs tol > 0 (req/s), got {tol}")
    run = probe_fn or (lambda rate: probe(scenario, rate, rate_key, requests_per_rate))
    path: list[Probe] = []

    def check(rate: float) -> bool:
        if status is not None:
            status(probe_status(scenario, rate, rate_key, requests_per_rate))
        p = run(rate)
        path.append(p)
        if on_probe is not None:
            on_probe(p)
        return p.ok

    slo = scenario.slo.latency_per_token_s
    if not check(low):
        return CapacityResult(0.0, tuple(path), slo, (0.0, low))
    good, bad = low, math.inf
    rate = high
    for _ in range(max_expansions + 1):
        if check(rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
            break
    if math.isinf(bad):
        log.warning("capacity: still within the SLO at %.4g req/s; raise --high", good)
        return CapacityResult(good, tuple(path), slo, (good, bad))
    while bad - good > max(tol, rel_tol * good):
        mid = (good + bad) / 2
        if check(mid):
            good = mid
        else:
            bad = mid
    return CapacityResult(good, tuple(path), slo, (good, bad))


def capacity_by_variant(scenario: Scenario, low: float, high: float, tol: float = 0.5,
                        rate_key: str = RATE_KEY, requests_per_rate: float | None = 100.0,
                        on_probe: Callable[[str, Probe], None] | None = None,
                        rel_tol: float = 0.0,
                        status: Callable[[str], None] | None = None,
                        jobs: int = 1) -> dict[str, CapacityResult]:
    """`max_rate_under_slo` for every policy variant of the scenario's sweep (the sweep's
    parameter is ignored: the rate is what is searched); the scenario itself without one.
    `status` hears each probe before it runs, prefixed by the variant's name. `jobs` > 1
    searches that many variants at once in worker processes (each search is deterministic,
    so the results are the same); `on_probe` then hears each variant's probes, in order, when
    its search ends, and `status` when each one ends. (Workers are spawned: a script that
    calls this with `jobs` > 1 needs the usual `if __name__ == "__main__":` guard.)"""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    variants = variant_scenarios(scenario)
    out: dict[str, CapacityResult] = {}
    if jobs > 1 and len(variants) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        args = (low, high, tol, rate_key, requests_per_rate, rel_tol)
        # spawn: a fresh interpreter per worker (no threads of the caller's are forked)
        with ProcessPoolExecutor(min(jobs, len(variants)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {v: pool.submit(_search, sc, args) for v, sc in variants.items()}
            for variant, fut in futures.items():  # (in the variants' order: results do not depend on it)
                out[variant] = fut.result()
                if status is not None:
                    status(f"{variant or scenario.name}: done ({rate(out[variant].rate)})")
                if on_probe is not None:
                    for p in out[variant].path:
                        on_probe(variant, p)
        return out
    for variant, sc in variants.items():
        report = (lambda p, v=variant: on_probe(v, p)) if on_probe else None
        say = None if status is None else (lambda m, v=variant or scenario.name: status(f"{v}: {m}"))
        out[variant] = max_rate_under_slo(sc, low, high, tol, rate_key, requests_per_rate,
                                          on_probe=report, rel_tol=rel_tol, status=say)
    return out


def _search(sc: Scenario, args: tuple[float, float, float, str, float | None, float]) -> CapacityResult:
    """One variant's search in a worker process (`capacity_by_variant`, `jobs` > 1)."""
    low, high, tol, rate_key, requests_per_rate, rel_tol = args
    return max_rate_under_slo(sc, low, high, tol, rate_key, requests_per_rate, rel_tol=rel_tol)


def probe_status(scenario: Scenario, rate_per_s: float, rate_key: str = RATE_KEY,
                 requests_per_rate: float | None = 100.0) -> str:
    """What a probe is about to do, for a status line: "probing 64 req/s (6,400 requests)"."""
    n = (max(1, math.ceil(requests_per_rate * rate_per_s)) if requests_per_rate is not None
         else scenario.workload.num_requests)
    return f"probing {rate(rate_per_s)}" + ("" if n is None else f" ({count(n)} requests)")


def variant_scenarios(scenario: Scenario) -> dict[str, Scenario]:
    """One scenario per policy variant of the sweep (its parameter ignored); the scenario itself,
    named "", when it has no variants."""
    if scenario.sweep is None or not scenario.sweep.variants:
        return {"": scenario}
    data = to_plain(scenario)
    data.pop("base_dir", None)
    sweep = data["sweep"]
    sweep["parameter"], sweep["values"] = None, []
    base = Path(scenario.base_dir)
    return {point.variant: scenario_from_dict(point.data, base)
            for point in sweep_points(scenario_from_dict(data, base), data)}
