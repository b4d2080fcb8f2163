"""What the PEFT baseline costs against dlora's executor (issue 12): the measurement behind a
profile's `baselines.peft` term.

Same model (the embedded demo Llama and 5 PEFT adapters, written locally, nothing downloaded),
same requests, on this CPU, one torch thread each:

(1) per iteration shape: one forward of transformers + PEFT in eager mode (`set_adapter`, a
    padded batch of one adapter's sequences over a `DynamicCache`) against the same shape
    through dlora's `TorchExecutor` (paged KV, unmerged LoRA). Their ratio is the profile's
    `baselines.peft.step_cost_factor` (geometric mean over the shapes).
(2) a whole run of the same requests (power-law over 5 adapters, all queued at t = 0):
    (a) S-LoRA's PEFT baseline loop (`benchmarks/run_exp_peft.py` of S-LoRA @ 2a2786b9): group
        the queue by adapter, static sub-batches of at most `--batch` requests, prompts padded to
        the batch's longest, decode until the batch's longest output, finished rows dropped from
        the cache; a request waits for its batch;
    (c) the same static padded schedule through the TorchExecutor;
    (b) the TorchExecutor with continuous batching (FCFS, at most `--batch` running).
    (a)/(c) is the eager-mode cost at the same schedule (what `step_cost_factor` stands for),
    (c)/(b) what static padded batches cost (what `static_batches: true` makes the simulator do).

Run: `.venv/bin/python benchmarks/bench_baseline_costs.py [--quick]`. Prints tables; CPU times
are thread CPU seconds (robust on a shared machine), wall times the fastest round.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlora.exec import TorchExecutor
from dlora.exec.demo import extra_demo_adapters, write_demo
from dlora.types import Batch, BatchItem, BatchMode, Request, SamplingParams

NUM_ADAPTERS = 5


@dataclass
class Work:
    adapter: int
    prompt: list[int]
    output_tokens: int


class Systems:
    """transformers + PEFT and the TorchExecutor on the same demo model and adapters."""

    def __init__(self, demo: Path, num_adapters: int) -> None:
        import peft
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

        self.paths = extra_demo_adapters(demo, num_adapters)
        self.names = [p.name for p in self.paths.values()]
        base = transformers.LlamaForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
        model = peft.PeftModel.from_pretrained(base, str(self.paths[0]), adapter_name=self.names[0])
        for i in range(1, num_adapters):
            model.load_adapter(str(self.paths[i]), adapter_name=self.names[i])
        self.hf = model.eval()
        self.ex = TorchExecutor(demo, self.paths, num_kv_blocks=8192, prefix_caching=False)
        self._rid = 0

    # ---- transformers + PEFT, eager ----
    def hf_prefill(self, adapter: int, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
        from transformers import DynamicCache

        self.hf.set_adapter(self.names[adapter])
        cache = DynamicCache()
        with torch.no_grad():
            out = self.hf(input_ids=ids, cache=cache, use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True), cache

    def hf_decode(self, tokens: torch.Tensor, cache: object) -> torch.Tensor:
        with torch.no_grad():
            out = self.hf(input_ids=tokens, cache=cache, use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True)

    # ---- dlora's TorchExecutor ----
    def request(self, w: Work, prompt_len: int | None = None) -> Request:
        self._rid += 1
        prompt = w.prompt if prompt_len is None else (w.prompt * prompt_len)[:prompt_len]
        return Request(id=self._rid, adapter_id=w.adapter, arrival_s=0.0, prompt_tokens=len(prompt),
                       output_tokens=w.output_tokens, prompt_token_ids=tuple(prompt),
                       sampling=SamplingParams(ignore_eos=True))

    def step(self, reqs: list[Request], free: tuple[int, ...] = ()) -> None:
        """One executor iteration over `reqs` (each processes its uncomputed tokens)."""
        items = tuple(BatchItem(r.id, r.adapter_id, r.computed_tokens, r.uncomputed_tokens, True)
                      for r in reqs)
        res = self.ex.execute(Batch(0, 0, BatchMode.UNMERGED, None, items, tuple(reqs), free_requests=free))
        assert res.error is None and res.token_ids is not None, res.error
        for it, r, tok in zip(items, reqs, res.token_ids, strict=True):
            r.computed_tokens += it.new_tokens
            r.output_token_ids.append(tok)
            r.generated_tokens += 1

    def free(self, ids: tuple[int, ...]) -> None:
        if ids:
            self.ex.execute(Batch(0, 0, BatchMode.UNMERGED, None, (), (), free_requests=ids))


# ------------------------------------------------------------------ (1) per iteration shape
def shape_costs(sy: Systems, shapes: list[tuple[str, int, int]], repeats: int) -> list[tuple[str, int, int, float, float]]:
    """(kind, seqs, tokens, HF CPU s, ours CPU s) per shape: median of `repeats` interleaved."""
    rows = []
    gen = torch.Generator().manual_seed(7)
    for kind, n, length in shapes:
        ids = torch.randint(3, 512, (n, length), generator=gen)
        hf_s: list[float] = []
        ours_s: list[float] = []
        works = [Work(0, ids[i].tolist(), 4) for i in range(n)]
        if kind == "decode":
            _, cache = sy.hf_prefill(0, ids)
            tok = ids[:, -1:]
            reqs = [sy.request(Work(0, [*w.prompt, 5], 4)) for w in works]  # + the decoded token
            prefill = tuple(BatchItem(r.id, 0, 0, length, False) for r in reqs)
            sy.ex.execute(Batch(0, 0, BatchMode.UNMERGED, None, prefill, tuple(reqs)))  # untimed
            decode = Batch(0, 0, BatchMode.UNMERGED, None,
                           tuple(BatchItem(r.id, 0, length, 1, True) for r in reqs), tuple(reqs))
            for _ in range(repeats + 1):  # the same decode shape each time (KV at `length` rewritten)
                t = time.thread_time()
                sy.hf_decode(tok, cache)
                hf_s.append(time.thread_time() - t)
                cache.crop(-1)  # type: ignore[attr-defined]  # drop the decoded token
                t = time.thread_time()
                sy.ex.execute(decode)
                ours_s.append(time.thread_time() - t)
            sy.free(tuple(r.id for r in reqs))
        else:
            for _ in range(repeats + 1):
                t = time.thread_time()
                sy.hf_prefill(0, ids)
                hf_s.append(time.thread_time() - t)
                reqs = [sy.request(w) for w in works]
                t = time.thread_time()
                sy.step(reqs)
                ours_s.append(time.thread_time() - t)
                sy.free(tuple(r.id for r in reqs))
        rows.append((kind, n, length, statistics.median(hf_s[1:]), statistics.median(ours_s[1:])))
    return rows


# ------------------------------------------------------------------ (2) whole runs
def make_work(num: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]) -> list[Work]:
    """S-LoRA's synthetic workload scaled down: power-law (alpha 1) over the adapters, uniform lengths."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, NUM_ADAPTERS + 1)
    adapters = rng.choice(NUM_ADAPTERS, size=num, p=p / p.sum())
    out = []
    for a in adapters:
        plen = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        out.append(Work(int(a), rng.integers(3, 512, plen).tolist(),
                        int(rng.integers(output_range[0], output_range[1] + 1))))
    return out


def static_batches(work: list[Work], batch: int) -> list[list[Work]]:
    """S-LoRA's PEFT loop: the queue grouped by adapter (first-seen order), sub-batches of `batch`."""
    groups: dict[int, list[Work]] = {}
    for w in work:
        groups.setdefault(w.adapter, []).append(w)
    return [g[i:i + batch] for g in groups.values() for i in range(0, len(g), batch)]


def run_hf_static(sy: Systems, work: list[Work], batch: int) -> None:
    for group in static_batches(work, batch):
        longest = max(len(w.prompt) for w in group)
        ids = torch.tensor([(w.prompt * longest)[:longest] for w in group])  # padded to the longest
        tok, cache = sy.hf_prefill(group[0].adapter, ids)
        left = [w.output_tokens - 1 for w in group]
        while True:
            keep = [i for i, n in enumerate(left) if n > 0]
            if not keep:
                break
            if len(keep) < len(left):  # finished rows leave the batch (S-LoRA's keep_idx)
                cache.batch_select_indices(torch.tensor(keep))  # type: ignore[attr-defined]
                tok = tok[keep]
                left = [left[i] for i in keep]
            tok = sy.hf_decode(tok, cache)
            left = [n - 1 for n in left]


def run_ours_static(sy: Systems, work: list[Work], batch: int) -> None:
    for group in static_batches(work, batch):
        longest = max(len(w.prompt) for w in group)
        active = [sy.request(w, prompt_len=longest) for w in group]
        freed: tuple[int, ...] = ()
        while active:
            sy.step(active, freed)
            done = [r for r in active if r.generated_tokens >= r.output_tokens]
            freed = tuple(r.id for r in done)
            active = [r for r in active if r.generated_tokens < r.output_tokens]
        sy.free(freed)


def run_ours_continuous(sy: Systems, work: list[Work], batch: int) -> None:
    waiting = [sy.request(w) for w in work]
    running: list[Request] = []
    freed: tuple[int, ...] = ()
    while waiting or running:
        while waiting and len(running) < batch:
            running.append(waiting.pop(0))
        sy.step(running, freed)
        freed = tuple(r.id for r in running if r.generated_tokens >= r.output_tokens)
        running = [r for r in running if r.generated_tokens < r.output_tokens]
    sy.free(freed)


def whole_runs(sy: Systems, work: list[Work], batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Fastest wall and CPU seconds of each system over `rounds` alternating rounds."""
    systems = {"a": run_hf_static, "c": run_ours_static, "b": run_ours_continuous}
    best = {k: (math.inf, math.inf) for k in systems}
    for fn in systems.values():  # warm-up
        fn(sy, work[:4], batch)
    for _ in range(rounds):
        for name, fn in systems.items():
            w, c = time.perf_counter(), time.thread_time()
            fn(sy, work, batch)
            w, c = time.perf_counter() - w, time.thread_time() - c
            best[name] = (min(best[name][0], w), min(best[name][1], c))
    return best


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both systems)")
    parser.add_argument("--quick", action="store_true", help="fewer requests, shapes and repeats")
    parser.add_argument("--requests", type=int, default=None, help="requests in the whole run (default 80, quick 30)")
    parser.add_argument("--batch", type=int, default=16, help="batch cap of both systems (sequences)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    repeats, rounds = (5, 1) if args.quick else (15, 3)
    num = args.requests or (30 if args.quick else 80)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU float32, demo Llama, {NUM_ADAPTERS} adapters")
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo(Path(tmp) / "demo")
        sy = Systems(demo, NUM_ADAPTERS)
        sizes = (1, 4, 16)
        lengths = (32, 256) if args.quick else (32, 128, 512)
        shapes = [(k, n, L) for k in ("decode", "prefill") for n in sizes for L in lengths]
        print(f"\n(1) one forward per shape, one adapter (unmerged), median of {repeats} interleaved (thread CPU ms)")
        print(f"{'shape':<9} {'seqs':>4} {'context':>7} {'HF+PEFT':>9} {'TorchExec':>9} {'ratio':>6}")
        rows = shape_costs(sy, shapes, repeats)
        for kind, n, length, h, o in rows:
            print(f"{kind:<9} {n:>4} {length:>7} {h * 1e3:>9.3f} {o * 1e3:>9.3f} {h / o:>5.2f}x")
        ratios = [h / o for *_, h, o in rows]
        dec = [h / o for k, _, _, h, o in rows if k == "decode"]
        pre = [h / o for k, _, _, h, o in rows if k == "prefill"]
        print(f"step_cost_factor (geometric mean over the {len(ratios)} shapes): {geomean(ratios):.2f} "
              f"(decode {geomean(dec):.2f}, prefill {geomean(pre):.2f}; range {min(ratios):.2f}-{max(ratios):.2f})")

        work = make_work(num, args.seed, (8, 128), (8, 64))
        tokens = sum(w.output_tokens for w in work)
        print(f"\n(2) whole run: {num} requests queued at t = 0, power-law (alpha 1) over {NUM_ADAPTERS} adapters, "
              f"prompts U[8, 128], outputs U[8, 64] ({tokens} output tokens), batch cap {args.batch}, "
              f"best of {rounds}")
        best = whole_runs(sy, work, args.batch, rounds)
        label = {"a": "(a) HF+PEFT, S-LoRA's static padded loop", "c": "(c) TorchExecutor, same static schedule",
                 "b": "(b) TorchExecutor, continuous batching"}
        print(f"{'system':<42} {'wall s':>7} {'tok/s':>7} {'CPU s':>7} {'tok/CPU s':>9}")
        for k in ("a", "c", "b"):
            w, c = best[k]
            print(f"{label[k]:<42} {w:>7.2f} {tokens / w:>7.0f} {c:>7.2f} {tokens / c:>9.0f}")
        a, b, c = best["a"][1], best["b"][1], best["c"][1]
        print(f"CPU-time ratios: (a)/(b) {a / b:.2f}x = eager (a)/(c) {a / c:.2f}x x static padded (c)/(b) {c / b:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
