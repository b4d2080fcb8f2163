"""Adapter popularity from arrival history (PAPER.md section 4, proactive placement):
`DecayedRates`, per-adapter arrival counts that decay exponentially, turned into the shares
`placement.place_adapters` places by. Pure: no clock (callers pass `now_s`)."""

from __future__ import annotations

import math
from collections.abc import Iterable


class DecayedRates:
    """Per-adapter arrival rates with exponential decay (half-life `half_life_s`).

    The decayed count is `c_k(t) = sum_a exp(-(t - t_a) / tau)` over k's arrivals, with
    `tau = half_life_s / ln 2`; for a steady rate `r` its mean is `r * tau`, so `rate` returns
    `c_k / tau`. Arrivals may be recorded slightly out of order. Holds state but reads no clock.
    """

    def __init__(self, half_life_s: float) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.tau_s = half_life_s / math.log(2.0)
        self._count: dict[int, float] = {}
        self._at_s: dict[int, float] = {}

    def record(self, adapter_id: int, now_s: float, count: float = 1.0) -> None:
        """Record `count` arrivals of `adapter_id` at time `now_s`."""
        if adapter_id not in self._count:
            self._count[adapter_id], self._at_s[adapter_id] = count, now_s
            return
        last_s = self._at_s[adapter_id]
        if now_s >= last_s:
            decay = math.exp(-(now_s - last_s) / self.tau_s)
            self._count[adapter_id] = self._count[adapter_id] * decay + count
            self._at_s[adapter_id] = now_s
        else:  # late arrival: decay it to the stored time instead
            self._count[adapter_id] += count * math.exp(-(last_s - now_s) / self.tau_s)

    def rate(self, adapter_id: int, now_s: float) -> float:
        """Estimated arrivals per second of `adapter_id` at `now_s`."""
        if adapter_id not in self._count:
            return 0.0
        age_s = max(0.0, now_s - self._at_s[adapter_id])
        return self._count[adapter_id] * math.exp(-age_s / self.tau_s) / self.tau_s

    def shares(
        self, now_s: float, adapter_ids: Iterable[int], prior: float = 0.0
    ) -> dict[int, float]:
        """Shares of requests (summing to 1) over `adapter_ids`; `prior` is a rate added to
        every adapter so unseen ones keep some weight. Uniform when nothing was seen."""
        ids = list(adapter_ids)
        rates = {k: self.rate(k, now_s) + prior for k in ids}
        total = sum(rates.values())
        if total <= 0:
            return {k: 1.0 / len(ids) for k in ids} if ids else {}
        return {k: r / total for k, r in rates.items()}
