"""Triton kernels against the reference on CPU, under Triton's interpreter (small shapes: slow).

The interpreter must be chosen before triton is first imported. When this module is the first
to import it (the usual case on a machine without CUDA) it sets ``TRITON_INTERPRET=1`` and the
tests run here; when triton was already imported in compiled mode (another test got there
first, or CUDA is present), ``test_interpreter_tests_in_a_subprocess`` reruns this file in a
fresh interpreter-mode process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton_lora = pytest.importorskip("dlora.kernels.triton_lora")

from lora_cases import PATTERNS, TOLERANCE, make_case, pattern_case  # noqa: E402

from dlora.kernels import KernelInputError, lora_apply, lora_expand, lora_shrink  # noqa: E402

IN_PROCESS = triton_lora.interpreter_active()
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="triton runs compiled here; the subprocess test covers these"
)


def _run(case, backend):
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    v = lora_shrink(case.x, case.a_packed, *index, backend=backend)
    y_expand = case.y.clone()
    lora_expand(v, case.bt_packed, *index, case.scales, y_expand, backend=backend)
    y_apply = case.y.clone()
    lora_apply(case.x, y_apply, case.a_packed, case.bt_packed, *index, case.scales,
               backend=backend)  # fmt: skip
    return v, y_expand, y_apply


def _assert_matches(case, dtype):
    """One Triton run against the reference, and against the CPU path for good measure."""
    got = _run(case, "triton")
    want_v, want_y, _ = _run(case, "reference")
    _, _, cpu_y = _run(case, "cpu")
    for result, want in zip(got, (want_v, want_y, want_y), strict=True):
        assert result.dtype == dtype
        torch.testing.assert_close(result, want, **TOLERANCE[dtype])
    torch.testing.assert_close(got[2], cpu_y, **TOLERANCE[dtype])


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS)
def test_triton_matches_reference_and_cpu_float32(pattern):
    _assert_matches(pattern_case(pattern, num_tokens=16), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("pattern", ["uniform", "some_none"])
def test_triton_matches_reference_bfloat16(pattern):
    _assert_matches(pattern_case(pattern, dtype=torch.bfloat16, num_tokens=16), torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("split_k", [1, 3])
def test_triton_shrink_split_k_and_token_lanes(split_k):
    """d_in not a multiple of the K block; a 37-token segment spans several token blocks."""
    case = pattern_case("prefill", d_in=300, d_out=40, ranks=(16, 4, 8))
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    v = triton_lora.lora_shrink(case.x, case.a_packed, *index, case.max_rank, split_k=split_k)
    want = lora_shrink(case.x, case.a_packed, *index, backend="reference")
    torch.testing.assert_close(v, want, **TOLERANCE[torch.float32])


@needs_interpreter
def test_triton_handles_rank_zero_empty_batches_and_views():
    case = make_case([0, 1, 1, -1, 2], ranks=(0, 8, 64))
    _assert_matches(case, torch.float32)
    empty = make_case([], ranks=(4,))
    assert lora_shrink(empty.x, empty.a_packed, empty.rank_offsets, empty.seg_starts,
                       empty.seg_adapters, backend="triton").shape == (0, 4)  # fmt: skip
    wide_y = torch.cat([case.y, torch.zeros_like(case.y)], dim=1)
    y_view = wide_y[:, : case.y.shape[1]]
    index = (case.rank_offsets, case.seg_starts, case.seg_adapters)
    lora_apply(case.x, y_view, case.a_packed, case.bt_packed, *index, case.scales,
               backend="triton")  # fmt: skip
    _, _, want = _run(case, "reference")
    torch.testing.assert_close(y_view, want, **TOLERANCE[torch.float32])
    assert torch.count_nonzero(wide_y[:, case.y.shape[1] :]) == 0


@pytest.mark.skipif(IN_PROCESS, reason="the interpreter tests ran in this process")
def test_interpreter_tests_in_a_subprocess():
    if os.environ.get("DLORA_TRITON_SUBPROCESS"):
        pytest.fail("the subprocess could not turn Triton's interpreter on")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DLORA_TRITON_SUBPROCESS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.mark.skipif(IN_PROCESS, reason="only meaningful when triton runs compiled")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("compiled triton with CUDA: CPU tensors are not the default path")
    case = make_case([0, 0], ranks=(4,))
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET=1"):
        lora_shrink(case.x, case.a_packed, case.rank_offsets, case.seg_starts,
                    case.seg_adapters, backend="triton")  # fmt: skip


def test_kernels_compile_for_a_cuda_target_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile to sm_90 cubin in a subprocess."""
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, script, "bf16", "fp32"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("cubin") == 6
