"""`dlora profile`: measure the TorchExecutor and fit the LatencyModel (DESIGN.md section 5).

Sweeps real batches through `TorchExecutor.execute`: prefill (one or several sequences), decode
(sequences x context), mixed prefill + decode, and unmerged batches of 1..N distinct adapters of
each sweep rank (PAPER.md section 1); times merge, unmerge and a switch, adapter load, KV swap
and KV export + import. Every point is warmed up, then measured once per round over `repeats`
rounds (rounds interleave the points, so drifting background load hits all of them alike); the
median counts. Step terms are fitted together by non-negative least squares on relative error
(each row divided by its measured time), the linear curve as hat functions on fixed knots. A
deterministic third of the points (interior ones) is held out, the profile is the fit on the
rest, and `fit_error` gives each term group's error on the held-out points. The mixed points (a
prefill chunk beside decodes of several batch sizes and contexts) fit the mixed-iteration
terms (`LatencyModel.mixed_s`).
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

from dlora.errors import ConfigError
from dlora.exec.adapters import LoraAdapter, LoraModule
from dlora.exec.executor import TorchExecutor
from dlora.exec.model import TARGET_MODULES, LlamaModel
from dlora.exec.profile_fit import (
    ProfileSetup,
    StepPoint,
    build_profile,
    fit_transfer,
    step_points,
)
from dlora.exec.profile_setup import _memory, _sync, copy_bandwidth, device_name, load_model
from dlora.profile import Curve, Profile
from dlora.types import Batch, BatchItem, BatchMode, BatchShape, Request, SamplingParams

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
KNOT_RATIO = 4  # curve knots at least this factor apart in tokens


@dataclass(frozen=True, slots=True)
class Sweep:
    """The grid of a profiling run (see `step_points` for the batches it makes)."""

    prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    prefill_seqs: tuple[int, ...] = (1, 4)
    decode_seqs: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_context: tuple[int, ...] = (16, 64, 256, 512)
    num_adapters: tuple[int, ...] = (1, 2, 4)
    ranks: tuple[int, ...] = (4, 8, 16)
    transfer_tokens: tuple[int, ...] = (64, 256, 1024, 4096)
    repeats: int = 7
    warmup: int = 2

    def trimmed(self, max_batch_tokens: int | None = None, max_seqs: int | None = None,
                max_context: int | None = None) -> Sweep:
        def cut(xs: tuple[int, ...], hi: int | None) -> tuple[int, ...]:
            kept = tuple(x for x in xs if hi is None or x <= hi)
            return kept or (min(xs) if hi is None else hi,)

        return replace(self, prefill_tokens=cut(self.prefill_tokens, max_batch_tokens),
                       decode_seqs=cut(self.decode_seqs, max_seqs),
                       decode_context=cut(self.decode_context, max_context),
                       num_adapters=cut(self.num_adapters, max_seqs),
                       transfer_tokens=cut(self.transfer_tokens, max_context))


QUICK = Sweep(prefill_tokens=(16, 64, 128, 256, 512), decode_seqs=(1, 4, 8, 16),
              decode_context=(32, 128, 256), num_adapters=(1, 2, 4), ranks=(4, 16),
              transfer_tokens=(64, 256, 1024), repeats=5)


@dataclass(frozen=True, slots=True)
class Measured:
    """One step point's median seconds, its shape, and whether the fit left it out."""

    point: StepPoint
    shape: BatchShape
    seconds: float
    held_out: bool


@dataclass
class ProfileRun:
    profile: Profile
    steps: list[Measured] = field(default_factory=list)
    ranks: dict[int, int] = field(default_factory=dict)  # sweep adapter id -> rank


def synthetic_adapters(model: LlamaModel, ranks: tuple[int, ...], per_rank: int,
                       seed: int = 0) -> dict[int, LoraAdapter]:
    """`per_rank` random adapters of each rank on every target module, host memory."""
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    out: dict[int, LoraAdapter] = {}
    for r in ranks:
        for k in range(per_rank):
            mods = {}
            for layer in range(cfg.num_layers):
                for m in TARGET_MODULES:
                    d_out, d_in = cfg.module_shape(m)
                    a = torch.randn(r, d_in, generator=gen) * d_in**-0.5
                    b = torch.randn(d_out, r, generator=gen) * 0.01
                    mods[(layer, m)] = LoraModule(a.to(model.dtype), b.to(model.dtype), 2.0)
            out[len(out)] = LoraAdapter(f"profile-r{r}-{k}", r, TARGET_MODULES, mods)
    return out


class _Bench:
    """Builds and times batches of `StepPoint`s on one executor."""

    def __init__(self, ex: TorchExecutor, vocab: int) -> None:
        self.ex, self.vocab, self.step = ex, vocab, 0
        self.rng = np.random.default_rng(0)

    def batch(self, point: StepPoint, first_id: int, reserve: bool = True) -> Batch:
        items, reqs = [], []
        for j, (computed, new, aid) in enumerate(point.items):
            rid = first_id + j
            ids = tuple(int(t) for t in self.rng.integers(3, self.vocab, computed + new))
            reqs.append(Request(rid, aid, 0.0, computed + new, 1 << 30, prompt_token_ids=ids,
                                sampling=SamplingParams()))
            items.append(BatchItem(rid, aid, computed, new, True))
            if computed and reserve:
                self.ex.kv.reserve(rid, computed)
                self.ex.kv.mark_written(rid, computed)
        mode = BatchMode.MERGED if point.merged is not None else BatchMode.UNMERGED
        merged = self.ex.merged_adapter
        return Batch(0, 0, mode, point.merged, tuple(items), tuple(reqs),
                     merge_adapter=point.merged if merged != point.merged else None,
                     unmerge_adapter=merged if merged is not None and merged != point.merged else None)

    def time_step(self, batch: Batch) -> float:
        res = self.ex.execute(batch)
        if res.error is not None:
            raise RuntimeError(f"profiling step failed: {res.error}")
        return res.elapsed_s - res.switch_s - res.load_s - res.swap_s

    def free(self, batch: Batch) -> None:
        for rid in batch.request_ids:
            self.ex.kv.free(rid)


def measure_steps(bench: _Bench, points: list[StepPoint], sweep: Sweep,
                  progress: Progress) -> list[float]:
    samples: list[list[float]] = [[] for _ in points]
    for rnd in range(sweep.repeats):
        for i, p in enumerate(points):
            b = bench.batch(p, 1_000 * (i + 1))
            for _ in range(sweep.warmup if rnd == 0 else 1):
                bench.time_step(b)  # switch / load / allocation happen here
            samples[i].append(bench.time_step(b))
            bench.free(b)
        progress(f"steps: round {rnd + 1}/{sweep.repeats} over {len(points)} batch shapes")
    return [statistics.median(s) for s in samples]


def measure_switches(ex: TorchExecutor, by_rank: dict[int, int], repeats: int
                     ) -> dict[str, list[tuple[float, float]]]:
    """(rank, seconds) of merge and unmerge per rank, and (rank sum, seconds) of switches."""
    ms, dev = ex.merge_state, ex.device
    if ms.merged is not None:
        ms.unmerge()
    out: dict[str, list[tuple[float, float]]] = {"merge": [], "unmerge": [], "switch": []}
    ranks = sorted(by_rank)
    for rank in ranks:
        aid = by_rank[rank]
        ex._load(aid)
        ms.merge(aid, ex.slots.get(aid))  # warm-up: backups are copied on the first merge
        ms.unmerge()
        for _ in range(repeats):
            t = _sync(dev)
            ms.merge(aid, ex.slots.get(aid))
            t1 = _sync(dev)
            ms.unmerge()
            t2 = _sync(dev)
            out["merge"].append((rank, t1 - t))
            out["unmerge"].append((rank, t2 - t1))
    for r1, r2 in zip(ranks, ranks[1:] + ranks[:1], strict=True):
        for _ in range(repeats):
            ms.merge(by_rank[r1], ex.slots.get(by_rank[r1]))
            t = _sync(dev)
            ms.unmerge()
            ms.merge(by_rank[r2], ex.slots.get(by_rank[r2]))
            out["switch"].append((float(r1 * 1000 + r2), _sync(dev) - t))
            ms.unmerge()
    return out


def measure_transfers(ex: TorchExecutor, adapters: dict[int, LoraAdapter], tokens: tuple[int, ...],
                      repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(bytes, seconds) of adapter loads, KV swap (each direction) and KV export + import."""
    dev = ex.device
    out: dict[str, list[tuple[float, float]]] = {"adapter_load": [], "swap": [], "kv_transfer": []}
    for aid, a in adapters.items():
        for _ in range(repeats + 1):
            ex.slots.evict(aid)
            t = _sync(dev)
            ex._load(aid)
            out["adapter_load"].append((a.size_bytes, _sync(dev) - t))
        out["adapter_load"].pop(-repeats - 1)  # the first one warms up
    per_token = ex.kv.pool[:, :, :1].numel() * ex.kv.pool.element_size()
    for n in tokens:
        ex.kv.reserve(1, n)
        ex.kv.mark_written(1, n)
        for rep in range(repeats + 1):
            t = _sync(dev)
            ex.kv.swap_out(1)
            t1 = _sync(dev)
            ex.kv.swap_in(1)
            t2 = _sync(dev)
            kv = ex.export_kv(1)
            ex.import_kv(2, kv)
            t3 = _sync(dev)
            ex.free_request(2)
            if rep:
                out["swap"] += [(n * per_token, t1 - t), (n * per_token, t2 - t1)]
                out["kv_transfer"].append((n * per_token, t3 - t2))
        ex.free_request(1)
    return out


def _knots(tokens: list[int]) -> tuple[int, ...]:
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
    knots = _knots([m.shape.total_tokens for m in train])
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
        out[f"step_{group}_max_rel"] = _up(max(errs))
        out[f"step_{group}_mean_rel"] = _up(statistics.fmean(errs))
    every = [e for errs in errors.values() for e in errs]
    if every:
        out["step_max_rel"], out["step_mean_rel"] = _up(max(every)), _up(statistics.fmean(every))
    out["step_fit_points"], out["step_heldout_points"] = float(len(train)), float(len(every))
    return curve, coef[len(knots):], out


def _up(x: float) -> float:
    """Round up to 4 decimals, so the stated error never understates the measured one."""
    return float(np.ceil(x * 1e4) / 1e4)


def run_profile(setup: ProfileSetup, ex: TorchExecutor, sweep: Sweep,
                progress: Progress | None = None) -> ProfileRun:
    """Sweep `ex` (its adapters are registered by the caller: `synthetic_adapters`, ids in rank
    order, `per_rank` each) and fit a profile."""
    say = progress or (lambda msg: log.info("%s", msg))
    ranks = setup.adapter_ranks
    bench = _Bench(ex, ex.model.config.vocab_size)
    points = step_points(sweep, ranks)
    say(f"sweeping {len(points)} batch shapes x {sweep.repeats} rounds on {setup.device_name}")
    seconds = measure_steps(bench, points, sweep, say)
    measured = [Measured(p, bench.batch(p, 0, reserve=False).shape(ranks), s, p.held_out)
                for p, s in zip(points, seconds, strict=True)]
    curve, terms, errors = fit_steps(measured)
    say("timing merge / unmerge / switch")
    by_rank = {r: min(a for a, rr in ranks.items() if rr == r) for r in sorted(set(ranks.values()))}
    switches = measure_switches(ex, by_rank, sweep.repeats)
    say("timing adapter loads, KV swap and KV export + import")
    one_each = {a: ex.store.get(a) for a in by_rank.values()}
    transfers = measure_transfers(ex, one_each, sweep.transfer_tokens, sweep.repeats)
    copy_bw = copy_bandwidth(ex.device)
    profile = build_profile(setup, sweep, curve, terms, errors, switches, transfers, measured,
                            copy_bw)
    return ProfileRun(profile, measured, dict(ranks))


def profile(*, model_dir: str | Path | None = None, model_config: str | None = None,
            dummy_weights: bool = False, device: str = "cpu", dtype: torch.dtype | None = None,
            sweep: Sweep = QUICK, concurrency: int = 1, device_memory_bytes: int | None = None,
            command: str = "", notes: str = "", progress: Progress | None = None) -> ProfileRun:
    """Build the model (and `concurrency - 1` copies that run the same sweep in other threads,
    as co-located live replicas would), sweep it and fit a profile."""
    say = progress or (lambda msg: log.info("%s", msg))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
    per_rank = max(sweep.num_adapters)
    executors = []
    for i in range(concurrency):
        name, model = load_model(model_dir, model_config, dummy_weights, device, dtype)
        adapters = synthetic_adapters(model, sweep.ranks, per_rank)
        ranks = {aid: a.rank for aid, a in adapters.items()}
        points = step_points(sweep, ranks)
        need = max(sum(c + n + 16 for c, n, _ in p.items) for p in points)
        need = max(need, 2 * max(sweep.transfer_tokens) + 32)
        executors.append(TorchExecutor(model, adapters, device=device, block_size=16,
                                       num_kv_blocks=need // 16 + 8))
        say(f"loaded {name} on {device} ({i + 1}/{concurrency})")
    ex = executors[0]
    memory, mem_note = _memory(device, ex.model, device_memory_bytes)
    extra = f" Measured with {concurrency} in-process replicas stepping at once." if concurrency > 1 else ""
    setup = ProfileSetup(name, device_name(device), ex.model.config, ex.model.dtype, ranks, memory,
                         command, f"{notes} {mem_note}{extra}".strip())
    stop = threading.Event()
    shadows = [threading.Thread(target=_shadow, args=(e, sweep, ranks, stop), daemon=True)
               for e in executors[1:]]
    for t in shadows:
        t.start()
    try:
        return run_profile(setup, ex, sweep, say)
    finally:
        stop.set()
        for t in shadows:
            t.join()


def _shadow(ex: TorchExecutor, sweep: Sweep, ranks: dict[int, int], stop: threading.Event) -> None:
    """Keep another replica busy with the same batches until the measured one is done."""
    bench = _Bench(ex, ex.model.config.vocab_size)
    points = step_points(sweep, ranks)
    while not stop.is_set():
        for i, p in enumerate(points):
            if stop.is_set():
                return
            b = bench.batch(p, 1_000 * (i + 1))
            bench.time_step(b)
            bench.free(b)


__all__ = ["QUICK", "Measured", "ProfileRun", "Sweep", "design_row", "fit_steps", "fit_transfer",
           "load_model", "profile", "run_profile", "synthetic_adapters"]
