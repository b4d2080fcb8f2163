"""A stand-in for the Azure Functions 2019 trace (MAF1) when the trace itself is not available:
adapter popularity built from the trace's published statistics, then dLoRA's stride mapping
(PAPER.md section 7). Documented as a stand-in everywhere it is used; the real loaders
(`popularity.kind: function_trace`) stay for users who have the trace.

Published statistics (Shahrad et al., "Serverless in the Wild", USENIX ATC'20, section 3 and
Fig. 5): invocations per function span about eight orders of magnitude, and the most popular
18.6% of functions account for 99.6% of all invocations. A log-normal distribution of daily
invocations per function matches that concentration when its sigma solves
`1 - Phi(Phi^-1(1 - 0.186) - sigma) = 0.996`, i.e. sigma = 3.55 (mean of the log irrelevant: only
shares matter). `NUM_FUNCTIONS` log-normal draws, rounded to whole invocations (functions with
none are dropped, as an empty row would be), sorted by invocations and mapped to adapters in
blocks of `stride` consecutive functions round-robin, give each adapter's share; a larger stride
gives more skew (stride 1 with 16 adapters: top adapter 19% of requests; stride 64: 77%).
What is not modelled: the trace's diurnal cycles and bursts inside a bin (every adapter gets a
Gamma stream of CV 1 at its share, as the paper does within a 60-minute bin).
"""

from __future__ import annotations

import numpy as np

from ..workload.generate import function_shares

SIGMA = 3.55  # log-normal sigma matching "18.6% of functions take 99.6% of invocations"
NUM_FUNCTIONS = 10_000
SEED = 2019


def maf1_standin_shares(num_adapters: int, stride: int, seed: int = SEED) -> list[float]:
    """Each adapter's share of requests under the stand-in (module docstring)."""
    rng = np.random.default_rng(seed)
    counts = np.round(np.exp(rng.normal(0.0, SIGMA, NUM_FUNCTIONS))).astype(np.int64)
    shares = function_shares(counts[:, None], num_adapters, stride, sort=True)[:, 0]
    return [float(x) for x in shares]


def top_fraction_share(fraction: float, seed: int = SEED) -> float:
    """Share of invocations of the most popular `fraction` of the stand-in's functions (0.996
    at 0.186 is the published figure it is built to match)."""
    rng = np.random.default_rng(seed)
    counts = np.sort(np.exp(rng.normal(0.0, SIGMA, NUM_FUNCTIONS)))[::-1]
    return float(counts[: int(round(fraction * NUM_FUNCTIONS))].sum() / counts.sum())
