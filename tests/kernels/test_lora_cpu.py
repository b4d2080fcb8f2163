"""The plain-torch CPU path against the reference, over popularity patterns, ranks and dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import PATTERNS, TOLERANCE, make_case, pattern_case

from dlora.kernels import lora_apply, lora_expand, lora_shrink


def _run(case, backend):
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    v = lora_shrink(case.x, case.a_packed, *index, backend=backend)
    y_expand = case.y.clone()
    lora_expand(v, case.bt_packed, *index, case.scales, y_expand, backend=backend)
    y_apply = case.y.clone()
    lora_apply(case.x, y_apply, case.a_packed, case.bt_packed, *index, case.scales,
               backend=backend)  # fmt: skip
    return v, y_expand, y_apply


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_path_matches_reference(pattern, dtype):
    case = pattern_case(pattern, dtype=dtype)
    want_v, want_y, _ = _run(case, "reference")
    for got, want in zip(_run(case, "cpu"), (want_v, want_y, want_y), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_default_backend_on_cpu_is_the_cpu_path_and_updates_y_in_place():
    case = pattern_case("skewed")
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    y = case.y.clone()
    storage = y.data_ptr()
    lora_apply(case.x, y, case.a_packed, case.bt_packed, *index, case.scales)
    assert y.data_ptr() == storage
    _, _, want = _run(case, "cpu")
    assert torch.equal(y, want)


def test_cpu_path_takes_strided_views_and_int32_or_int64_indices():
    case = make_case([1, 1, 0, -1, 0], ranks=(16, 8))
    wide_x = torch.cat([case.x, torch.randn_like(case.x)], dim=1)[:, : case.x.shape[1]]
    wide_y = torch.cat([case.y, torch.zeros_like(case.y)], dim=1)
    y_view = wide_y[:, : case.y.shape[1]]
    assert not wide_x.is_contiguous() and not y_view.is_contiguous()
    index = (case.rank_offsets.int(), case.seg_starts.long(), case.seg_adapters.long())
    lora_apply(wide_x, y_view, case.a_packed, case.bt_packed, *index, case.scales)
    want = case.y.clone()
    lora_apply(case.x, want, case.a_packed, case.bt_packed, *index, case.scales,
               backend="reference")  # fmt: skip
    torch.testing.assert_close(y_view, want, **TOLERANCE[torch.float32])
    assert torch.count_nonzero(wide_y[:, case.y.shape[1] :]) == 0


@settings(max_examples=30, deadline=None)
@given(
    per_token=st.lists(st.integers(min_value=-1, max_value=3), min_size=0, max_size=20),
    ranks=st.lists(st.sampled_from([0, 1, 4, 8, 16, 64]), min_size=4, max_size=4),
)
def test_cpu_path_matches_reference_on_random_batches(per_token, ranks):
    case = make_case(per_token, ranks=tuple(ranks), d_in=16, d_out=12)
    for got, want in zip(_run(case, "cpu"), _run(case, "reference"), strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
