"""Batched LoRA ops for unmerged inference (PAPER.md section 1): the one public entry point.

A batch mixes tokens of many adapters with different ranks. Tokens are grouped in segments of
contiguous tokens that share an adapter (``make_segments``); adapters are packed row-wise, so
adapter ``k`` of rank ``r_k`` owns rows ``rank_offsets[k] : rank_offsets[k + 1]`` of the packed
``A`` (``(sum_r, d_in)``) and ``B^T`` (``(sum_r, d_out)``). For token ``t`` of adapter ``k``:

    shrink:  v[t, :r_k] = x[t] @ A_k^T
    expand:  y[t] += scales[k] * v[t, :r_k] @ B_k^T          (in place)
    apply:   y[t] += scales[k] * (x[t] @ A_k^T) @ B_k^T       (shrink, then expand)

Tokens of segments with adapter ``-1`` are left alone. Sums are formed in float32 and rounded
once to the output dtype; ``x``, ``y``, the packed weights and ``v`` share one dtype (float32,
float16 or bfloat16) and one device. Index tensors (int32 or int64) may sit on the CPU or on the
activations' device; their values are checked only when they are on the CPU.

Backends: ``"triton"`` (default on CUDA; on CPU tensors it runs under Triton's interpreter, for
tests), ``"cpu"`` (default elsewhere: one torch matmul per segment), ``"reference"`` (the
readable definition in ``dlora.kernels.reference``).
"""

from __future__ import annotations

from typing import Literal

import torch

from dlora.kernels import cpu, reference
from dlora.kernels.layout import (
    HostIndex,
    KernelInputError,
    Layout,
    check_float_matrix,
    check_layout,
    make_segments,
    max_rank_of,
)

Backend = Literal["reference", "cpu", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "cpu", "triton")

__all__ = [
    "BACKENDS",
    "Backend",
    "KernelInputError",
    "lora_apply",
    "lora_expand",
    "lora_shrink",
    "make_segments",
]


def _pick_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise KernelInputError(
            f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}"
        )
    if backend == "triton" and device.type not in ("cuda", "cpu"):
        raise KernelInputError(f"backend 'triton' needs CUDA or CPU tensors, got {device}")
    return backend


def _triton_module():
    try:
        from dlora.kernels import triton_lora
    except ImportError as error:  # pragma: no cover - triton is part of the 'live' extra
        raise KernelInputError(
            f"backend 'triton' needs the triton package ({error}); install dlora[live] "
            "or pass backend='cpu'"
        ) from error
    return triton_lora


def _on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.device == device else t.to(device, non_blocking=True) for t in tensors]


def _host(layout: Layout, *index: torch.Tensor) -> HostIndex:
    return layout.host if layout.host is not None else HostIndex.of(*index)


def _check_max_rank(op: str, layout: Layout, rank_offsets: torch.Tensor, max_rank: int | None):
    needed = layout.host.max_rank if layout.host is not None else None
    if max_rank is None:
        return needed if needed is not None else max_rank_of(rank_offsets)
    if max_rank < 0 or (needed is not None and max_rank < needed):
        raise KernelInputError(f"{op}: max_rank={max_rank} is below the largest rank {needed}")
    return max_rank


def lora_shrink(
    x: torch.Tensor,
    a_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    *,
    backend: Backend | None = None,
    max_rank: int | None = None,
) -> torch.Tensor:
    """LoRA shrink: ``v[t, :r_k] = x[t] @ A_k^T`` for every token ``t`` of adapter ``k``.

    Args:
        x: ``(T, d_in)`` float32 / float16 / bfloat16 activations.
        a_packed: ``(sum_r, d_in)``, same dtype and device; rows
            ``rank_offsets[k]:rank_offsets[k+1]`` are adapter ``k``'s ``A_k (r_k, d_in)``.
        rank_offsets: ``(K + 1,)`` int32/int64, starts at 0, never decreases.
        seg_starts: ``(S + 1,)`` int32/int64 token offsets, from 0 to ``T``.
        seg_adapters: ``(S,)`` int32/int64 adapter index in ``[0, K)``, or -1 for no LoRA.
        backend: None (by device), ``"reference"``, ``"cpu"`` or ``"triton"``.
        max_rank: width of ``v``; default ``max_k r_k`` (read from ``rank_offsets``, a device
            sync when it lives on a GPU). Pass it to avoid the sync; it must be >= every ``r_k``.

    Returns:
        ``v``: ``(T, max_rank)`` in ``x.dtype``; ``v[t, r_k:]`` and rows of tokens without an
        adapter are zero.
    """
    op = "lora_shrink"
    check_float_matrix(op, "x", x, None)
    check_float_matrix(op, "a_packed", a_packed, x.device)
    if a_packed.dtype != x.dtype or a_packed.shape[1] != x.shape[1]:
        raise KernelInputError(
            f"{op}: a_packed must be (sum_r, d_in={x.shape[1]}) in {x.dtype}, got "
            f"{tuple(a_packed.shape)} in {a_packed.dtype}"
        )
    layout = check_layout(op, x.shape[0], a_packed, rank_offsets, seg_starts, seg_adapters)
    max_rank = _check_max_rank(op, layout, rank_offsets, max_rank)
    chosen = _pick_backend(backend, x.device)
    index = (rank_offsets, seg_starts, seg_adapters)
    if chosen == "reference":
        return reference.lora_shrink(x, a_packed, *index, max_rank)
    if chosen == "cpu":
        return cpu.lora_shrink(x, a_packed, _host(layout, *index), max_rank)
    return _triton_module().lora_shrink(x, a_packed, *_on(x.device, *index), max_rank)


def lora_expand(
    v: torch.Tensor,
    bt_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> None:
    """LoRA expand, in place: ``y[t] += scales[k] * v[t, :r_k] @ B_k^T`` for tokens of adapter k.

    Args:
        v: ``(T, R)`` with ``R >= max_k r_k`` (as returned by ``lora_shrink``), dtype of ``y``.
        bt_packed: ``(sum_r, d_out)``; rows ``rank_offsets[k]:rank_offsets[k+1]`` are adapter
            ``k``'s ``B_k^T (r_k, d_out)``; dtype and device of ``y``.
        rank_offsets, seg_starts, seg_adapters: as in ``lora_shrink``.
        scales: ``(K,)`` float tensor, ``scales[k]`` is adapter ``k``'s ``alpha / r`` (or rsLoRA).
        y: ``(T, d_out)`` float32 / float16 / bfloat16 base output, updated in place.
        backend: None (by device), ``"reference"``, ``"cpu"`` or ``"triton"``.
    """
    op = "lora_expand"
    check_float_matrix(op, "y", y, None)
    check_float_matrix(op, "v", v, y.device)
    check_float_matrix(op, "bt_packed", bt_packed, y.device)
    if v.dtype != y.dtype or bt_packed.dtype != y.dtype:
        raise KernelInputError(
            f"{op}: v, bt_packed and y must share one dtype, got {v.dtype}, "
            f"{bt_packed.dtype}, {y.dtype}; cast them first"
        )
    if v.shape[0] != y.shape[0] or bt_packed.shape[1] != y.shape[1]:
        raise KernelInputError(
            f"{op}: expected v (T={y.shape[0]}, R) and bt_packed (sum_r, d_out={y.shape[1]}), "
            f"got v {tuple(v.shape)} and bt_packed {tuple(bt_packed.shape)}"
        )
    index = (rank_offsets, seg_starts, seg_adapters)
    layout = check_layout(op, y.shape[0], bt_packed, *index, scales)
    if layout.host is not None and v.shape[1] < layout.host.max_rank:
        raise KernelInputError(
            f"{op}: v has {v.shape[1]} columns, fewer than the largest rank {layout.host.max_rank}"
        )
    chosen = _pick_backend(backend, y.device)
    if chosen == "reference":
        reference.lora_expand(v, bt_packed, *index, scales, y)
    elif chosen == "cpu":
        cpu.lora_expand(v, bt_packed, _host(layout, *index), scales.tolist(), y)
    else:
        _triton_module().lora_expand(v, bt_packed, *_on(y.device, *index, scales), y)


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    a_packed: torch.Tensor,
    bt_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    scales: torch.Tensor,
    *,
    backend: Backend | None = None,
    max_rank: int | None = None,
) -> None:
    """Add the LoRA delta in place: ``y[t] += scales[k] * (x[t] @ A_k^T) @ B_k^T``.

    Same as ``lora_expand(lora_shrink(x, ...), ..., y)``: ``x (T, d_in)``, ``y (T, d_out)``,
    ``a_packed (sum_r, d_in)``, ``bt_packed (sum_r, d_out)``, all one dtype and device; the
    intermediate ``v`` is rounded to that dtype. The ``"cpu"`` backend fuses the two per segment.
    """
    check_float_matrix("lora_apply", "x", x, None)
    if _pick_backend(backend, x.device) == "cpu":
        index = (rank_offsets, seg_starts, seg_adapters)
        layout = _check_apply(x, y, a_packed, bt_packed, *index, scales)
        host = _host(layout, *index)
        cpu.lora_apply(x, y, a_packed, bt_packed, host, scales.tolist())
        return
    v = lora_shrink(
        x, a_packed, rank_offsets, seg_starts, seg_adapters, backend=backend, max_rank=max_rank
    )
    lora_expand(v, bt_packed, rank_offsets, seg_starts, seg_adapters, scales, y, backend=backend)


def _check_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    a_packed: torch.Tensor,
    bt_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    scales: torch.Tensor,
) -> Layout:
    op = "lora_apply"
    check_float_matrix(op, "y", y, x.device)
    check_float_matrix(op, "a_packed", a_packed, x.device)
    check_float_matrix(op, "bt_packed", bt_packed, x.device)
    if not x.dtype == y.dtype == a_packed.dtype == bt_packed.dtype:
        dtypes = [str(t.dtype) for t in (x, y, a_packed, bt_packed)]
        raise KernelInputError(
            f"{op}: x, y, a_packed and bt_packed must share one dtype, got {dtypes}; cast first"
        )
    if (
        y.shape[0] != x.shape[0]
        or a_packed.shape[1] != x.shape[1]
        or bt_packed.shape[1] != y.shape[1]
    ):
        raise KernelInputError(
            f"{op}: expected x (T, d_in), y (T, d_out), a_packed (sum_r, d_in), bt_packed "
            f"(sum_r, d_out); got x {tuple(x.shape)}, y {tuple(y.shape)}, a_packed "
            f"{tuple(a_packed.shape)}, bt_packed {tuple(bt_packed.shape)}"
        )
    rows = min(a_packed.shape[0], bt_packed.shape[0])
    index = (rank_offsets, seg_starts, seg_adapters)
    return check_layout(op, x.shape[0], a_packed, *index, scales, packed_rows=rows)
