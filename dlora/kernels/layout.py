"""Batch layout of the LoRA kernels: segments, packed adapters, and input validation.

A batch of ``T`` tokens is cut into ``S`` segments of contiguous tokens; segment ``s`` covers
tokens ``seg_starts[s] : seg_starts[s + 1]`` and uses packed adapter ``seg_adapters[s]``
(``-1``: no LoRA). The ``K`` adapters are packed row-wise: adapter ``k`` owns rows
``rank_offsets[k] : rank_offsets[k + 1]`` (its rank ``r_k`` is the difference) of ``a_packed``
and ``bt_packed``. Every backend shares the checks here, so a bad call fails the same way
everywhere (PAPER.md section 1, unmerged mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlora.errors import DloraError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class KernelInputError(DloraError, ValueError):
    """A LoRA kernel got tensors of the wrong shape, dtype or device, or a bad batch layout."""


@dataclass(frozen=True, slots=True)
class HostIndex:
    """The index tensors as Python lists (read once per call by the CPU and reference paths)."""

    rank_offsets: list[int]
    seg_starts: list[int]
    seg_adapters: list[int]

    @classmethod
    def of(cls, rank_offsets: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor):
        return cls(rank_offsets.tolist(), seg_starts.tolist(), seg_adapters.tolist())

    @property
    def max_rank(self) -> int:
        """Largest ``r_k`` (0 without adapters)."""
        offsets = self.rank_offsets
        return max((b - a for a, b in zip(offsets, offsets[1:], strict=False)), default=0)

    def segments(self) -> list[tuple[int, int, int, int, int]]:
        """``(token_start, token_end, adapter, row_start, row_end)`` of non-empty LoRA segments."""
        offsets, starts = self.rank_offsets, self.seg_starts
        return [
            (starts[seg], starts[seg + 1], k, offsets[k], offsets[k + 1])
            for seg, k in enumerate(self.seg_adapters)
            if k >= 0 and starts[seg + 1] > starts[seg] and offsets[k + 1] > offsets[k]
        ]


@dataclass(frozen=True, slots=True)
class Layout:
    """Sizes read from the tensors' shapes; ``host`` holds the index values when they were
    on the CPU (and so were checked)."""

    num_tokens: int
    num_segments: int
    num_adapters: int
    host: HostIndex | None


def make_segments(
    adapter_per_token: Sequence[int] | torch.Tensor, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a batch into runs of equal adapter index.

    ``adapter_per_token[t]`` is the packed adapter index of token ``t`` (``-1``: none). Returns
    ``(seg_starts, seg_adapters)``: int32 tensors of shapes ``(S + 1,)`` and ``(S,)`` where
    segment ``s`` is the maximal run ``seg_starts[s] : seg_starts[s + 1]`` of one index
    ``seg_adapters[s]``. An empty batch gives ``([0], [])``.
    """
    per_token = torch.as_tensor(adapter_per_token, dtype=torch.int64, device="cpu").reshape(-1)
    if per_token.numel() and int(per_token.min()) < -1:
        raise KernelInputError(
            "make_segments: adapter indices must be >= 0, or -1 for tokens without LoRA; "
            f"got {int(per_token.min())}"
        )
    num_tokens = per_token.numel()
    if num_tokens == 0:
        seg_starts = torch.zeros(1, dtype=torch.int64)
        seg_adapters = torch.zeros(0, dtype=torch.int64)
    else:
        change = torch.nonzero(per_token[1:] != per_token[:-1]).reshape(-1) + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), change])
        seg_adapters = per_token[starts]
        seg_starts = torch.cat([starts, torch.tensor([num_tokens])])
    return (
        seg_starts.to(device=device, dtype=torch.int32),
        seg_adapters.to(device=device, dtype=torch.int32),
    )


def _fail(op: str, message: str) -> KernelInputError:
    return KernelInputError(f"{op}: {message}")


def check_float_matrix(op: str, name: str, tensor: object, device: torch.device | None) -> None:
    """A 2-D float32/float16/bfloat16 tensor (on ``device`` if given)."""
    if not isinstance(tensor, torch.Tensor):
        raise _fail(op, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise _fail(op, f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise _fail(op, f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise _fail(op, f"{name} is on {tensor.device}, expected {device} like the activations")


def _check_vector(
    op: str, name: str, tensor: object, length: int | None, device: torch.device, dtypes: tuple
) -> int:
    if not isinstance(tensor, torch.Tensor):
        raise _fail(op, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        raise _fail(op, f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise _fail(op, f"{name} must have dtype {allowed}, got {tensor.dtype}")
    if tensor.device.type != "cpu" and tensor.device != device:
        raise _fail(op, f"{name} is on {tensor.device}; put it on the CPU or on {device}")
    if length is not None and tensor.shape[0] != length:
        raise _fail(op, f"{name} must have {length} entries, got {tensor.shape[0]}")
    return int(tensor.shape[0])


def check_layout(
    op: str,
    num_tokens: int,
    packed: torch.Tensor,
    rank_offsets: object,
    seg_starts: object,
    seg_adapters: object,
    scales: object = None,
    *,
    packed_rows: int | None = None,
) -> Layout:
    """Check the index tensors against each other and return the sizes.

    Shapes and dtypes are always checked. Values (offsets start at 0 and never decrease, the
    segments cover exactly ``num_tokens`` tokens, adapter indices are in ``[-1, K)``) are
    checked when the index tensors are on the CPU; on a GPU that would force a device sync
    per call, so pass CPU index tensors while debugging. ``packed_rows`` defaults to
    ``packed.shape[0]``.
    """
    device = packed.device
    num_offsets = _check_vector(op, "rank_offsets", rank_offsets, None, device, INDEX_DTYPES)
    num_starts = _check_vector(op, "seg_starts", seg_starts, None, device, INDEX_DTYPES)
    if num_offsets < 1:
        raise _fail(op, "rank_offsets needs K + 1 >= 1 entries (it starts with 0)")
    if num_starts < 1:
        raise _fail(op, "seg_starts needs S + 1 >= 1 entries (it starts with 0)")
    num_segments, num_adapters = num_starts - 1, num_offsets - 1
    _check_vector(op, "seg_adapters", seg_adapters, num_segments, device, INDEX_DTYPES)
    if scales is not None:
        _check_vector(op, "scales", scales, num_adapters, device, FLOAT_DTYPES)
    assert isinstance(rank_offsets, torch.Tensor)
    assert isinstance(seg_starts, torch.Tensor) and isinstance(seg_adapters, torch.Tensor)
    rows = int(packed.shape[0]) if packed_rows is None else packed_rows
    offsets = starts = adapters = None
    if rank_offsets.device.type == "cpu":
        offsets = rank_offsets.tolist()
        _check_offsets(op, "rank_offsets", offsets, rows, exact=False)
    if seg_starts.device.type == "cpu":
        starts = seg_starts.tolist()
        _check_offsets(op, "seg_starts", starts, num_tokens, exact=True)
    if seg_adapters.device.type == "cpu":
        adapters = seg_adapters.tolist()
        low, high = min(adapters, default=0), max(adapters, default=0)
        if low < -1 or high >= num_adapters:
            raise _fail(
                op,
                f"seg_adapters must lie in [-1, {num_adapters}) (K = len(rank_offsets) - 1)"
                f", got values in [{low}, {high}]",
            )
    host = None
    if offsets is not None and starts is not None and adapters is not None:
        host = HostIndex(offsets, starts, adapters)
    return Layout(num_tokens, num_segments, num_adapters, host)


def _check_offsets(op: str, name: str, values: list[int], total: int, *, exact: bool) -> None:
    if values[0] != 0:
        raise _fail(op, f"{name}[0] must be 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        raise _fail(op, f"{name} must never decrease, got {values}")
    if exact and values[-1] != total:
        raise _fail(op, f"{name}[-1] must equal the number of tokens {total}, got {values[-1]}")
    if not exact and values[-1] > total:
        raise _fail(op, f"{name}[-1] = {values[-1]} exceeds the {total} packed rows")


def max_rank_of(rank_offsets: torch.Tensor) -> int:
    """Largest ``r_k`` over the packed adapters (0 when there are none); syncs if on a GPU."""
    if rank_offsets.shape[0] < 2:
        return 0
    return int((rank_offsets[1:] - rank_offsets[:-1]).max())
