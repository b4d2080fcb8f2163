"""The fits behind an imported profile (dlora.profiling.llmservingsim), each on relative error:
attention per layer as non-negative least squares over its measured grid (with the
mixed-iteration terms), lm_head + sampler as fixed + per sequence, the linear curve as the
non-decreasing (isotonic) fit of the dense sums on knots at measured token counts; and the LoRA /
merge roofline at rates derived from the dense rows (the method of scripts/derive_profile.py)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from ..profile import LORA_MODULES, Curve, LoraCost, ModelShape, RankCost

KNOTS = (1, 2, 4, 8, 16, 32, 48, *range(64, 8193, 64))  # GEMM tiles make the dense sum jagged


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
