"""Compile the LoRA Triton kernels for a CUDA target without a GPU (front end to cubin).

Run as a script (``python tests/kernels/triton_compile_check.py fp16 bf16 fp32``) in a process
where TRITON_INTERPRET is unset; prints one line per kernel variant and exits non-zero on the
first compile error. It catches what the interpreter cannot: code the Triton compiler rejects.
"""

from __future__ import annotations

import inspect
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dlora.kernels import triton_lora  # noqa: E402


def _compile(fn, types: dict[str, str], constexprs: dict[str, object], target: GPUTarget):
    names = inspect.signature(fn).parameters
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    return triton.compile(ASTSource(triton.jit(fn), signature, constexprs), target=target)


def main(dtypes: list[str], arch: int = 90) -> None:
    target = GPUTarget("cuda", arch, 32)
    for dtype in dtypes:
        upcast = dtype == "fp32"
        for atomic in (False, True):
            types = {
                "x_ptr": f"*{dtype}",
                "a_ptr": f"*{dtype}",
                "v_ptr": "*fp32" if atomic else f"*{dtype}",
                "rank_offsets_ptr": "*i64",
                "seg_starts_ptr": "*i32",
                "seg_adapters_ptr": "*i32",
            }
            constexprs = {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 128, "ATOMIC": atomic}
            constexprs["UPCAST"] = upcast
            kernel = _compile(triton_lora._shrink_kernel, types, constexprs, target)
            print(f"shrink {dtype} atomic={atomic}: cubin {len(kernel.asm['cubin'])} bytes")
        types = {
            "v_ptr": f"*{dtype}",
            "bt_ptr": f"*{dtype}",
            "y_ptr": f"*{dtype}",
            "rank_offsets_ptr": "*i32",
            "seg_starts_ptr": "*i64",
            "seg_adapters_ptr": "*i64",
            "scales_ptr": "*fp32",
        }
        constexprs = {"BLOCK_M": 16, "BLOCK_R": 64, "BLOCK_N": 128, "UPCAST": upcast}
        kernel = _compile(triton_lora._expand_kernel, types, constexprs, target)
        print(f"expand {dtype}: cubin {len(kernel.asm['cubin'])} bytes")


if __name__ == "__main__":
    main(sys.argv[1:] or ["fp16", "bf16", "fp32"])
