"""`dlora profile`: measure the TorchExecutor and fit the LatencyModel (DESIGN.md section 5).

Sweeps real batches through `TorchExecutor.execute`: the points of `sweep.step_points` (prefill,
decode, mixed prefill + decode, unmerged batches of 1..N distinct adapters of each sweep rank,
PAPER.md section 1); times merge, unmerge and a switch, adapter load, KV swap and KV export +
import, and dlora's own host time per iteration (`measure_scheduler_s`). Every point is warmed
up, then measured once per round over `repeats` rounds (rounds interleave the points, so
drifting background load hits all of them alike); the median counts. The fits are in `fit.py`
(a deterministic third of the points, interior ones, is held out: `fit_error` gives each term
group's error on them); `assemble.py` writes the document. Imports torch (the measuring side).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..exec.adapters import LoraAdapter, LoraModule
from ..exec.executor import TorchExecutor
from ..exec.model import TARGET_MODULES, LlamaModel
from ..profile import Profile
from ..types import Batch, BatchItem, BatchMode, Request, SamplingParams, StepResult
from .assemble import build_profile
from .fit import fit_steps
from .setup import ProfileSetup, copy_bandwidth, device_name, load_model, memory_budget, sync
from .sweep import QUICK, Measured, StepPoint, Sweep, step_points

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


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
                     unmerge_adapter=merged if merged is not None and merged != point.merged else None).check()

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
        ex.load_to_device(aid)
        ms.merge(aid, ex.slots.get(aid))  # warm-up: backups are copied on the first merge
        ms.unmerge()
        for _ in range(repeats):
            t = sync(dev)
            ms.merge(aid, ex.slots.get(aid))
            t1 = sync(dev)
            ms.unmerge()
            t2 = sync(dev)
            out["merge"].append((rank, t1 - t))
            out["unmerge"].append((rank, t2 - t1))
    for r1, r2 in zip(ranks, ranks[1:] + ranks[:1], strict=True):
        for _ in range(repeats):
            ms.merge(by_rank[r1], ex.slots.get(by_rank[r1]))
            t = sync(dev)
            ms.unmerge()
            ms.merge(by_rank[r2], ex.slots.get(by_rank[r2]))
            out["switch"].append((float(r1 * 1000 + r2), sync(dev) - t))
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
            t = sync(dev)
            ex.load_to_device(aid)
            out["adapter_load"].append((a.size_bytes, sync(dev) - t))
        out["adapter_load"].pop(-repeats - 1)  # the first one warms up
    per_token = ex.kv.pool[:, :, :1].numel() * ex.kv.pool.element_size()
    for n in tokens:
        ex.kv.reserve(1, n)
        ex.kv.mark_written(1, n)
        for rep in range(repeats + 1):
            t = sync(dev)
            ex.kv.swap_out(1)
            t1 = sync(dev)
            ex.kv.swap_in(1)
            t2 = sync(dev)
            kv = ex.export_kv(1)
            ex.import_kv(2, kv)
            t3 = sync(dev)
            ex.free_request(2)
            if rep:
                out["swap"] += [(n * per_token, t1 - t), (n * per_token, t2 - t1)]
                out["kv_transfer"].append((n * per_token, t3 - t2))
        ex.free_request(1)
    return out


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
                            copy_bw, measure_scheduler_s())
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
    memory, mem_note = memory_budget(device, ex.model, device_memory_bytes)
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


def measure_scheduler_s(iterations: int = 400, batch: int = 8, adapters: int = 4) -> float:
    """Median host seconds of dlora's own work per iteration (ReplicaScheduler.schedule +
    complete with the credit policy, `batch` decoding requests over `adapters` adapters). The
    live system pays it every iteration, so the simulator charges it as `scheduler_s`."""
    from ..testing import make_replica, make_request

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


__all__ = ["QUICK", "Measured", "ProfileRun", "Sweep", "measure_scheduler_s", "profile", "run_profile",
           "synthetic_adapters"]
