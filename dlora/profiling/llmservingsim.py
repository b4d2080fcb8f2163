"""`dlora profile import llmservingsim DIR`: a dlora profile from LLMServingSim's layer-wise vLLM
profiles (github.com/casys-kaist/LLMServingSim, MIT; DESIGN.md section 5).

DIR is one `profiler/perf/<hardware>/<model>/<variant>/` folder: `meta.yaml` and `tp<N>/` with
`dense.csv` (layer,tokens,time_us), `attention.csv` (prefill_chunk,kv_prefill,n_decode,kv_decode,
time_us) and `per_sequence.csv` (layer,sequences,time_us: lm_head, sampler). LLMServingSim's
profiler runs vLLM on a one-layer copy of the model whose per-GPU dimensions are those of one
tensor-parallel rank (meta.yaml `hf_overrides`: Llama-3.1-8B's record intermediate 7168, 16 heads,
vocab 64128, half the real model, from its tp2 run), so every dense and attention time is one layer
of the full model on one rank (tp2's GEMMs take about half tp1's: gate_up_proj at 2048 tokens
579 vs 1153 us), and an iteration is

    embedding + final_layernorm + num_layers x (2 x layernorm + the other dense ops + attention)
    + lm_head + sampler (per sampled sequence) + 2 x num_layers + 1 all-reduces (TP > 1)

(the op order of LLMServingSim's model catalogs; the all-reduces are not in dense.csv, and are
priced from the GPU's measured NCCL all-reduce in `known.py`). The fits, each into a LatencyModel term:
`linear` = that dense sum per measured token count (made non-decreasing), plus the all-reduces,
plus the attention fit's fixed and per-token parts and lm_head's fixed part; attention = a
non-negative least-squares fit on relative error over every attention.csv row (decode context,
prefill pairs, per-sequence, and the mixed-iteration extras); `per_seq_s` = the per-sequence
slopes of lm_head + sampler and of attention. LoRA, merge and transfers are not in the data: they
come from a stated roofline on rates derived from the dense rows. No torch here.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import ProfileError
from ..latency import LatencyModel
from ..profile import (
    FORMAT,
    Latency,
    Memory,
    ModelShape,
    Profile,
    Provenance,
    Range,
    Transfer,
)
from ..revision import git_revision
from ..types import BatchMode, BatchShape
from .fit import (
    Rates,
    derive_rates,
    fit_attention,
    fit_curve,
    fit_per_sequence,
    fit_skew,
    lora_and_merge,
    round_up,
)
from .known import Gpu, config_shape, known_gpu, known_shape
from .llmservingsim_source import Source, read_source

ONCE_OPS = ("embedding", "final_layernorm")  # once per iteration; the rest once per layer
TWICE_OPS = ("layernorm",)  # input and post-attention norms
VARIANTS = {"bf16": ("bfloat16", 2), "fp16": ("float16", 2), "fp32": ("float32", 4)}
ACTIVATION_OVERHEAD_GIB = 1.0  # per GPU: CUDA context, cuBLAS workspace, NCCL buffers (assumed)
HOST_SWAP_GIB = 64  # per replica (assumption, as in the derived profiles)
UNKNOWN_HOST_BYTES_PER_S = 25e9  # an unknown GPU's host link: PCIe 4.0 x16 pinned (assumed)
NIC_BYTES_PER_S = 0.92 * 12.5e9  # KV between replicas: one 100 Gb/s RDMA link at ~92% (assumed)


def model_shape(src: Source, config: Path | None) -> ModelShape:
    variant = str(src.meta.get("variant", "bf16"))
    if variant not in VARIANTS:
        raise ProfileError(f"llmservingsim: meta.yaml variant {variant!r} is not supported "
                           f"(known: {', '.join(VARIANTS)})")
    nbytes = VARIANTS[variant][1]
    model = src.meta["model"]
    shape = (config_shape(config, model, nbytes, src.tp) if config is not None
             else known_shape(model, nbytes, src.tp))
    over = (src.meta.get("engine_effective") or {}).get("hf_overrides") or {}
    degrees = src.meta.get("tp_degrees") or [src.tp]
    ran = max(int(t) for t in degrees)  # the overrides on record are those of the last run
    checks = {"intermediate_size": shape.intermediate_size, "num_attention_heads": shape.num_heads,
              "vocab_size": shape.vocab_size}
    for key, full in checks.items():
        if key in over and int(over[key]) * ran != full:
            raise ProfileError(f"llmservingsim: meta.yaml hf_overrides {key} {over[key]} x tp {ran} "
                               f"!= {full} of {model}'s shape; pass --config PATH to its config.json")
    return shape


def dense_iteration_s(src: Source, shape: ModelShape, gpu: Gpu | None) -> dict[int, float]:
    """Tokens -> seconds of every dense op of one iteration of the whole model (+ all-reduces)."""
    tokens = sorted(set.intersection(*(set(v) for v in src.dense.values())))
    out = {}
    for n in tokens:
        t = 0.0
        for op, times in src.dense.items():
            k = 1 if op in ONCE_OPS else shape.num_layers * (2 if op in TWICE_OPS else 1)
            t += k * times[n]
        out[n] = t + allreduces_s(src.tp, shape, gpu, n)
    return out


def _with_link(gpu: Gpu | None, hardware: str, gbps: float | None, latency_us: float | None) -> Gpu:
    """The GPU entry with the all-reduce cost given on the command line."""
    for name, v in (("--link-gbps", gbps), ("--link-latency-us", latency_us)):
        if v is not None and not (np.isfinite(v) and (v > 0 if name == "--link-gbps" else v >= 0)):
            raise ProfileError(f"{name} {v}: must be a {'positive' if name == '--link-gbps' else 'non-negative'} number")
    if gpu is None and gbps is None:
        raise ProfileError(f"--link-latency-us: hardware {hardware!r} is not in the known-GPU table; give --link-gbps too")
    base = gpu or Gpu(name=hardware, memory_gib=0.0, allreduce_fixed_s=0.0, allreduce_bytes_per_s=1.0,
                      host_bytes_per_s=UNKNOWN_HOST_BYTES_PER_S, source="")
    return dataclasses.replace(
        base,
        allreduce_bytes_per_s=gbps * 1e9 if gbps is not None else base.allreduce_bytes_per_s,
        allreduce_fixed_s=latency_us * 1e-6 if latency_us is not None else base.allreduce_fixed_s,
        source=(f"{base.source}; " if base.source else "")
        + f"all-reduce from the command line (--link-gbps {gbps}, --link-latency-us {latency_us})")


def allreduces_s(tp: int, shape: ModelShape, gpu: Gpu | None, tokens: int) -> float:
    """2 per layer (after o_proj and down_proj) + 1 (vocab-parallel embedding) under TP."""
    if tp == 1:
        return 0.0
    if gpu is None:
        raise ProfileError("llmservingsim: tensor parallel needs the GPU's all-reduce cost, and this "
                           "hardware is not in dlora.profiling.known.KNOWN_GPUS; import --tp 1 or add it there")
    size = tokens * shape.hidden_size * shape.dtype_bytes
    return (2 * shape.num_layers + 1) * (gpu.allreduce_fixed_s + size / gpu.allreduce_bytes_per_s)


GIB = 1 << 30
CHECK_ROWS = ((0, 0, 1, 1024), (0, 0, 32, 1024), (0, 0, 128, 2048), (0, 0, 256, 512),
              (512, 0, 0, 0), (2048, 0, 0, 0), (512, 4096, 0, 0),
              (512, 0, 32, 1024), (1024, 0, 64, 2048), (256, 1024, 128, 1024))


@dataclass(frozen=True, slots=True)
class Check:
    """One measured grid row composed into a whole iteration, against the profile's prediction."""

    row: tuple[int, int, int, int]  # prefill_chunk, kv_prefill, n_decode, kv_decode
    composed_s: float
    predicted_s: float

    @property
    def label(self) -> str:
        c, kp, n, kv = self.row
        parts = ([f"prefill {c}" + (f" after {kp}" if kp else "")] if c else []) + (
            [f"{n} decode{'s' if n != 1 else ''} @ {kv}"] if n else [])
        return " + ".join(parts)

    @property
    def rel_error(self) -> float:
        return self.predicted_s / self.composed_s - 1.0


def row_shape(row: tuple[int, int, int, int]) -> BatchShape:
    c, kp, n, kv = row
    return BatchShape(prefill_tokens=c, prefill_context_tokens=kp + c if c else 0, decode_seqs=n,
                      decode_context_tokens=n * kv, mode=BatchMode.MERGED, adapter_ranks=(),
                      lora_tokens=0, lora_token_rank=0, prefill_attention_pairs=c * (2 * kp + c + 1) // 2,
                      prefill_seqs=1 if c else 0, max_context_tokens=max(kp + c, kv))


def checks(src: Source, profile: Profile, gpu: Gpu | None,
           rows: tuple[tuple[int, int, int, int], ...] = CHECK_ROWS) -> list[Check]:
    """Measured rows (those present) composed as in the module docstring vs `step_s`."""
    shape, model = profile.model, LatencyModel(profile)
    dense = dense_iteration_s(src, shape, gpu)
    grid = {tuple(int(v) for v in r[:4]): float(r[4]) for r in src.attention}
    lm, sampler = src.per_sequence["lm_head"], src.per_sequence["sampler"]
    out = []
    for row in rows:
        c, _, n, _ = row
        seqs = n + (1 if c else 0)
        if row not in grid or not _inside(c + n, dense) or not _inside(seqs, lm) or not _inside(seqs, sampler):
            continue
        composed = (_interp(dense, c + n) + shape.num_layers * grid[row] + _interp(lm, seqs)
                    + _interp(sampler, seqs))
        out.append(Check(row, composed, model.step_s(row_shape(row))))
    return out


def _inside(x: int, table: dict[int, float]) -> bool:
    return min(table) <= x <= max(table)


def _interp(table: dict[int, float], x: int) -> float:
    """The measured value at `x`, linear between the nearest measured neighbours."""
    xs = sorted(table)
    return float(np.interp(x, xs, [table[k] for k in xs]))


def import_llmservingsim(folder: str | Path, *, tp: int | None = None, config: str | Path | None = None,
                         device_memory_gib: float | None = None, command: str = "",
                         link_gbps: float | None = None, link_latency_us: float | None = None,
                         ) -> tuple[Profile, list[Check]]:
    """The profile of DIR's `tp` degree, and its step checks against the composed measurements.
    `link_gbps` / `link_latency_us` replace the known-GPU table's all-reduce cost (tensor
    parallel): one all-reduce of b bytes takes latency + b / bandwidth."""
    src = read_source(Path(folder), tp)
    shape = model_shape(src, Path(config) if config is not None else None)
    hardware = src.meta["hardware"]
    gpu = known_gpu(hardware)
    if link_gbps is not None or link_latency_us is not None:
        gpu = _with_link(gpu, hardware, link_gbps, link_latency_us)
    if device_memory_gib is not None:
        if device_memory_gib <= 0:
            raise ProfileError(f"--device-memory-gib {device_memory_gib}: must be positive")
        per_gpu_gib = device_memory_gib
    elif gpu is not None:
        per_gpu_gib = gpu.memory_gib
    else:
        raise ProfileError(f"llmservingsim: device memory of hardware {hardware!r} is unknown; pass "
                           "--device-memory-gib (memory of one GPU)")
    layers, g = shape.num_layers, (lambda x: float(f"{x:.4g}"))
    att, errors = fit_attention(src.attention)
    lm_fixed, lm_slope, ps_err = fit_per_sequence(src.per_sequence)
    curve, lin_err = fit_curve(dense_iteration_s(src, shape, gpu), layers * att[0] + lm_fixed, layers * att[1])
    errors.update(lin_err)
    errors.update(ps_err)
    rates = derive_rates(src.dense, shape)
    lora, merge = lora_and_merge(shape, rates)
    engine = src.meta.get("engine_effective") or {}
    util = float(engine.get("gpu_memory_utilization", 0.9))
    max_tokens = int(engine.get("max_num_batched_tokens", max(curve.tokens)))
    activations = max_tokens * (3 * shape.intermediate_size // src.tp + 4 * shape.hidden_size) * shape.dtype_bytes
    per_gpu = int(per_gpu_gib * GIB)
    reserved = src.tp * int((1 - util) * per_gpu + activations + ACTIVATION_OVERHEAD_GIB * GIB)
    host = gpu.host_bytes_per_s if gpu is not None else UNKNOWN_HOST_BYTES_PER_S
    skew_decode, skew_mixed = fit_skew(src.skew, errors)
    latency = Latency(
        attention_skew_decode=skew_decode, attention_skew_mixed=skew_mixed,
        linear=curve, per_seq_s=g(lm_slope + layers * att[2]), scheduler_s=0.0,
        attention_decode_s_per_token=g(layers * att[3]), attention_prefill_s_per_pair=g(layers * att[4]),
        attention_mixed_s_per_decode_token=g(layers * att[5]),
        attention_mixed_s_per_decode_seq=g(layers * att[6]),
        lora=lora, merge=merge, unmerge=merge, switch=None,
        adapter_load=Transfer(bandwidth_bytes_per_s=g(host * src.tp), overlap=True),
        swap=Transfer(bandwidth_bytes_per_s=g(host * src.tp)),
        kv_transfer=Transfer(bandwidth_bytes_per_s=NIC_BYTES_PER_S))
    a = src.attention
    rng = Range(max_batch_tokens=max(curve.tokens),
                max_decode_seqs=int(min(a[:, 2].max(), max(src.per_sequence["lm_head"]))),
                max_context_tokens=int(a[:, 3].max()))
    variant = str(src.meta.get("variant", "bf16"))
    prov = Provenance(
        how="measured", device=f"{src.meta.get('gpu', hardware)} x{src.tp}", model=shape.name,
        dtype=VARIANTS[variant][0], tensor_parallel=src.tp, date=datetime.date.today().isoformat(),
        git_revision=git_revision(mark_dirty=False), command=command,
        sources=(*(f"LLMServingSim (MIT, github.com/casys-kaist/LLMServingSim) {p}" for p in src.files),
                 *((gpu.source,) if gpu is not None else ())))
    profile = Profile(format=FORMAT, provenance=prov, model=shape,
                      memory=Memory(device_bytes=src.tp * per_gpu, reserved_bytes=reserved,
                                    host_swap_bytes=HOST_SWAP_GIB * GIB),
                      latency=latency, range=rng, fit_error=errors)
    found = checks(src, profile, gpu)
    if found:
        rel = [abs(c.rel_error) for c in found]
        errors = {**errors, "step_check_mean_rel": round_up(statistics.fmean(rel)), "step_check_max_rel": round_up(max(rel))}
    text = notes(src, shape, att, lm_fixed, lm_slope, rates, util, activations, gpu, found, device_memory_gib)
    return replace(profile, provenance=replace(prov, notes=text), fit_error=errors), found


def notes(src: Source, shape: ModelShape, att: np.ndarray, lm_fixed: float, lm_slope: float, rates: Rates,
          util: float, activations: int, gpu: Gpu | None, found: list[Check], memory_given: float | None) -> str:
    engine = src.meta.get("engine_effective") or {}
    us = lambda x: f"{x * 1e6:.3g} us"  # noqa: E731
    ar = (f" Plus {2 * shape.num_layers + 1} NCCL all-reduces per iteration (2 per layer after o_proj "
          f"and down_proj, 1 for the vocab-parallel embedding) of tokens x hidden x {shape.dtype_bytes} B, "
          f"each {us(gpu.allreduce_fixed_s)} + bytes / {gpu.allreduce_bytes_per_s / 1e9:.3g} GB/s: LLMServingSim's "
          "measured NCCL samples (not in the dense profile, which times one rank)." if src.tp > 1 and gpu else "")
    mem = (f"{memory_given} GiB per GPU as given" if memory_given is not None
           else f"{gpu.memory_gib} GiB per GPU (CUDA's total, known-GPU table)" if gpu else "")
    lines = [
        f"Imported by dlora from LLMServingSim's layer-wise profile of {shape.name} on {src.meta['hardware']}, "
        f"tp{src.tp} (vLLM {src.meta.get('vllm_version', '?')}, enforce_eager {engine.get('enforce_eager', '?')}, "
        f"profiled {src.meta.get('profiled_at', '?')}). The profiler ran a 1-layer model with one rank's "
        f"dimensions (meta.yaml hf_overrides), so each dense / attention time is one layer of the full "
        f"model on one GPU; the shape ({shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_heads} heads, {shape.num_kv_heads} KV heads, head_dim {shape.head_dim}) is the built-in "
        "table's (or --config's).",
        f"linear = embedding + final_layernorm + {shape.num_layers} x (2 x layernorm + the other dense "
        "ops) per measured token count, made non-decreasing (isotonic), on knots at measured counts;"
        f"{ar} Plus the attention fit's fixed {us(att[0])} and per-token {att[1] * 1e9:.3g} ns per layer, "
        f"and lm_head + sampler's fixed part {us(lm_fixed)} (the LM head weight read, once per iteration).",
        f"per_seq_s = lm_head + sampler slope {us(lm_slope)} per sampled sequence (fit 1..256; lm_head "
        f"steps up near 150 sequences, see per_sequence errors) + attention's {us(att[2])} per sequence per layer.",
        "Attention: non-negative least squares on relative error over every attention.csv row, per layer: "
        "fixed + tokens + sequences + decode context tokens + prefill pairs (chunk x (prefix + (chunk+1)/2)) "
        "+ [prefill and decode in one iteration] (decode context tokens + decode sequences). The mixed terms "
        f"({att[5] * 1e9:.3g} ns per decode context token and {us(att[6])} per decode per layer) price decode "
        "attention run by the varlen prefill kernel, about twice the decode-only figure; a fixed mixed part fit "
        "near zero and is left out. Not modelled: a short chunk over a long prefix costs more than its pairs "
        "(KV reads), and one decode at a long context beside a prefill runs slower than linear.",
        "Unequal decode contexts (skew.csv, when present): attention_skew_decode / attention_skew_mixed = least "
        "squares of (t_skew - t_mean) on (t_max - t_mean) over its pure-decode / mixed rows, i.e. the share "
        "of the gap to every sequence at the batch's longest context that a batch pays (LLMServingSim's alpha).",
        "scheduler_s = 0: vLLM's and dlora's host time are not in a GPU-kernel profile.",
        f"LoRA, merge, unmerge: not measured here; a roofline (the method of scripts/derive_profile.py) at "
        f"rates derived from dense.csv: HBM {rates.hbm_bytes_per_s / 1e12:.3g} TB/s (gate_up_proj weight bytes / "
        f"its 1-token time), GEMM {rates.gemm_flops_per_s / 1e12:.3g} TFLOP/s (its FLOPs at the most tokens), "
        f"kernel floor {us(rates.launch_s)} (median 1-token norm/rope/act); switch = unmerge + merge.",
        f"Memory: {mem}; reserved = {1 - util:.2g} of it (vLLM gpu_memory_utilization {util:g}, meta.yaml "
        f"engine_effective) + activations of a {engine.get('max_num_batched_tokens', '?')}-token batch "
        f"({activations / GIB:.2f} GiB) + {ACTIVATION_OVERHEAD_GIB:g} GiB (CUDA context, workspaces; assumed), "
        f"per GPU. Host swap {HOST_SWAP_GIB} GiB, adapter load and swap over the host link "
        f"({(gpu.host_bytes_per_s if gpu else UNKNOWN_HOST_BYTES_PER_S) / 1e9:.3g} GB/s per GPU), KV transfer "
        "one 100 Gb/s RDMA link at 92%: assumptions.",
    ]
    if found:
        lines.append("CHECKS (measured rows composed into an iteration vs this profile): " + "; ".join(
            f"{c.label}: {c.composed_s * 1e3:.2f} ms vs {c.predicted_s * 1e3:.2f} ms ({c.rel_error:+.1%})"
            for c in found) + ".")
    return " ".join(lines)
