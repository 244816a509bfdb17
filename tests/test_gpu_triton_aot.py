"""The Triton kernels compile ahead of time for real GPUs, without one: int8 wgmma on Hopper (sm_90),
int8 mma.sync on Ampere (sm_80; Triton picks the .satfinite form, which only differs on int32
overflow, impossible below formats.MAX_IN_FEATURES). Catches lowering errors the interpreter cannot
see."""
import importlib
import os
import re
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

COMMON = {"x_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "M": "i32",
          "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32"}


def _compiled_modules():
    """Fresh, non-interpreted copies of the kernel modules (TRITON_INTERPRET unset meanwhile)."""
    names = ["sparse_ofa.kernels.epilogue", "sparse_ofa.kernels.bitmap_int8",
             "sparse_ofa.kernels.block_int8"]
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        for n in names:
            sys.modules.pop(n, None)
        return [importlib.import_module(n) for n in names]
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def _mma_ops(kernel, signature, constexprs, capability, warps):
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": warps, "num_stages": 3, "enable_fp_fusion": False})
    return set(re.findall(r"(wgmma\.mma_async[a-z_.0-9]*|mma\.sync[a-z_.0-9]*)", compiled.asm["ptx"]))


@pytest.mark.parametrize("capability,expect", [(90, "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"),
                                               (80, "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32")])
def test_bitmap_kernel_lowers_to_int8_tensor_cores(capability, expect):
    _, bitmap, _ = _compiled_modules()
    sig = {**COMMON, "bits_ptr": "*u8", "vals_ptr": "*i8", "offs_ptr": "*i32", "out_ptr": "*fp16",
           "KT": "i32", "SPLIT_K": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
           "ATOMIC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"EPILOGUE": True, "HAS_BIAS": True, "ATOMIC": False, "BLOCK_M": 64, "BLOCK_N": 64,
              "BLOCK_K": 128}
    assert expect in _mma_ops(bitmap.bitmap_int8_kernel, sig, consts, capability, 4)


@pytest.mark.parametrize("capability,expect", [(90, "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"),
                                               (80, "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32")])
def test_block_kernel_lowers_to_int8_tensor_cores(capability, expect):
    _, _, block = _compiled_modules()
    sig = {**COMMON, "w_ptr": "*i8", "tile_ptr": "*i32", "tile_k": "*i32", "out_ptr": "*i32",
           "stride_wn": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}
    consts = {"EPILOGUE": False, "HAS_BIAS": False, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64,
              "GROUP_M": 8}
    assert expect in _mma_ops(block.block_int8_kernel, sig, consts, capability, 8)
