"""The torch reference against a naive per-token loop, plus segments and input validation."""

from __future__ import annotations

import pytest
import torch
from lora_cases import PATTERNS, make_case, naive_per_token, pattern_case

from dlora.kernels import (
    KernelInputError,
    lora_apply,
    lora_expand,
    lora_shrink,
    make_segments,
)


def _case_args(case):
    return case.rank_offsets, case.seg_starts, case.seg_adapters


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_naive_per_token_loop(pattern):
    case = pattern_case(pattern)
    want_v, want_y = naive_per_token(case)
    v = lora_shrink(case.x, case.a_packed, *_case_args(case), backend="reference")
    y = case.y.clone()
    lora_expand(v, case.bt_packed, *_case_args(case), case.scales, y, backend="reference")
    assert v.shape == (case.x.shape[0], case.max_rank) and v.dtype == case.x.dtype
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)


def test_reference_leaves_tokens_without_adapter_and_pads_with_zeros():
    case = make_case([-1, 0, 0, -1, 1], ranks=(4, 64))
    v = lora_shrink(case.x, case.a_packed, *_case_args(case), backend="reference")
    assert torch.count_nonzero(v[[0, 3]]) == 0
    assert torch.count_nonzero(v[1:3, 4:]) == 0 and torch.count_nonzero(v[1:3, :4]) == 8
    y = case.y.clone()
    lora_apply(case.x, y, case.a_packed, case.bt_packed, *_case_args(case), case.scales,
               backend="reference")  # fmt: skip
    assert torch.equal(y[[0, 3]], case.y[[0, 3]])
    assert not torch.equal(y[[1, 2, 4]], case.y[[1, 2, 4]])


def test_rank_zero_adapter_and_no_adapters_are_no_ops():
    case = make_case([0, 1, 1], ranks=(0, 8))
    y = case.y.clone()
    lora_apply(case.x, y, case.a_packed, case.bt_packed, *_case_args(case), case.scales,
               backend="reference")  # fmt: skip
    assert torch.equal(y[0], case.y[0]) and not torch.equal(y[1:], case.y[1:])
    empty = make_case([-1, -1], ranks=())
    v = lora_shrink(empty.x, empty.a_packed, *_case_args(empty), backend="reference")
    assert v.shape == (2, 0)


def test_make_segments_cuts_runs():
    starts, adapters = make_segments([3, 3, -1, 0, 0, 0, 3])
    assert starts.tolist() == [0, 2, 3, 6, 7] and adapters.tolist() == [3, -1, 0, 3]
    assert starts.dtype == torch.int32 and adapters.dtype == torch.int32
    starts, adapters = make_segments([])
    assert starts.tolist() == [0] and adapters.tolist() == []
    with pytest.raises(KernelInputError, match="-1"):
        make_segments([0, -2])


def _call_shrink(case, **changes):
    args = {
        "x": case.x,
        "a_packed": case.a_packed,
        "rank_offsets": case.rank_offsets,
        "seg_starts": case.seg_starts,
        "seg_adapters": case.seg_adapters,
    }
    args.update(changes)
    return lora_shrink(**args, backend="cpu")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x": torch.zeros(5, 64, dtype=torch.float64)}, "float32, float16 or bfloat16"),
        ({"x": torch.zeros(5, 64, 1)}, "x must be 2-D"),
        ({"a_packed": torch.zeros(92, 32)}, "a_packed must be"),
        ({"a_packed": torch.zeros(92, 64, dtype=torch.float16)}, "a_packed must be"),
        ({"a_packed": torch.zeros(92, 64, device="meta")}, "is on meta"),
        ({"rank_offsets": torch.tensor([0.0, 4.0, 68.0])}, "rank_offsets must have dtype"),
        ({"rank_offsets": torch.tensor([1, 4, 68])}, r"rank_offsets\[0\] must be 0"),
        ({"rank_offsets": torch.tensor([0, 8, 4])}, "never decrease"),
        ({"rank_offsets": torch.tensor([0, 4, 999])}, "exceeds"),
        ({"seg_starts": torch.tensor([0, 2, 3, 4])}, "must equal the number of tokens 5"),
        ({"seg_starts": torch.tensor([0, 5])}, "seg_adapters must have 1 entries"),
        ({"seg_adapters": torch.tensor([0, 2, 1])}, r"\[-1, 2\)"),
        ({"seg_adapters": torch.tensor([0, -3, 1])}, r"\[-1, 2\)"),
    ],
)
def test_shrink_rejects_bad_inputs(changes, message):
    case = make_case([0, 0, -1, 1, 1], ranks=(4, 64))
    with pytest.raises(KernelInputError, match=message):
        _call_shrink(case, **changes)


def test_expand_and_apply_reject_bad_inputs():
    case = make_case([0, 0, -1, 1, 1], ranks=(4, 64))
    index = _case_args(case)
    narrow_v = torch.zeros(5, 8)
    with pytest.raises(KernelInputError, match="fewer than the largest rank 64"):
        lora_expand(narrow_v, case.bt_packed, *index, case.scales, case.y.clone())
    with pytest.raises(KernelInputError, match="scales must have 2 entries"):
        lora_expand(torch.zeros(5, 64), case.bt_packed, *index, torch.ones(3), case.y.clone())
    with pytest.raises(KernelInputError, match="share one dtype"):
        lora_expand(torch.zeros(5, 64), case.bt_packed, *index, case.scales, case.y.half())
    with pytest.raises(KernelInputError, match="share one dtype"):
        lora_apply(case.x, case.y.half(), case.a_packed, case.bt_packed, *index, case.scales)
    with pytest.raises(KernelInputError, match="backend must be one of"):
        lora_apply(case.x, case.y.clone(), case.a_packed, case.bt_packed, *index, case.scales,
                   backend="cuda")  # fmt: skip
    with pytest.raises(KernelInputError, match="max_rank=8 is below the largest rank 64"):
        lora_shrink(case.x, case.a_packed, *index, max_rank=8)
    assert issubclass(KernelInputError, ValueError)
