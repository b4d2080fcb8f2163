"""Readable torch reference of the batched LoRA ops: the definition the fast paths must match.

Unmerged LoRA (PAPER.md section 1) adds ``s_k * B_k (A_k x)`` to the base output ``W x`` of every
token, with ``k`` the token's adapter. Tokens are grouped in segments of one adapter each (see
``dlora.kernels.layout``). Everything is computed in float32 and rounded once to the output
dtype; no work is spent on ranks above ``r_k`` (no padding to the largest rank).
"""

from __future__ import annotations

import torch


def _segments(rank_offsets: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor):
    """Yield ``(token_start, token_end, adapter, row_start, row_end)`` for LoRA segments."""
    offsets = rank_offsets.tolist()
    starts = seg_starts.tolist()
    for seg, adapter in enumerate(seg_adapters.tolist()):
        if adapter < 0:
            continue
        yield starts[seg], starts[seg + 1], adapter, offsets[adapter], offsets[adapter + 1]


def lora_shrink(
    x: torch.Tensor,
    a_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """``v[t, :r_k] = x[t] @ A_k^T`` for each token ``t`` of a segment of adapter ``k``.

    Shapes: ``x (T, d_in)``, ``a_packed (sum_r, d_in)``; returns ``v (T, max_rank)`` in
    ``x.dtype``, zero outside ``[:, :r_k]`` and on tokens without an adapter.
    """
    v = torch.zeros(x.shape[0], max_rank, dtype=x.dtype, device=x.device)
    for start, end, _, row_start, row_end in _segments(rank_offsets, seg_starts, seg_adapters):
        a_k = a_packed[row_start:row_end].float()
        v[start:end, : row_end - row_start] = (x[start:end].float() @ a_k.T).to(x.dtype)
    return v


def lora_expand(
    v: torch.Tensor,
    bt_packed: torch.Tensor,
    rank_offsets: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """``y[t] += scales[k] * v[t, :r_k] @ B_k^T`` in place, for each token ``t`` of adapter ``k``.

    Shapes: ``v (T, >= max r_k)``, ``bt_packed (sum_r, d_out)`` (rows of adapter ``k`` hold
    ``B_k^T (r_k, d_out)``), ``scales (K,)``, ``y (T, d_out)``. The sum is formed in float32
    (``y`` read as float32 too) and rounded once to ``y.dtype``.
    """
    scale_list = scales.tolist()
    for start, end, adapter, row_start, row_end in _segments(
        rank_offsets, seg_starts, seg_adapters
    ):
        rank = row_end - row_start
        delta = v[start:end, :rank].float() @ bt_packed[row_start:row_end].float()
        updated = y[start:end].float() + float(scale_list[adapter]) * delta
        y[start:end] = updated.to(y.dtype)
