"""Fast plain-torch path of the batched LoRA ops (CPU, or any device without Triton).

One BLAS call per segment on views of the packed weights (no copies, no per-token Python, no
padding to the largest rank); ``addmm_`` adds the scaled product straight into the base output.
Semantics are those of ``dlora.kernels.reference`` (PAPER.md section 1, unmerged mode); the
matmuls run in the tensors' dtype (torch's CPU kernels accumulate half types in float32).
"""

from __future__ import annotations

import torch

from dlora.kernels.layout import HostIndex


def lora_shrink(
    x: torch.Tensor, a_packed: torch.Tensor, index: HostIndex, max_rank: int
) -> torch.Tensor:
    """``v[t, :r_k] = x[t] @ A_k^T``; ``x (T, d_in)`` -> ``v (T, max_rank)`` in ``x.dtype``."""
    v = torch.zeros(x.shape[0], max_rank, dtype=x.dtype, device=x.device)
    for start, end, _, row_start, row_end in index.segments():
        rank = row_end - row_start
        torch.mm(x[start:end], a_packed[row_start:row_end].t(), out=v[start:end, :rank])
    return v


def lora_expand(
    v: torch.Tensor,
    bt_packed: torch.Tensor,
    index: HostIndex,
    scales: list[float],
    y: torch.Tensor,
) -> None:
    """``y[t] += scales[k] * v[t, :r_k] @ B_k^T`` in place; ``y (T, d_out)``."""
    for start, end, adapter, row_start, row_end in index.segments():
        y[start:end].addmm_(
            v[start:end, : row_end - row_start],
            bt_packed[row_start:row_end],
            alpha=scales[adapter],
        )


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    a_packed: torch.Tensor,
    bt_packed: torch.Tensor,
    index: HostIndex,
    scales: list[float],
) -> None:
    """Shrink and expand fused per segment: ``y[t] += scales[k] * (x[t] @ A_k^T) @ B_k^T``."""
    for start, end, adapter, row_start, row_end in index.segments():
        v = torch.mm(x[start:end], a_packed[row_start:row_end].t())
        y[start:end].addmm_(v, bt_packed[row_start:row_end], alpha=scales[adapter])
