"""The measured profile's document (`dlora-profile/1`, DESIGN.md section 5): the fits of
merge, unmerge and transfers beside the step terms, the range the sweep covered, the model's
shape and the provenance (device, model, dtype, torch / triton versions, date, git revision,
command). Imports torch (the measuring side)."""

from __future__ import annotations

import datetime
from typing import Any

import torch

from ..profile import (
    FORMAT,
    Curve,
    Latency,
    LoraCost,
    ModelShape,
    Profile,
    Provenance,
    Range,
    RankCost,
    Transfer,
)
from ..revision import git_revision
from .fit import Samples, fit_affine, fit_transfer, medians, note_poor_fit, record_errors
from .setup import ProfileSetup
from .sweep import Measured, Sweep


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
                  copy_bytes_per_s: float, scheduler_s: float) -> Profile:
    """The profile document; `terms` are per_seq, attention decode / prefill, the two mixed
    terms (per decode context token, per decode sequence), then LoraCost's; `scheduler_s` is
    dlora's own host time per iteration (`measure.measure_scheduler_s`)."""
    errors = dict(step_errors)
    rank_costs = {}
    for key in ("merge", "unmerge"):
        base, slope, errs = fit_affine(switches[key])
        rank_costs[key] = RankCost(base, slope)
        record_errors(errors, key, errs)
    sw = [abs(rank_costs["unmerge"](int(x) // 1000) + rank_costs["merge"](int(x) % 1000) - s) / s
          for x, s in medians(switches["switch"], slice(None)).items()]
    record_errors(errors, "switch_as_unmerge_plus_merge", sw)
    notes = [setup.notes] if setup.notes else []
    fitted: dict[str, Transfer] = {}
    for key in ("adapter_load", "swap", "kv_transfer"):
        fitted[key], errs, fallback = fit_transfer(transfers[key], copy_bytes_per_s)
        record_errors(errors, key, errs)
        if fallback:
            notes.append(f"{key}: no per-byte cost measurable (fixed {fitted[key].fixed_s:.3g} s); "
                         f"bandwidth = the measured memory copy rate")
    shapes = [m.shape for m in measured]
    max_ctx = max(it[0] + it[1] for m in measured for it in m.point.items)
    rng = Range(max_batch_tokens=max(s.total_tokens for s in shapes),
                max_decode_seqs=max(s.decode_seqs for s in shapes),
                max_context_tokens=max(max_ctx, *sweep.transfer_tokens))
    per_seq, att_dec, att_pre, mixed_tok, mixed_seq, *lora = (float(t) for t in terms)
    scheduler = scheduler_s
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
                      date=datetime.date.today().isoformat(), git_revision=git_revision(),
                      torch_version=str(torch.__version__), triton_version=_triton_version(),
                      command=setup.command, sources=(), notes=" ".join(notes))
    return note_poor_fit(Profile(format=FORMAT, provenance=prov, model=model_shape(setup, rng.max_context_tokens),
                                 memory=setup.memory, latency=latency, range=rng, fit_error=errors))
