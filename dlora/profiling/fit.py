"""Every fit behind a profile, each on relative error (DESIGN.md section 5).

Measured profiles (`dlora profile`, dlora.profiling.measure): the step terms of
`LatencyModel.step_s` fitted together by non-negative least squares (each row divided by its
measured time), the linear curve as hat functions on fixed knots, errors on the held-out points
(`fit_steps`); merge, unmerge and transfers as fixed + slope x size (`fit_affine`,
`fit_transfer`).

Imported profiles (dlora.profiling.llmservingsim): attention per layer as non-negative least
squares over its measured grid (with the mixed-iteration terms), lm_head + sampler as fixed +
per sequence, the linear curve as the non-decreasing (isotonic) fit of the dense sums on knots
at measured token counts; and the LoRA / merge roofline at rates derived from the dense rows
(the method of scripts/derive_profile.py). No torch."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import nnls

from ..profile import LORA_MODULES, Curve, LoraCost, ModelShape, Profile, RankCost, Transfer
from ..types import BatchMode, BatchShape
from .sweep import Measured

KNOTS = (1, 2, 4, 8, 16, 32, 48, *range(64, 8193, 64))  # GEMM tiles make the dense sum jagged
KNOT_RATIO = 4  # measured curve knots at least this factor apart in tokens
Samples = list[tuple[float, float]]  # (size: rank or bytes, seconds)
POOR_FIT_MEAN_REL = 0.25  # held-out step error (mean) above which a measured profile is not to be trusted


def attention_features(att: np.ndarray) -> np.ndarray:
    c, kp, n, kv = att[:, 0], att[:, 1], att[:, 2], att[:, 3]
    both = (c > 0) & (n > 0)
    return np.column_stack([np.ones(len(c)), c + n, n + (c > 0), n * kv, c * (kp + (c + 1) / 2),
                            both * n * kv, both * n])


def fit_attention(att: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Per-layer seconds = features . coef (non-negative, relative error); errors by row kind."""
    a, y = attention_features(att), att[:, 4]
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls((a / scale) / y[:, None], np.ones(len(y)), maxiter=100 * a.shape[1])
    coef = np.array([float(f"{x:.6g}") for x in coef / scale])
    err = np.abs(a @ coef - y) / y
    c, n = att[:, 0], att[:, 2]
    out = _errs("attention", err)
    for kind, mask in (("decode", c == 0), ("prefill", n == 0), ("mixed", (c > 0) & (n > 0))):
        if mask.any():
            out[f"attention_{kind}_mean_rel"] = round_up(float(err[mask].mean()))
    no_mix, _ = nnls((a[:, :5] / scale[:5]) / y[:, None], np.ones(len(y)), maxiter=500)
    err0 = np.abs(a[:, :5] @ (no_mix / scale[:5]) - y) / y  # the same fit without the mixed terms
    out["attention_without_mixed_terms_mean_rel"] = round_up(float(err0.mean()))
    if (c == 0).any():
        out["attention_without_mixed_terms_decode_mean_rel"] = round_up(float(err0[c == 0].mean()))
    out["attention_points"] = float(len(y))
    return coef, out


def fit_skew(skew: dict[str, np.ndarray] | None, errors: dict[str, float]) -> tuple[float, float]:
    """The share of the gap to the longest context that a batch of unequal contexts pays:
    least squares of (t_skew - t_mean) on (t_max - t_mean), per regime (`pure` decode, `mixed`);
    0 without skew.csv. Records each fit's mean absolute error relative to t_skew."""
    out = []
    for regime in ("pure", "mixed"):
        rows = skew.get(regime) if skew else None
        if rows is None or len(rows) == 0:
            out.append(0.0)
            continue
        mean, top, measured = rows[:, 0], rows[:, 1], rows[:, 2]
        gap = top - mean
        alpha = float(np.clip((measured - mean) @ gap / max(float(gap @ gap), 1e-30), 0.0, 1.0))
        alpha = float(f"{alpha:.4g}")
        err = np.abs(mean + alpha * gap - measured) / measured
        errors[f"attention_skew_{regime}_mean_rel"] = round_up(float(err.mean()))
        errors[f"attention_skew_{regime}_mean_rel_without"] = round_up(float((np.abs(mean - measured) / measured).mean()))
        out.append(alpha)
    return out[0], out[1]


def fit_per_sequence(per_seq: dict[str, dict[int, float]]) -> tuple[float, float, dict[str, float]]:
    """lm_head + sampler = fixed + slope x sequences (non-negative, relative error)."""
    seqs = sorted(set(per_seq["lm_head"]) & set(per_seq["sampler"]))
    x = np.array(seqs, dtype=float)
    y = np.array([per_seq["lm_head"][s] + per_seq["sampler"][s] for s in seqs])
    a = np.column_stack([np.ones(len(x)), x / x.max()])
    coef, _ = nnls(a / y[:, None], np.ones(len(y)))
    fixed, slope = float(f"{coef[0]:.6g}"), float(f"{coef[1] / x.max():.6g}")
    return fixed, slope, _errs("per_sequence", np.abs(fixed + slope * x - y) / y)


def fit_curve(target: dict[int, float], extra_fixed: float, extra_per_token: float
              ) -> tuple[Curve, dict[str, float]]:
    """Knots at measured token counts, values the non-decreasing fit of `target` there."""
    xs = sorted(target)
    ys = _isotonic([target[x] + extra_fixed + extra_per_token * x for x in xs])
    knots = [x for x in KNOTS if x in target and xs[0] <= x <= xs[-1]] or [xs[0]]
    if knots[0] != xs[0]:
        knots.insert(0, xs[0])
    if knots[-1] != xs[-1]:
        knots.append(xs[-1])
    curve = Curve(tokens=tuple(knots), seconds=tuple(float(f"{ys[xs.index(k)]:.6g}") for k in knots))
    err = np.array([abs(curve(x) - extra_fixed - extra_per_token * x - target[x]) / target[x] for x in xs])
    out = _errs("linear", err)
    out["linear_points"] = float(len(xs))
    return curve, out


def _isotonic(ys: list[float]) -> list[float]:
    """Pool-adjacent-violators: the closest non-decreasing sequence (least squares)."""
    blocks: list[list[float]] = []  # [sum, count]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, k = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += k
    return [s / k for s, k in blocks for _ in range(int(k))]


def _errs(key: str, err: np.ndarray) -> dict[str, float]:
    return {f"{key}_mean_rel": round_up(float(err.mean())), f"{key}_p90_rel": round_up(float(np.quantile(err, 0.9))),
            f"{key}_max_rel": round_up(float(err.max()))}


def round_up(x: float) -> float:
    """Round up to 4 decimals, so a stated error never understates the measured one."""
    return float(np.ceil(x * 1e4) / 1e4)


def record_errors(out: dict[str, float], key: str, errs: list[float]) -> None:
    """`out[key_max_rel]` and `out[key_mean_rel]` of relative errors `errs` (when there are any)."""
    if errs:
        out[f"{key}_max_rel"] = round_up(max(errs))
        out[f"{key}_mean_rel"] = round_up(statistics.fmean(errs))


@dataclass(frozen=True, slots=True)
class Rates:
    """Achievable rates of one GPU, derived from the dense rows (see `derive_rates`)."""

    hbm_bytes_per_s: float
    gemm_flops_per_s: float
    launch_s: float


def derive_rates(dense: dict[str, dict[int, float]], shape: ModelShape) -> Rates:
    """From one rank's per-op seconds: HBM = gate_up_proj's weight bytes / its 1-token time;
    GEMM = its FLOPs / time at the most tokens; launch = the median 1-token elementwise op."""
    tp, gu = shape.tensor_parallel, dense["gate_up_proj"]
    w = shape.hidden_size * 2 * shape.intermediate_size // tp
    n = max(gu)
    small = [dense[op][min(dense[op])] for op in ("layernorm", "rotary_emb", "act_fn") if op in dense]
    return Rates(w * shape.dtype_bytes / gu[min(gu)], 2 * n * w / gu[n],
                 statistics.median(small) if small else 3e-6)


def lora_and_merge(s: ModelShape, r: Rates) -> tuple[LoraCost, RankCost]:
    """Segment-grouped (SGMV/BGMV-style) side path and in-place merge on one GPU, a roofline at
    `r` (the method of scripts/derive_profile.py): column-parallel modules shard d_out, row ones d_in."""
    tp, layers = s.tensor_parallel, s.num_layers
    local = []
    for m in LORA_MODULES:
        d_in, d_out = s.module_dims(m)
        local.append((d_in // tp, d_out) if m in ("o", "down") else (d_in, d_out // tp))
    g = lambda x: float(f"{x:.4g}")  # noqa: E731
    lora = LoraCost(
        fixed_s=g(2 * len(LORA_MODULES) * layers * r.launch_s),
        per_adapter_rank_s=g(layers * sum(i + o for i, o in local) * s.dtype_bytes / r.hbm_bytes_per_s),
        per_token_s=g(layers * sum(i + 2 * o for i, o in local) * s.dtype_bytes / r.hbm_bytes_per_s),
        per_token_rank_s=g(layers * sum(2 * (i + o) for i, o in local) / r.gemm_flops_per_s))
    weight_bytes = layers * sum(i * o for i, o in local) * s.dtype_bytes
    merge = RankCost(base_s=g(2 * weight_bytes / r.hbm_bytes_per_s + len(LORA_MODULES) * layers * r.launch_s),
                     per_rank_s=g(layers * sum(2 * i * o for i, o in local) / r.gemm_flops_per_s))
    return lora, merge


# ---- measured profiles ----

def step_knots(tokens: list[int]) -> tuple[int, ...]:
    """Measured token counts at least KNOT_RATIO apart (the smallest and largest always)."""
    xs = sorted(set(tokens))
    knots = [xs[0]]
    for x in xs[1:]:
        if x >= KNOT_RATIO * knots[-1]:
            knots.append(x)
    if knots[-1] != xs[-1]:
        knots[-1 if len(knots) > 1 else len(knots):] = [xs[-1]]
    return tuple(knots)


def design_row(shape: BatchShape, knots: tuple[int, ...]) -> list[float]:
    """The step terms of `LatencyModel.step_s` as a row linear in the fitted parameters:
    curve knot values (hat weights), per_seq, attention decode / prefill, the two mixed-iteration
    terms (decode context tokens and decode sequences, only with prefill tokens beside them),
    5 LoRA terms."""
    hats = [0.0] * len(knots)
    n = shape.total_tokens
    if len(knots) == 1:
        hats[0] = max(n, 1) / max(knots[0], 1)
    else:
        i = min(max(int(np.searchsorted(knots, n)), 1), len(knots) - 1)
        w = (n - knots[i - 1]) / (knots[i] - knots[i - 1])
        hats[i - 1], hats[i] = 1.0 - w, w
    lora = [0.0] * 5
    if shape.mode == BatchMode.UNMERGED and shape.adapter_ranks:
        lora = [1.0, len(shape.adapter_ranks), sum(shape.adapter_ranks), shape.lora_tokens,
                shape.lora_token_rank]
    mixed = [float(shape.decode_context_tokens), float(shape.decode_seqs)] if (
        shape.prefill_tokens and shape.decode_seqs) else [0.0, 0.0]
    return [*hats, shape.decode_seqs + shape.prefill_seqs, shape.decode_context_tokens,
            shape.prefill_attention_pairs, *mixed, *lora]


def fit_steps(measured: list[Measured]) -> tuple[Curve, np.ndarray, dict[str, float]]:
    """NNLS on the training points (relative error); errors on the held-out ones by group."""
    train = [m for m in measured if not m.held_out]
    knots = step_knots([m.shape.total_tokens for m in train])
    a = np.array([design_row(m.shape, knots) for m in train])
    y = np.array([m.seconds for m in train])
    k = len(knots)
    rise = np.tril(np.ones((k, k)))  # knot values = cumulative sums of non-negative rises
    a[:, :k] = a[:, :k] @ rise
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls((a / scale) / y[:, None], np.ones(len(y)), maxiter=50 * a.shape[1])
    coef = coef / scale
    coef[:k] = rise @ coef[:k]  # a non-decreasing curve
    coef = np.array([float(f"{c:.6g}") for c in coef])
    curve = Curve(tokens=knots, seconds=tuple(float(c) for c in coef[: len(knots)]))
    errors: dict[str, list[float]] = {}
    for m in measured:
        if m.held_out:
            pred = float(np.dot(design_row(m.shape, knots), coef))
            errors.setdefault(m.point.group, []).append(abs(pred - m.seconds) / m.seconds)
    out: dict[str, float] = {}
    for group, errs in sorted(errors.items()):
        out[f"step_{group}_max_rel"] = round_up(max(errs))
        out[f"step_{group}_mean_rel"] = round_up(statistics.fmean(errs))
    every = [e for errs in errors.values() for e in errs]
    if every:
        out["step_max_rel"], out["step_mean_rel"] = round_up(max(every)), round_up(statistics.fmean(every))
    out["step_fit_points"], out["step_heldout_points"] = float(len(train)), float(len(every))
    return curve, coef[len(knots):], out


def medians(samples: Samples, pick: slice) -> dict[float, float]:
    grouped: dict[float, list[float]] = {}
    for x, s in samples:
        grouped.setdefault(x, []).append(s)
    return {x: statistics.median(v[pick]) for x, v in sorted(grouped.items()) if v[pick]}


def fit_affine(samples: Samples) -> tuple[float, float, list[float]]:
    """seconds = base + slope * x, both >= 0, by NNLS on relative error. Held out: interior
    sizes (every other) when there are at least three, else the odd-numbered repeats.
    Returns (base, slope, relative errors on the held-out medians)."""
    xs = sorted({x for x, _ in samples})
    if len(xs) >= 3:
        test_x = set(xs[1:-1:2])
        train = {x: m for x, m in medians(samples, slice(None)).items() if x not in test_x}
        test = {x: m for x, m in medians(samples, slice(None)).items() if x in test_x}
    else:
        train, test = medians(samples, slice(0, None, 2)), medians(samples, slice(1, None, 2))
    a = np.array([[1.0, x] for x in train]) / np.array(list(train.values()))[:, None]
    top = max(xs) or 1.0
    coef, _ = nnls(a * [1.0, 1.0 / top], np.ones(len(train)))
    base, slope = float(f"{coef[0]:.6g}"), float(f"{coef[1] / top:.6g}")
    return base, slope, [abs(base + slope * x - s) / s for x, s in test.items()]


def fit_transfer(samples: Samples, copy_bytes_per_s: float, overlap: bool = False
                 ) -> tuple[Transfer, list[float], bool]:
    """A Transfer (fixed + bytes / bandwidth); when the per-byte cost is not resolvable (a CPU
    "load" that copies nothing) the bandwidth is the measured memory copy rate (flag True)."""
    base, slope, errs = fit_affine(samples)
    if slope <= 0:
        return Transfer(float(f"{copy_bytes_per_s:.4g}"), base, overlap), errs, True
    return Transfer(float(f"{1.0 / slope:.4g}"), base, overlap), errs, False


def poor_fit_warning(fit_error: Mapping[str, float]) -> str | None:
    """One line when a measured profile's held-out step error (mean) is over POOR_FIT_MEAN_REL:
    the numbers, the worst group, and what to do; None when the fit is good (or not measured)."""
    mean = fit_error.get("step_mean_rel")
    if mean is None or mean <= POOR_FIT_MEAN_REL:
        return None
    groups = {k.removeprefix("step_").removesuffix("_mean_rel"): v for k, v in fit_error.items()
              if k.startswith("step_") and k.endswith("_mean_rel") and k != "step_mean_rel"}
    worst = max(groups, key=lambda g: groups[g]) if groups else None
    where = f", worst {worst} {groups[worst]:.0%} mean" if worst is not None else ""
    return (f"held-out step fit error {mean:.0%} mean / {fit_error.get('step_max_rel', mean):.0%} max{where} "
            f"(over {POOR_FIT_MEAN_REL:.0%}): its step times are not to be trusted; measure again on an "
            "idle machine, with more --repeats or without --quick")


def note_poor_fit(profile: Profile) -> Profile:
    """`profile` with `poor_fit_warning` added to its provenance notes (unchanged when the fit is
    good or the warning is there already)."""
    warning = poor_fit_warning(profile.fit_error)
    prov = profile.provenance
    if warning is None or warning in prov.notes:
        return profile
    notes = f"{prov.notes} Fit warning: {warning}.".strip()
    return replace(profile, provenance=replace(prov, notes=notes))
