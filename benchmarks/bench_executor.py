"""Executor benchmarks (issue 5): (b) decode throughput of TorchExecutor against transformers +
PEFT `generate` (one adapter at a time via `set_adapter`, the paper's PEFT baseline) on the demo
model with mixed adapters; (c) unmerged step time against merged with 1, 4 and 16 adapters in
the batch on a larger random Llama; (d) merge and unmerge time per adapter.

Run: `.venv/bin/python benchmarks/bench_executor.py [--threads 1] [--quick]`. Prints tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dlora.exec import LlamaConfig, LlamaModel, LoraAdapter, LoraModule, TorchExecutor
from dlora.exec.demo import extra_demo_adapters, write_demo
from dlora.exec.lora_slots import MergeState
from dlora.exec.model import TARGET_MODULES
from dlora.types import Batch, BatchItem, BatchMode, Request, SamplingParams


def _request(rid: int, prompt: list[int], adapter: int | None, max_new: int) -> Request:
    return Request(
        id=rid,
        adapter_id=adapter,
        arrival_s=0.0,
        prompt_tokens=len(prompt),
        output_tokens=max_new,
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(ignore_eos=True),
    )


def run_executor(ex: TorchExecutor, reqs: list[Request]) -> None:
    """Continuous batching of all requests from step 0 until each has its tokens."""
    active, step = list(reqs), 0
    while active:
        items = tuple(
            BatchItem(
                r.id, r.adapter_id, r.computed_tokens, r.context_tokens - r.computed_tokens, True
            )
            for r in active
        )
        res = ex.execute(Batch(0, step, BatchMode.UNMERGED, None, items, tuple(active)))
        assert res.error is None and res.token_ids is not None and res.eos is not None
        done = []
        for it, r, tok, end in zip(items, active, res.token_ids, res.eos, strict=True):
            r.computed_tokens += it.new_tokens
            r.output_token_ids.append(tok)
            r.generated_tokens += 1
            if end:
                done.append(r)
        for r in done:
            active.remove(r)
        if done:
            ex.execute(
                Batch(
                    0,
                    step,
                    BatchMode.UNMERGED,
                    None,
                    (),
                    (),
                    free_requests=tuple(r.id for r in done),
                )
            )
        step += 1


def bench_throughput(
    demo: Path, num_requests: int, num_adapters: int, max_new: int, rounds: int
) -> dict[str, float]:
    """Best of `rounds` alternating runs of each system on the same requests."""
    import peft
    import transformers

    paths = extra_demo_adapters(demo, num_adapters)
    names = [p.name for p in paths.values()]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (16,), generator=gen).tolist() for _ in range(num_requests)]
    adapters = [i % num_adapters for i in range(num_requests)]
    ex = TorchExecutor(demo, paths, num_kv_blocks=4096)
    base = transformers.LlamaForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, str(paths[0]), adapter_name=names[0])
    for i in range(1, num_adapters):
        model.load_adapter(str(paths[i]), adapter_name=names[i])
    model.eval()

    def ours(n_new: int) -> tuple[float, float, list[list[int]]]:
        reqs = [
            _request(i, p, a, n_new) for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
        ]
        t, c = time.perf_counter(), time.thread_time()
        run_executor(ex, reqs)
        return time.perf_counter() - t, time.thread_time() - c, [r.output_token_ids for r in reqs]

    def peft_run(n_new: int) -> tuple[float, float, list[list[int]]]:
        out: list[list[int]] = [[] for _ in prompts]
        t, c = time.perf_counter(), time.thread_time()
        for a, name in enumerate(names):  # one adapter at a time, its requests batched
            idx = [i for i in range(num_requests) if adapters[i] == a]
            model.set_adapter(name)
            inputs = torch.tensor([prompts[i] for i in idx])
            with torch.no_grad():
                gen_ids = model.generate(
                    inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    do_sample=False,
                    pad_token_id=0,
                )
            for row, i in enumerate(idx):
                out[i] = gen_ids[row, inputs.shape[1] :].tolist()
        return time.perf_counter() - t, time.thread_time() - c, out

    ours(2), peft_run(2)  # warm-up
    best = {"ours": [float("inf")] * 2, "peft": [float("inf")] * 2}
    for _ in range(rounds):
        *t_ours, out_ours = ours(max_new)
        *t_peft, out_peft = peft_run(max_new)
        for key, ts in (("ours", t_ours), ("peft", t_peft)):
            best[key] = [min(a, b) for a, b in zip(best[key], ts, strict=True)]
    same = sum(a == b for a, b in zip(out_ours, out_peft, strict=True))
    tokens = num_requests * max_new
    return {
        "ours_tok_s": tokens / best["ours"][0],
        "peft_tok_s": tokens / best["peft"][0],
        "speedup": best["peft"][0] / best["ours"][0],
        "cpu_speedup": best["peft"][1] / best["ours"][1],
        "identical": same / num_requests,
    }


def _random_model(seed: int) -> LlamaModel:
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=4,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_positions=4096,
    )
    gen = torch.Generator().manual_seed(seed)
    t = {
        "embed_tokens.weight": torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen),
        "norm.weight": torch.ones(cfg.hidden_size),
        "lm_head.weight": torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen) * 0.03,
    }
    for i in range(cfg.num_layers):
        t[f"layers.{i}.input_layernorm.weight"] = torch.ones(cfg.hidden_size)
        t[f"layers.{i}.post_attention_layernorm.weight"] = torch.ones(cfg.hidden_size)
        for m in TARGET_MODULES:
            group = "self_attn" if m in TARGET_MODULES[:4] else "mlp"
            shape = cfg.module_shape(m)
            t[f"layers.{i}.{group}.{m}.weight"] = torch.randn(shape, generator=gen) * 0.03
    return LlamaModel(cfg, t)


def _random_adapter(cfg: LlamaConfig, rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for i in range(cfg.num_layers):
        for m in TARGET_MODULES:
            d_out, d_in = cfg.module_shape(m)
            modules[(i, m)] = LoraModule(
                a=torch.randn(rank, d_in, generator=gen) * 0.03,
                b=torch.randn(d_out, rank, generator=gen) * 0.03,
                scale=2.0,
            )
    return LoraAdapter(
        name=f"r{rank}-{seed}", rank=rank, target_modules=TARGET_MODULES, modules=modules
    )


def bench_overhead(
    model: LlamaModel, batch_size: int, context: int, repeats: int, rank: int = 16
) -> list[tuple[str, float, float, float, float]]:
    """Decode step of `batch_size` requests at `context` tokens, merged vs unmerged, in
    interleaved rounds (the step that switches merge state is not measured). Reports the
    fastest wall time and the median thread CPU time of each kind: on a shared CPU the wall
    median mostly measures the neighbours, while CPU time counts only this thread's work."""
    adapters = {a: _random_adapter(model.config, rank, a) for a in range(16)}
    ex = TorchExecutor(model, adapters, num_kv_blocks=batch_size * (context // 16 + 2))
    reqs = [_request(i, [5] * (context + 1), 0, 10) for i in range(batch_size)]
    for r in reqs:  # prefill (untimed) so each request holds `context` tokens of KV
        item = BatchItem(r.id, None, 0, context, False)
        ex.execute(Batch(0, 0, BatchMode.UNMERGED, None, (item,), (r,)))

    def batch(num_adapters: int | None, switch: bool) -> Batch:
        n = num_adapters or 1
        items = tuple(BatchItem(r.id, i % n, context, 1, True) for i, r in enumerate(reqs))
        rs = tuple(_request(r.id, [5] * (context + 1), i % n, 10) for i, r in enumerate(reqs))
        if num_adapters is None:
            return Batch(0, 1, BatchMode.MERGED, 0, items, rs, merge_adapter=0 if switch else None)
        return Batch(
            0, 1, BatchMode.UNMERGED, None, items, rs, unmerge_adapter=0 if switch else None
        )

    kinds: list[int | None] = [None, 1, 4, 16]
    wall: dict[int | None, list[float]] = {k: [] for k in kinds}
    cpu: dict[int | None, list[float]] = {k: [] for k in kinds}
    for round_ in range(repeats + 1):
        for k in kinds:
            ex.execute(batch(k, switch=k in (None, 1)))  # switches and warms up, unmeasured
            steady = batch(k, switch=False)
            for _ in range(3):
                t = time.thread_time()
                res = ex.execute(steady)
                t = time.thread_time() - t
                assert res.error is None, res.error
                if round_:
                    wall[k].append(res.elapsed_s)
                    cpu[k].append(t)
    base_wall, base_cpu = min(wall[None]), statistics.median(cpu[None])
    rows = []
    for k in kinds:
        w, c = min(wall[k]), statistics.median(cpu[k])
        name = "merged (1 adapter)" if k is None else f"unmerged, {k} adapter(s)"
        rows.append(
            (name, w, 100 * (w - base_wall) / base_wall, c, 100 * (c - base_cpu) / base_cpu)
        )
    return rows


def bench_merge(model: LlamaModel, rank: int, repeats: int) -> tuple[float, float]:
    adapter = _random_adapter(model.config, rank, 99)
    state = MergeState(model, backup_device="cpu")
    state.merge(0, adapter)
    state.unmerge()  # first merge also saves the backups
    merge_s, unmerge_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        state.merge(0, adapter)
        merge_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        state.unmerge()
        unmerge_s.append(time.perf_counter() - t)
    return min(merge_s), min(unmerge_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--parts", default="bcd", help="which benchmarks to run (b, c, d)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    max_new, repeats = (16, 3) if args.quick else (64, 10)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU float32")
    if "b" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            demo = write_demo(Path(tmp) / "demo")
            print(
                f"\n(b) decode throughput, demo model, 16-token prompts, {max_new} new tokens "
                "each, best of 3 alternating runs (wall and thread CPU time)"
            )
            print(
                f"{'requests':>8} {'adapters':>8} {'ours tok/s':>11} {'PEFT tok/s':>11} "
                f"{'speedup':>8} {'CPU-time speedup':>17} {'same tokens':>11}"
            )
            for n, k in ((8, 4), (16, 4), (32, 4), (16, 8)):
                r = bench_throughput(demo, n, k, max_new, rounds=2 if args.quick else 3)
                print(
                    f"{n:>8} {k:>8} {r['ours_tok_s']:>11.0f} {r['peft_tok_s']:>11.0f} "
                    f"{r['speedup']:>7.1f}x {r['cpu_speedup']:>16.1f}x {r['identical']:>10.0%}"
                )
    model = _random_model(0)
    c = model.config
    if "c" in args.parts:
        print(
            f"\n(c) decode step, random Llama hidden {c.hidden_size}, {c.num_layers} layers, "
            f"32 requests at 256 context, rank 16 on all 7 projections; {3 * repeats} interleaved steps "
            "each: fastest wall time, median thread CPU time"
        )
        print(f"{'batch':<26} {'wall ms':>8} {'overhead':>9} {'CPU ms':>8} {'overhead':>9}")
        for name, w, w_pct, c_s, c_pct in bench_overhead(model, 32, 256, repeats):
            print(f"{name:<26} {w * 1e3:>8.2f} {w_pct:>8.1f}% {c_s * 1e3:>8.2f} {c_pct:>8.1f}%")
    if "d" in args.parts:
        print(
            f"\n(d) merge / unmerge per adapter (all 7 projections x {c.num_layers} layers, "
            "backups on the host, fastest of the repeats)"
        )
        print(f"{'model':<22} {'rank':>5} {'merge ms':>9} {'unmerge ms':>11}")
        for rank in (8, 16, 64):
            m, u = bench_merge(model, rank, repeats)
            print(f"{'hidden 1024 x 4':<22} {rank:>5} {m * 1e3:>9.2f} {u * 1e3:>11.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
