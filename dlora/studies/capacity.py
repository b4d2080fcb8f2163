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
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..build import load_latency
from ..config import set_path, to_plain
from ..errors import ConfigError
from ..report import build_report
from ..scenario import Scenario, scenario_from_dict, sweep_points
from ..sim.driver import simulate
from ..types import BatchMode, Request

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


@dataclass(frozen=True, slots=True)
class CapacityResult:
    rate: float  # the largest passing rate found (0.0 when even `low` fails)
    path: tuple[Probe, ...]  # every probe, in the order run
    slo_latency_per_token_s: float
    bracket: tuple[float, float]  # (last passing, first failing) rate; inf when none failed

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "slo_latency_per_token_s": self.slo_latency_per_token_s,
                "bracket": list(self.bracket),
                "path": [[p.rate, p.latency_per_token_s, p.ok] for p in self.path]}


def _raw(scenario: Scenario) -> dict[str, Any]:
    data = to_plain(scenario)
    data.pop("base_dir", None)
    data.pop("sweep", None)
    return data


def scenario_at_rate(scenario: Scenario, rate: float, rate_key: str = RATE_KEY,
                     requests_per_rate: float | None = 100.0,
                     horizon_factor: float | None = HORIZON_FACTOR) -> Scenario:
    """The scenario with `rate_key` set to `rate` (and `workload.num_requests` to
    `ceil(requests_per_rate * rate)` when given). With `horizon_factor` and no horizon of its
    own, a probe stops at that multiple of its nominal arrival span (`requests_per_rate`
    seconds) and what is unfinished counts as a violation. By default probes run until every
    request completes (bursty traces can arrive long after the nominal span) and the `slo_lost`
    check ends hopeless ones early."""
    data = copy.deepcopy(_raw(scenario))
    set_path(data, rate_key.split("."), float(rate), f"capacity rate_key {rate_key}")
    if requests_per_rate is not None:
        set_path(data, ["workload", "num_requests"], max(1, math.ceil(requests_per_rate * rate)),
                 "capacity requests_per_rate")
    run = {**data.get("run", {}), "progress": False}
    if horizon_factor is not None and run.get("horizon_s") is None and requests_per_rate is not None:
        run["horizon_s"] = horizon_factor * max(1.0, requests_per_rate)
    data["run"] = run
    return scenario_from_dict(data, Path(scenario.base_dir))


def probe(scenario: Scenario, rate: float, rate_key: str = RATE_KEY,
          requests_per_rate: float | None = 100.0) -> Probe:
    """Simulate at one rate and judge it against the scenario's SLO."""
    sc = scenario_at_rate(scenario, rate, rate_key, requests_per_rate)
    slo = scenario.slo.latency_per_token_s
    latency = load_latency(sc)
    token_s = latency.decode_step_s(sc.cluster.max_batch_size, 512, BatchMode.UNMERGED,
                                    num_adapters=min(4, sc.cluster.max_batch_size))
    summary = build_report(simulate(sc, stop_check=(slo_lost(slo, token_s=token_s), STOP_CHECK_S))).summary
    mean = summary["latency_per_token_s"]["mean"]
    ok = (summary["unfinished"] == 0 and summary["completed"] > 0 and mean is not None
          and mean <= scenario.slo.latency_per_token_s)
    log.info("capacity probe rate %.4g: mean latency/token %s -> %s", rate, mean, "ok" if ok else "over")
    return Probe(float(rate), mean, ok, summary["completed"], summary["unfinished"])


def slo_lost(slo_latency_per_token_s: float, drain_factor: float | None = DRAIN_FACTOR,
             token_s: float = 0.0) -> Callable[[float, list[Request]], bool]:
    """A stop check for probes: True once the probe has failed whatever happens next.

    - Sustainability: with `drain_factor`, a rate the cluster cannot keep up with fails when
      work is still unfinished at `drain_factor` x the last arrival time plus the longest
      request's own decode time (its output tokens x `token_s`, the profile's step time of a
      full batch). (Without it, a short
      probe at any rate drains its fixed backlog eventually, and with the paper's loose
      0.5 s/token SLO a cluster overloaded several-fold would still "meet" it.)
    - The SLO: each unfinished request will have latency >= now - arrival over its (known, to
      the judge) output length; finished ones are final; requests not yet arrived count 0, so
      this is a true lower bound of the final mean latency per token."""
    deadline: list[float] = []

    def check(now: float, requests: list[Request]) -> bool:
        if drain_factor is not None and requests:
            if not deadline:
                deadline.append(drain_factor * max(r.arrival_s for r in requests)
                                + token_s * max(r.output_tokens for r in requests))
            if now > deadline[0] and not all(r.is_done for r in requests):
                return True
        total = 0.0
        for r in requests:
            if r.finish_s is not None:
                total += (r.finish_s - r.arrival_s) / max(1, r.generated_tokens)
            elif r.arrival_s < now:
                total += (now - r.arrival_s) / max(1, r.output_tokens)
        return total / max(1, len(requests)) > slo_latency_per_token_s

    return check


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
) -> CapacityResult:
    """Largest rate in req/s (within `tol`) whose mean latency per token meets the SLO.

    `low` < `high` bracket the search; when `high` passes, it doubles up to `max_expansions`
    times. Bisection stops when the bracket is narrower than `tol` or `rel_tol` x the rate. `probe_fn(rate)` replaces the simulation (tests); `on_probe` sees every probe."""
    if not 0 < low < high:
        raise ConfigError(f"capacity search needs 0 < low < high, got low={low}, high={high}")
    if not tol > 0:
        raise ConfigError(f"capacity search needs tol > 0 (req/s), got {tol}")
    run = probe_fn or (lambda rate: probe(scenario, rate, rate_key, requests_per_rate))
    path: list[Probe] = []

    def check(rate: float) -> bool:
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
                        rel_tol: float = 0.0) -> dict[str, CapacityResult]:
    """`max_rate_under_slo` for every policy variant of the scenario's sweep (the sweep's
    parameter is ignored: the rate is what is searched); the scenario itself without one."""
    out = {}
    for variant, sc in variant_scenarios(scenario).items():
        report = (lambda p, v=variant: on_probe(v, p)) if on_probe else None
        out[variant] = max_rate_under_slo(sc, low, high, tol, rate_key, requests_per_rate,
                                          on_probe=report, rel_tol=rel_tol)
    return out


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
