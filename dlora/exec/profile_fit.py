"""The parts of `dlora profile` that are not timing (profiler.py times): the grid of batches a
sweep measures, named shape-only model configs with random weights, the affine fits of merge,
unmerge and transfers, and assembling the `dlora-profile/1` document with its provenance
(DESIGN.md section 5)."""

from __future__ import annotations

import datetime
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import nnls

from dlora.errors import ConfigError
from dlora.exec.loader import LlamaConfig
from dlora.exec.model import FUSED_GROUPS, LlamaModel
from dlora.profile import (
    FORMAT,
    Curve,
    Latency,
    LoraCost,
    Memory,
    ModelShape,
    Profile,
    Provenance,
    Range,
    RankCost,
    Transfer,
)

if TYPE_CHECKING:
    from dlora.exec.profiler import Measured, Sweep

Samples = list[tuple[float, float]]  # (size: rank or bytes, seconds)

# Llama-2 shapes (Hugging Face config.json of meta-llama/Llama-2-*-hf); `demo` is the embedded
# tiny model (dlora.exec.demo) for tests.
NAMED_CONFIGS: dict[str, tuple[str, int, int, int, int, int, int]] = {
    # name: (model id, layers, hidden, heads, kv heads, intermediate, vocab)
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824, 32000),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000),
    "demo": ("dlora-demo-shape", 2, 64, 4, 2, 176, 512),
}


@dataclass(frozen=True, slots=True)
class StepPoint:
    """One batch of a sweep: items (computed tokens, new tokens, adapter id); `merged` is the
    merged adapter (merged mode) or None (unmerged)."""

    group: str  # prefill | decode | mixed | unmerged
    items: tuple[tuple[int, int, int | None], ...]
    merged: int | None
    held_out: bool = False


@dataclass(frozen=True, slots=True)
class ProfileSetup:
    """What the profile says about where it was measured."""

    model_name: str
    device_name: str
    config: LlamaConfig
    dtype: torch.dtype
    adapter_ranks: dict[int, int]  # sweep adapter id -> rank
    memory: Memory
    command: str = ""
    notes: str = ""


def named_config(name: str) -> tuple[str, LlamaConfig]:
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"--model-config {name!r} is unknown (known: {', '.join(NAMED_CONFIGS)})")
    model_id, layers, hidden, heads, kv, inter, vocab = NAMED_CONFIGS[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=4096,
                      eos_token_ids=(2,), bos_token_id=1)
    return model_id, cfg


class RandomWeights(dict):
    """Weights of `cfg`'s shapes made on demand (seeded), so a large model is never held twice
    while `LlamaModel` fuses its projections."""

    def __init__(self, cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        self.shapes: dict[str, tuple[int, ...]] = {
            "embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
            "lm_head.weight": (cfg.vocab_size, cfg.hidden_size), "norm.weight": (cfg.hidden_size,)}
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.shapes[f"{p}{norm}.weight"] = (cfg.hidden_size,)
            for members in FUSED_GROUPS.values():
                for m in members:
                    group = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    self.shapes[f"{p}{group}.{m}.weight"] = cfg.module_shape(m)
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        std = 1.0 if name.startswith("embed") else shape[1] ** -0.5
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (t * std).to(self.dtype)


def random_model(cfg: LlamaConfig, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    return LlamaModel(cfg, RandomWeights(cfg, torch.device(device), dtype, seed), device)


def step_points(sweep: Sweep, ranks: dict[int, int]) -> list[StepPoint]:
    """The sweep's batches, grouped; in each group every third interior point is held out."""
    by_rank: dict[int, list[int]] = {}
    for aid, r in sorted(ranks.items()):
        by_rank.setdefault(r, []).append(aid)
    base = min(ranks)
    mid_ctx = sweep.decode_context[len(sweep.decode_context) // 2]
    mid_tokens = sweep.prefill_tokens[len(sweep.prefill_tokens) // 2]
    groups: dict[str, list[StepPoint]] = {"prefill": [], "decode": [], "mixed": [], "unmerged": []}
    for t in sweep.prefill_tokens:
        for s in sweep.prefill_seqs:
            if t // s >= 2:
                groups["prefill"].append(StepPoint("prefill", ((0, t // s, base),) * s, base))
    for s in sweep.decode_seqs:
        for c in sweep.decode_context:
            groups["decode"].append(StepPoint("decode", ((c, 1, base),) * s, base))
    mixed: dict[tuple[int, int, int], StepPoint] = {}  # prefill chunk beside decodes: contexts and batch sizes vary (the mixed terms)
    for t, s, c in ((mid_tokens, sweep.decode_seqs[-1], sweep.decode_context[0]),
                    (sweep.prefill_tokens[0], sweep.decode_seqs[len(sweep.decode_seqs) // 2],
                     sweep.decode_context[-1]),
                    (sweep.prefill_tokens[-1], sweep.decode_seqs[0], mid_ctx),
                    (mid_tokens, sweep.decode_seqs[-1], sweep.decode_context[-1]),
                    (sweep.prefill_tokens[0], sweep.decode_seqs[-1], mid_ctx),
                    (mid_tokens, sweep.decode_seqs[0], sweep.decode_context[-1])):
        mixed.setdefault((t, s, c), StepPoint("mixed", ((0, t, base), *((c, 1, base),) * s), base))
    groups["mixed"].extend(mixed.values())
    unmerged = groups["unmerged"]
    for n in sweep.num_adapters:
        for _, ids in sorted(by_rank.items()):
            use = ids[:n]
            for s in sorted({len(use), max(len(use), sweep.decode_seqs[-1])}):
                unmerged.append(StepPoint("unmerged", tuple((mid_ctx, 1, use[j % len(use)])
                                                            for j in range(s)), None))
            per = max(2, mid_tokens // len(use))
            unmerged.append(StepPoint("unmerged", tuple((0, per, a) for a in use), None))
    if len(by_rank) > 1:  # mixed ranks in one batch
        mix = [ids[0] for ids in by_rank.values()]
        unmerged.append(StepPoint("unmerged", tuple(
            (mid_ctx, 1, mix[j % len(mix)]) for j in range(max(len(mix), sweep.decode_seqs[-1]))),
            None))
    out = []
    for pts in groups.values():
        for i, p in enumerate(pts):
            hold = i % 3 == 1 and i != len(pts) - 1
            out.append(StepPoint(p.group, p.items, p.merged, hold))
    return out


def _medians(samples: Samples, pick: slice) -> dict[float, float]:
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
        train = {x: m for x, m in _medians(samples, slice(None)).items() if x not in test_x}
        test = {x: m for x, m in _medians(samples, slice(None)).items() if x in test_x}
    else:
        train, test = _medians(samples, slice(0, None, 2)), _medians(samples, slice(1, None, 2))
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


def _errors(out: dict[str, float], key: str, errs: list[float]) -> None:
    if errs:
        out[f"{key}_max_rel"] = float(np.ceil(max(errs) * 1e4) / 1e4)
        out[f"{key}_mean_rel"] = float(np.ceil(statistics.fmean(errs) * 1e4) / 1e4)


def _git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("+dirty" if dirty else "")


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return str(getattr(triton, "__version__", ""))


def model_shape(setup: ProfileSetup, max_context: int) -> ModelShape:
    c = setup.config
    return ModelShape(name=setup.model_name, num_layers=c.num_layers, hidden_size=c.hidden_size,
                      num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                      intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                      dtype_bytes=torch.empty((), dtype=setup.dtype).element_size(),
                      max_context_tokens=max(c.max_positions, max_context))


def build_profile(setup: ProfileSetup, sweep: Sweep, curve: Curve, terms: Any,
                  step_errors: dict[str, float], switches: dict[str, Samples],
                  transfers: dict[str, Samples], measured: list[Measured],
                  copy_bytes_per_s: float) -> Profile:
    """The profile document; `terms` are per_seq, attention decode / prefill, the two mixed
    terms (per decode context token, per decode sequence), then LoraCost's."""
    errors = dict(step_errors)
    rank_costs = {}
    for key in ("merge", "unmerge"):
        base, slope, errs = fit_affine(switches[key])
        rank_costs[key] = RankCost(base, slope)
        _errors(errors, key, errs)
    sw = [abs(rank_costs["unmerge"](int(x) // 1000) + rank_costs["merge"](int(x) % 1000) - s) / s
          for x, s in _medians(switches["switch"], slice(None)).items()]
    _errors(errors, "switch_as_unmerge_plus_merge", sw)
    notes = [setup.notes] if setup.notes else []
    fitted: dict[str, Transfer] = {}
    for key in ("adapter_load", "swap", "kv_transfer"):
        fitted[key], errs, fallback = fit_transfer(transfers[key], copy_bytes_per_s)
        _errors(errors, key, errs)
        if fallback:
            notes.append(f"{key}: no per-byte cost measurable (fixed {fitted[key].fixed_s:.3g} s); "
                         f"bandwidth = the measured memory copy rate")
    shapes = [m.shape for m in measured]
    max_ctx = max(it[0] + it[1] for m in measured for it in m.point.items)
    rng = Range(max_batch_tokens=max(s.total_tokens for s in shapes),
                max_decode_seqs=max(s.decode_seqs for s in shapes),
                max_context_tokens=max(max_ctx, *sweep.transfer_tokens))
    per_seq, att_dec, att_pre, mixed_tok, mixed_seq, *lora = (float(t) for t in terms)
    scheduler = measure_scheduler_s()
    notes.append(f"scheduler_s {scheduler * 1e6:.0f} us: median of dlora's schedule + complete per "
                 "iteration (credit policy, 8 decoding requests, 4 adapters) on this host")
    latency = Latency(linear=curve, per_seq_s=per_seq, scheduler_s=scheduler, attention_decode_s_per_token=att_dec,
                      attention_prefill_s_per_pair=att_pre, attention_mixed_s_per_decode_token=mixed_tok,
                      attention_mixed_s_per_decode_seq=mixed_seq, lora=LoraCost(*lora),
                      merge=rank_costs["merge"], unmerge=rank_costs["unmerge"], switch=None,
                      adapter_load=fitted["adapter_load"], swap=fitted["swap"],
                      kv_transfer=fitted["kv_transfer"])
    prov = Provenance(how="measured", device=setup.device_name, model=setup.model_name,
                      dtype=str(setup.dtype).removeprefix("torch."), tensor_parallel=1,
                      date=datetime.date.today().isoformat(), git_revision=_git_revision(),
                      torch_version=str(torch.__version__), triton_version=_triton_version(),
                      command=setup.command, sources=(), notes=" ".join(notes))
    return Profile(format=FORMAT, provenance=prov, model=model_shape(setup, rng.max_context_tokens),
                   memory=setup.memory, latency=latency, range=rng, fit_error=errors)


def measure_scheduler_s(iterations: int = 400, batch: int = 8, adapters: int = 4) -> float:
    """Median host seconds of dlora's own work per iteration (ReplicaScheduler.schedule +
    complete with the credit policy, `batch` decoding requests over `adapters` adapters). The
    live system pays it every iteration, so the simulator charges it as `scheduler_s`."""
    import time

    from ..testing import make_replica, make_request
    from ..types import StepResult

    rep = make_replica("credit", num_adapters=adapters, max_batch_size=batch, capacity_blocks=1 << 16)
    for i in range(batch):
        rep.add(make_request(i, adapter=i % adapters, prompt=16, output=10 * iterations), 0.0)
    samples = []
    now = 0.0
    for _ in range(iterations):
        t0 = time.perf_counter()
        b = rep.schedule(now)
        assert b is not None
        now += 0.001
        rep.complete(b, StepResult(0.001), now)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def iter_groups(measured: list[Measured]) -> Iterator[tuple[str, list[Measured]]]:
    groups: dict[str, list[Measured]] = {}
    for m in measured:
        groups.setdefault(m.point.group, []).append(m)
    yield from groups.items()
