"""Capacity planning: the fewest replicas, and the policy, that keep the SLO at a target load.

For each policy variant of the scenario (its sweep variants, or the scenario itself), probe the
target rate with the SLO-throughput search's probe (`capacity.probe`: every request completes and
the mean latency per output token is within the SLO) at growing replica counts: double until a
count passes, then bisect between the last failing and the first passing count. This assumes
that adding replicas never hurts, which holds for the dispatchers here up to simulation noise;
the search path is printed so a user can see every probe. The answer is the variant with the
fewest replicas (ties: the lower mean latency per token, then the variant listed first)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import set_path, to_plain
from ..errors import ConfigError
from ..labels import rate, replicas
from ..scenario import Scenario, scenario_from_dict
from .capacity import RATE_KEY, Probe, probe, probe_status, variant_scenarios

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlanStep:
    variant: str
    replicas: int
    probe: Probe


@dataclass(frozen=True, slots=True)
class VariantPlan:
    variant: str
    replicas: int | None  # fewest passing replicas; None when even max_replicas fails
    latency_per_token_s: float | None  # mean at that count


@dataclass(frozen=True, slots=True)
class PlanResult:
    target_rate: float
    slo_latency_per_token_s: float
    variants: tuple[VariantPlan, ...]
    steps: tuple[PlanStep, ...]

    @property
    def answer(self) -> VariantPlan | None:
        ok = [v for v in self.variants if v.replicas is not None]
        if not ok:
            return None
        order = {v.variant: i for i, v in enumerate(self.variants)}
        return min(ok, key=lambda v: (v.replicas, v.latency_per_token_s or 0.0, order[v.variant]))

    def as_dict(self) -> dict[str, Any]:
        ans = self.answer
        return {
            "target_rate": self.target_rate,
            "slo_latency_per_token_s": self.slo_latency_per_token_s,
            "answer": None if ans is None else {"variant": ans.variant, "replicas": ans.replicas,
                                                "latency_per_token_s": ans.latency_per_token_s},
            "variants": [{"variant": v.variant, "replicas": v.replicas,
                          "latency_per_token_s": v.latency_per_token_s} for v in self.variants],
            "path": [{"variant": s.variant, "replicas": s.replicas, "ok": s.probe.ok,
                      "latency_per_token_s": s.probe.latency_per_token_s,
                      "unfinished": s.probe.unfinished, "reason": s.probe.reason} for s in self.steps],
        }


def step_line(step: PlanStep, target_rate: float) -> str:
    """One probe of the plan for stderr: "quickstart: 2 replicas at 5 req/s -> misses the SLO:
    120 of 500 requests unfinished at the drain check (...)"."""
    p = step.probe
    return (f"{step.variant}: {replicas(step.replicas)} at {rate(target_rate)} -> "
            f"{'meets' if p.ok else 'misses'} the SLO: {p.reason}")


def with_replicas(scenario: Scenario, replicas: int) -> Scenario:
    data = to_plain(scenario)
    data.pop("base_dir", None)
    data.pop("sweep", None)
    set_path(data, ["cluster", "replicas"], replicas, "plan")
    return scenario_from_dict(data, Path(scenario.base_dir))


def plan_replicas(
    scenario: Scenario,
    target_rate: float,
    min_replicas: int = 1,
    max_replicas: int = 256,
    rate_key: str = RATE_KEY,
    requests_per_rate: float | None = 100.0,
    on_step: Callable[[PlanStep], None] | None = None,
    probe_fn: Callable[[Scenario, float], Probe] | None = None,
    status: Callable[[str], None] | None = None,
) -> PlanResult:
    """The fewest replicas per policy variant that meet the SLO at `target_rate` req/s;
    `on_step` sees every probe, `status` hears each one before it runs."""
    if not target_rate > 0:
        raise ConfigError(f"plan: --target-rate must be > 0 req/s, got {target_rate}")
    if not 1 <= min_replicas <= max_replicas:
        raise ConfigError(f"plan: need 1 <= min replicas <= max replicas, got {min_replicas} and {max_replicas}")
    run_probe = probe_fn or (lambda sc, rate: probe(sc, rate, rate_key, requests_per_rate))
    steps: list[PlanStep] = []
    plans = []
    for variant, base in variant_scenarios(scenario).items():
        results: dict[int, Probe] = {}

        def check(n: int, variant: str = variant, base: Scenario = base,
                  results: dict[int, Probe] = results) -> bool:
            if n not in results:
                if status is not None:
                    status(f"{variant or scenario.name}: {replicas(n)}, "
                           f"{probe_status(base, target_rate, rate_key, requests_per_rate)}")
                p = run_probe(with_replicas(base, n), target_rate)
                results[n] = p
                step = PlanStep(variant or scenario.name, n, p)
                steps.append(step)
                if on_step is not None:
                    on_step(step)
            return results[n].ok

        bad, good = min_replicas - 1, None
        n = min_replicas
        while n <= max_replicas:
            if check(n):
                good = n
                break
            bad = n
            n = min(n * 2, max_replicas) if n < max_replicas else max_replicas + 1
        if good is not None:
            while good - bad > 1:
                mid = (good + bad) // 2
                if check(mid):
                    good = mid
                else:
                    bad = mid
        mean = results[good].latency_per_token_s if good is not None else None
        plans.append(VariantPlan(variant or scenario.name, good, mean))
    return PlanResult(target_rate, scenario.slo.latency_per_token_s, tuple(plans), tuple(steps))
