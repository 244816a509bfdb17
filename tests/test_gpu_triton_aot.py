"""The Triton kernels compile ahead of time for real GPUs, without one: int8 wgmma on Hopper (sm_90),
int8 mma.sync on Ampere (sm_80; Triton picks the .satfinite form, which only differs on int32
overflow, impossible below formats.MAX_IN_FEATURES). Catches lowering errors the interpreter cannot
see. Runs in a subprocess: compiling and interpreting Triton kernels in one process interfere."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparse_ofa.kernels.bitmap_int8 import bitmap_int8_kernel
from sparse_ofa.kernels.block_int8 import block_int8_kernel
from sparse_ofa.kernels.quantize import quantize_rows_kernel

common = {"x_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "M": "i32",
          "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32"}
kernels = {
    "bitmap": (bitmap_int8_kernel,
               {**common, "bits_ptr": "*u8", "vals_ptr": "*i8", "offs_ptr": "*i32", "out_ptr": "*fp16",
                "KT": "i32", "SPLIT_K": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
                "ATOMIC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_K": "constexpr"},
               {"EPILOGUE": True, "HAS_BIAS": True, "ATOMIC": False, "BLOCK_M": 64, "BLOCK_N": 64,
                "BLOCK_K": 128}, 4),
    "block": (block_int8_kernel,
              {**common, "w_ptr": "*i8", "tile_ptr": "*i32", "tile_k": "*i32", "out_ptr": "*i32",
               "stride_wn": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
               "GROUP_M": "constexpr"},
              {"EPILOGUE": False, "HAS_BIAS": False, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64,
               "GROUP_M": 8}, 8),
    "quantize": (quantize_rows_kernel,
                 {"x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                  "stride_qm": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4),
}
fn, sig, consts, warps = kernels[sys.argv[1]]
compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", int(sys.argv[2]), 32),
                          options={"num_warps": warps, "num_stages": 3, "enable_fp_fusion": False})
ptx = compiled.asm["ptx"]
ops = sorted(set(re.findall(r"(wgmma\.mma_async[a-z_.0-9]*|mma\.sync[a-z_.0-9]*)", ptx)))
fma = len(re.findall(r"\bfma\.rn\.f32", ptx))
divs = sorted(set(re.findall(r"\bdiv\.[a-z]+\.f32", ptx)))
rounding = [bool(re.search(r"add\.rn\.f32.*0f4B400000", ptx)), bool(re.search(r"add\.rn\.f32.*0fCB400000", ptx))]
print(json.dumps({"ops": ops, "fma": fma, "divs": divs, "rounding": rounding}))
'''

HOPPER = "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"
AMPERE = "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"


def _compile(kernel: str, capability: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, kernel, str(capability)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["bitmap", "block"])
@pytest.mark.parametrize("capability,expect", [(90, HOPPER), (80, AMPERE)])
def test_kernel_lowers_to_int8_tensor_cores(kernel, capability, expect):
    found = _compile(kernel, capability)
    assert expect in found["ops"], found
    # The epilogue must not contract mul + add into an FMA (bit-exactness with torch).
    assert found["fma"] == 0, found


@pytest.mark.parametrize("capability", [90, 80])
def test_quantize_kernel_keeps_ieee_division_and_rounding(capability):
    found = _compile("quantize", capability)
    assert found["divs"] == ["div.rn.f32"], found      # no approximate division
    assert found["rounding"] == [True, True], found    # (v + 1.5*2^23) - 1.5*2^23 not folded
    assert found["fma"] == 0, found
