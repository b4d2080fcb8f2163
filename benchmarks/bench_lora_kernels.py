"""Batched LoRA kernels: the paper's Fig. 5 micro-benchmark and (on CUDA) kernel bandwidth.

Fig. 5 (PAPER.md section 1): the base projection ``W x`` (hidden 4096 -> 4096) against the
unmerged LoRA side path ``y += s B (A x)`` (rank 16) for 2-16 tokens, (i) all tokens of one
adapter, (ii) every token its own adapter. float32 on CPU, float16 on CUDA.

Bandwidth (CUDA only): bytes of A (shrink) or B^T (expand) read per second by the Triton
ops in decode-like batches (every token its own adapter, L2 flushed before each run; the GPU
time includes the op's zero-filled output and, with split-K, its float32 -> float16 cast),
against the device's measured copy bandwidth (read + write bytes of a large ``copy_``).
Goal: at least 70%.

    .venv/bin/python benchmarks/bench_lora_kernels.py [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from dlora.kernels import lora_apply, lora_expand, lora_shrink, make_segments

HIDDEN = 4096
RANK = 16
BATCHES = (2, 4, 8, 16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fns: list[Callable[[], object]], device: torch.device, repeats: int) -> list[float]:
    """Median milliseconds of each function, timed interleaved (round-robin) after warm-up.

    Interleaving makes ratios between the functions robust to load from other processes.
    """
    for fn in fns:
        for _ in range(3):
            fn()
    _sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples, strict=True):
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start_s) * 1e3)
    return [statistics.median(times) for times in samples]


def _adapters(num: int, rank: int, d_in: int, d_out: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a_packed = (torch.randn(num * rank, d_in, generator=gen) * d_in**-0.5).to(dtype).to(device)
    bt_packed = (torch.randn(num * rank, d_out, generator=gen) * 0.1).to(dtype).to(device)
    rank_offsets = torch.arange(0, (num + 1) * rank, rank, dtype=torch.int32)
    scales = torch.full((num,), 2.0)
    return a_packed, bt_packed, rank_offsets, scales


def fig5(device: torch.device, repeats: int) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(HIDDEN, HIDDEN, generator=gen) * HIDDEN**-0.5).to(dtype).to(device)
    backends = ["cpu", "triton"] if device.type == "cuda" else ["cpu"]
    label = {"cpu": "torch per-segment", "triton": "triton"}
    print(f"\nFig. 5 micro-benchmark on {device} ({dtype}): base W x ({HIDDEN}x{HIDDEN}) vs LoRA "
          f"side path (rank {RANK}), median of {repeats}")  # fmt: skip
    header = f"{'tokens':>6} {'adapters':>14} {'base ms':>9}"
    for backend in backends:
        header += f" {label[backend] + ' ms':>22} {'LoRA/base':>9}"
    print(header)
    for batch in BATCHES:
        x = torch.randn(batch, HIDDEN, generator=gen).to(dtype).to(device)
        y = torch.mm(x, weight.t())
        for pattern in ("one adapter", "one per token"):
            num = 1 if pattern == "one adapter" else batch
            a_packed, bt_packed, offsets, scales = _adapters(
                num, RANK, HIDDEN, HIDDEN, dtype, device
            )
            per_token = [0] * batch if num == 1 else list(range(batch))
            starts, adapters = make_segments(per_token, device=device)
            index = (offsets.to(device), starts, adapters, scales.to(device))
            fns = [partial(torch.mm, x, weight.t(), out=y)]
            for backend in backends:
                fns.append(
                    partial(
                        lora_apply,
                        x,
                        y,
                        a_packed,
                        bt_packed,
                        *index,
                        backend=backend,
                        max_rank=RANK,
                    )
                )
            base_ms, *lora_ms = _time_ms(fns, device, repeats)
            line = f"{batch:>6} {pattern:>14} {base_ms:>9.3f}"
            for ms in lora_ms:
                line += f" {ms:>22.3f} {ms / base_ms:>9.2f}"
            print(line)


def _copy_bandwidth(device: torch.device, repeats: int) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    (ms,) = _time_ms([partial(dst.copy_, src)], device, repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bandwidth(device: torch.device, repeats: int) -> None:
    copy_bps = _copy_bandwidth(device, repeats)
    print(f"\nDevice copy bandwidth (read + write): {copy_bps / 1e9:.0f} GB/s")
    print(f"{'op':>7} {'adapters':>8} {'rank':>5} {'tokens':>6} {'MiB read':>9} {'us':>8} "
          f"{'GB/s':>7} {'of copy':>8}")  # fmt: skip
    flush = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB > L2
    dtype = torch.float16
    for num, rank in ((256, 16), (256, 32), (256, 64), (512, 32)):
        tokens = num
        a_packed, bt_packed, offsets, scales = _adapters(num, rank, HIDDEN, HIDDEN, dtype, device)
        offsets, scales = offsets.to(device), scales.to(device)
        starts, adapters = make_segments(list(range(tokens)), device=device)
        x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
        y = torch.zeros(tokens, HIDDEN, device=device, dtype=dtype)
        v = lora_shrink(x, a_packed, offsets, starts, adapters, max_rank=rank)
        ops = {
            "shrink": (
                partial(lora_shrink, x, a_packed, offsets, starts, adapters, max_rank=rank),
                a_packed,
            ),
            "expand": (
                partial(lora_expand, v, bt_packed, offsets, starts, adapters, scales, y),
                bt_packed,
            ),
        }
        for name, (run, weights) in ops.items():
            samples = []
            for _ in range(repeats):
                flush.zero_()
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                run()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            ms = statistics.median(samples)
            read = weights.numel() * weights.element_size()
            bps = read / (ms * 1e-3)
            print(f"{name:>7} {num:>8} {rank:>5} {tokens:>6} {read / 2**20:>9.1f} "
                  f"{ms * 1e3:>8.1f} {bps / 1e9:>7.0f} {bps / copy_bps:>8.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (200 if device.type == "cuda" else 25)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))  # fmt: skip
    fig5(device, repeats)
    if device.type == "cuda":
        bandwidth(device, max(20, repeats // 4))


if __name__ == "__main__":
    main()
