"""Compiled Triton kernels on a CUDA GPU against the reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from lora_cases import PATTERNS, TOLERANCE, make_case, pattern_case

from dlora.kernels import lora_apply, lora_expand, lora_shrink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _to_cuda(case):
    fields = {name: getattr(case, name) for name in case.__slots__}
    for name in ("x", "y", "a_packed", "bt_packed", "seg_starts", "seg_adapters", "scales"):
        fields[name] = fields[name].cuda()
    return type(case)(**fields)


def _check(case, dtype, backend=None):
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    cpu_case_index = tuple(t.cpu() for t in index)
    want_v = lora_shrink(case.x.cpu(), case.a_packed.cpu(), *cpu_case_index, backend="reference")
    want_y = case.y.cpu().clone()
    lora_expand(want_v, case.bt_packed.cpu(), *cpu_case_index, case.scales.cpu(), want_y,
                backend="reference")  # fmt: skip
    v = lora_shrink(case.x, case.a_packed, *index, backend=backend)
    y = case.y.clone()
    lora_expand(v, case.bt_packed, *index, case.scales, y, backend=backend)
    y_apply = case.y.clone()
    lora_apply(case.x, y_apply, case.a_packed, case.bt_packed, *index, case.scales,
               backend=backend)  # fmt: skip
    assert v.is_cuda and v.dtype == dtype
    torch.testing.assert_close(v.cpu(), want_v, **TOLERANCE[dtype])
    torch.testing.assert_close(y.cpu(), want_y, **TOLERANCE[dtype])
    torch.testing.assert_close(y_apply.cpu(), want_y, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_default_backend_on_cuda_matches_reference(pattern, dtype):
    case = _to_cuda(pattern_case(pattern, dtype=dtype, num_tokens=64, d_in=1024, d_out=768))
    _check(case, dtype)


def test_cuda_data_with_cpu_index_tensors_and_long_prefill():
    per_token = [2] * 700 + [-1] * 30 + [0] * 300 + [1] * 3
    case = _to_cuda(make_case(per_token, ranks=(8, 16, 64), d_in=4096, d_out=1024,
                              dtype=torch.float16))  # fmt: skip
    case_cpu_index = type(case)(
        **{
            **{name: getattr(case, name) for name in case.__slots__},
            "seg_starts": case.seg_starts.cpu(),
            "seg_adapters": case.seg_adapters.cpu(),
        }
    )
    _check(case_cpu_index, torch.float16, backend="triton")


def test_cuda_shrink_split_k_variants_agree():
    from dlora.kernels import triton_lora

    case = _to_cuda(pattern_case("uniform", num_tokens=32, d_in=2048, d_out=256))
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    one = triton_lora.lora_shrink(case.x, case.a_packed, *index, case.max_rank, split_k=1)
    many = triton_lora.lora_shrink(case.x, case.a_packed, *index, case.max_rank, split_k=8)
    torch.testing.assert_close(one, many, **TOLERANCE[torch.float32])
