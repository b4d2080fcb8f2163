"""Triton kernels of the batched LoRA ops (segment-grouped, SGMV style; PAPER.md section 1).

One program per (segment, output tile, token lane): it reads its adapter's rows of the packed
weights once (masked to ``r_k``, so small ranks cost no padding traffic) and walks the segment's
tokens in blocks of ``BLOCK_M``. Shrink splits ``d_in`` over programs (``split_k``) when there are
too few segments to fill the GPU, accumulating float32 partial sums with atomics. Products and
sums are float32 (``tl.dot`` with IEEE precision for float32 inputs, never TF32).

On CUDA tensors the kernels are compiled. CPU tensors work only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which is slow: tests, small shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from dlora.kernels.layout import KernelInputError

BLOCK_M = 16
SHRINK_BLOCK_R = 16
SHRINK_BLOCK_K = 128
PROGRAMS_PER_SM = 4


def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, rank_offsets_ptr, seg_starts_ptr, seg_adapters_ptr,
    d_in, k_per_split, num_rank_tiles,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_vm, stride_vr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    rank_tile = tl.program_id(1) % num_rank_tiles
    split = tl.program_id(1) // num_rank_tiles
    lane = tl.program_id(2)
    num_lanes = tl.num_programs(2)
    adapter = tl.load(seg_adapters_ptr + seg)
    if adapter < 0:
        return
    row_start = tl.load(rank_offsets_ptr + adapter).to(tl.int64)
    rank = tl.load(rank_offsets_ptr + adapter + 1).to(tl.int64) - row_start
    if rank_tile * BLOCK_R >= rank:
        return
    tok_start = tl.load(seg_starts_ptr + seg).to(tl.int64)
    tok_end = tl.load(seg_starts_ptr + seg + 1).to(tl.int64)
    offs_r = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    k_begin = split * k_per_split
    k_stop = k_begin + k_per_split
    for m in range(tok_start + lane * BLOCK_M, tok_end, BLOCK_M * num_lanes):
        offs_m = m + tl.arange(0, BLOCK_M).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k_begin, k_stop, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K).to(tl.int64)
            x_mask = (offs_m[:, None] < tok_end) & (offs_k[None, :] < d_in)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=x_mask, other=0.0,
            )  # fmt: skip
            a_mask = (offs_r[None, :] < rank) & (offs_k[:, None] < d_in)
            a = tl.load(
                a_ptr + (row_start + offs_r)[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=a_mask, other=0.0,
            )  # fmt: skip
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        v_ptrs = v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr
        v_mask = (offs_m[:, None] < tok_end) & (offs_r[None, :] < rank)
        if ATOMIC:
            tl.atomic_add(v_ptrs, acc, mask=v_mask)
        else:
            tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=v_mask)


def _expand_kernel(
    v_ptr, bt_ptr, y_ptr, rank_offsets_ptr, seg_starts_ptr, seg_adapters_ptr, scales_ptr,
    d_out,
    stride_vm, stride_vr, stride_br, stride_bn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    n_tile = tl.program_id(1)
    lane = tl.program_id(2)
    num_lanes = tl.num_programs(2)
    adapter = tl.load(seg_adapters_ptr + seg)
    if adapter < 0:
        return
    row_start = tl.load(rank_offsets_ptr + adapter).to(tl.int64)
    rank = tl.load(rank_offsets_ptr + adapter + 1).to(tl.int64) - row_start
    if rank <= 0:
        return
    scale = tl.load(scales_ptr + adapter).to(tl.float32)
    tok_start = tl.load(seg_starts_ptr + seg).to(tl.int64)
    tok_end = tl.load(seg_starts_ptr + seg + 1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    bt = tl.load(
        bt_ptr + (row_start + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=(offs_r[:, None] < rank) & (offs_n[None, :] < d_out), other=0.0,
    )  # fmt: skip
    for m in range(tok_start + lane * BLOCK_M, tok_end, BLOCK_M * num_lanes):
        offs_m = m + tl.arange(0, BLOCK_M).to(tl.int64)
        v = tl.load(
            v_ptr + offs_m[:, None] * stride_vm + offs_r[None, :] * stride_vr,
            mask=(offs_m[:, None] < tok_end) & (offs_r[None, :] < rank), other=0.0,
        )  # fmt: skip
        v = v.to(bt.dtype)
        if UPCAST:  # noqa: SIM108 - a constexpr branch, kept explicit for the Triton compiler
            delta = tl.dot(v.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        else:
            delta = tl.dot(v, bt)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = (offs_m[:, None] < tok_end) & (offs_n[None, :] < d_out)
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + scale * delta).to(y_ptr.dtype.element_ty), mask=y_mask)


_JITTED: dict[str, Any] = {}


def interpreter_active() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels run on the CPU)."""
    return type(tl.zeros).__name__ == "InterpretedFunction"


def _launch(fn: Callable[..., None], device: torch.device, grid: tuple, *args: Any, **meta: Any):
    if device.type == "cpu" and not interpreter_active():
        raise KernelInputError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before triton is first imported, or use backend='cpu'"
        )
    if fn.__name__ not in _JITTED:  # jitted lazily, so importing this module compiles nothing
        _JITTED[fn.__name__] = triton.jit(fn)
    kernel = _JITTED[fn.__name__]
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _interpreted(tensor: torch.Tensor) -> bool:
    """CPU tensors run in the interpreter, which truncates float32 -> half casts instead of
    rounding to nearest like the GPU: there the wrappers keep outputs in float32 and let torch
    round them."""
    return tensor.device.type == "cpu"


def _upcast(tensor: torch.Tensor) -> bool:
    """Dot in float32 with IEEE products: for float32 inputs (no TF32), and in the interpreter,
    whose ``tl.dot`` multiplies the raw bits of bfloat16 operands (triton-lang/triton#11584);
    half types are exact in float32, so the products are the same."""
    return tensor.dtype == torch.float32 or tensor.device.type == "cpu"


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _num_lanes(num_tokens: int, num_segments: int, other_programs: int, target: int) -> int:
    """Token lanes per segment: enough programs to fill the GPU when segments are long."""
    max_blocks = max(1, triton.cdiv(num_tokens, BLOCK_M))
    wanted = triton.cdiv(target, max(1, num_segments * other_programs))
    return max(1, min(max_blocks, wanted))


def lora_shrink(
    x: torch.Tensor,
    a_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """Triton ``v[t, :r_k] = x[t] @ A_k^T``; shapes as ``dlora.kernels.lora_shrink``."""
    num_tokens, d_in = x.shape
    num_segments = seg_adapters.shape[0]
    num_rank_tiles = max(1, triton.cdiv(max_rank, SHRINK_BLOCK_R))
    target = _target_programs(x.device)
    max_splits = max(1, triton.cdiv(d_in, SHRINK_BLOCK_K))
    if split_k is None:
        split_k = triton.cdiv(target, max(1, num_segments * num_rank_tiles))
    split_k = max(1, min(split_k, max_splits))
    k_per_split = triton.cdiv(triton.cdiv(d_in, split_k), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    split_k = triton.cdiv(d_in, k_per_split) if d_in else 1
    atomic = split_k > 1
    out_dtype = torch.float32 if atomic or _interpreted(x) else x.dtype
    v = torch.zeros(num_tokens, max_rank, dtype=out_dtype, device=x.device)
    if num_tokens == 0 or num_segments == 0 or max_rank == 0:
        return v.to(x.dtype)
    lanes = _num_lanes(num_tokens, num_segments, num_rank_tiles * split_k, target)
    grid = (num_segments, num_rank_tiles * split_k, lanes)
    _launch(
        _shrink_kernel, x.device, grid,
        x, a_packed, v, rank_offsets, seg_starts, seg_adapters,
        d_in, k_per_split, num_rank_tiles,
        x.stride(0), x.stride(1), a_packed.stride(0), a_packed.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=SHRINK_BLOCK_R, BLOCK_K=SHRINK_BLOCK_K,
        ATOMIC=atomic, UPCAST=_upcast(x),
    )  # fmt: skip
    return v.to(x.dtype)


def lora_expand(
    v: torch.Tensor,
    bt_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Triton ``y[t] += scales[k] * v[t, :r_k] @ B_k^T`` in place; shapes as the public op."""
    num_tokens, d_out = y.shape
    num_segments = seg_adapters.shape[0]
    if num_tokens == 0 or num_segments == 0 or v.shape[1] == 0 or d_out == 0:
        return
    if _interpreted(y) and y.dtype != torch.float32:
        y_float = y.float()
        lora_expand(v, bt_packed, rank_offsets, seg_starts, seg_adapters, scales, y_float)
        y.copy_(y_float)
        return
    block_r = max(16, triton.next_power_of_2(v.shape[1]))
    block_n = max(16, min(128, 8192 // block_r, triton.next_power_of_2(d_out)))
    num_n_tiles = triton.cdiv(d_out, block_n)
    lanes = _num_lanes(num_tokens, num_segments, num_n_tiles, _target_programs(y.device))
    grid = (num_segments, num_n_tiles, lanes)
    _launch(
        _expand_kernel, y.device, grid,
        v, bt_packed, y, rank_offsets, seg_starts, seg_adapters, scales,
        d_out,
        v.stride(0), v.stride(1), bt_packed.stride(0), bt_packed.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=block_n, UPCAST=_upcast(y),
    )  # fmt: skip
