"""The Triton kernels compile ahead of time for real GPUs, without one: int8 wgmma on Hopper (sm_90),
int8 mma.sync on Ampere (sm_80; Triton picks the .satfinite form, which only differs on int32
overflow, impossible below formats.MAX_IN_FEATURES); IEEE division and no FMA where numerics need
it; every autotune config compiles for sm_90 without spilling. Catches lowering errors the
interpreter cannot see. Compiles in one subprocess: compiling and interpreting Triton kernels in one
process interfere."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

_COMPILE = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparse_ofa.kernels.bitmap_int8 import bitmap_int8_kernel
from sparse_ofa.kernels.block_int8 import block_int8_kernel
from sparse_ofa.kernels.quantize import quantize_rows_kernel
from sparse_ofa.kernels.dequantize import dequantize_kernel

common = {"x_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "M": "i32",
          "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32"}
kernels = {
    "bitmap": (bitmap_int8_kernel,
               {**common, "bits_ptr": "*u8", "vals_ptr": "*i8", "offs_ptr": "*i32", "out_ptr": "*fp16",
                "KT": "i32", "SPLIT_K": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
                "ATOMIC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_K": "constexpr", "QUANT_X": "constexpr"},
               {"EPILOGUE": True, "HAS_BIAS": True, "ATOMIC": False, "BLOCK_M": 64, "BLOCK_N": 64,
                "BLOCK_K": 128, "QUANT_X": False}),
    "block": (block_int8_kernel,
              {**common, "w_ptr": "*i8", "tile_ptr": "*i32", "tile_k": "*i32", "out_ptr": "*fp16",
               "stride_wn": "i32", "EPILOGUE": "constexpr", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
               "GROUP_M": "constexpr"},
              {"EPILOGUE": True, "HAS_BIAS": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64,
               "GROUP_M": 8}),
    "bitmap_quant": (bitmap_int8_kernel,
                     {**common, "x_ptr": "*fp16", "bits_ptr": "*u8", "vals_ptr": "*i8", "offs_ptr": "*i32",
                      "out_ptr": "*fp16", "KT": "i32", "SPLIT_K": "i32", "EPILOGUE": "constexpr",
                      "HAS_BIAS": "constexpr", "ATOMIC": "constexpr", "BLOCK_M": "constexpr",
                      "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "QUANT_X": "constexpr"},
                     {"EPILOGUE": True, "HAS_BIAS": True, "ATOMIC": False, "BLOCK_M": 64, "BLOCK_N": 64,
                      "BLOCK_K": 128, "QUANT_X": True}),
    "quantize": (quantize_rows_kernel,
                 {"x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                  "stride_qm": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "dequantize": (dequantize_kernel,
                   {"acc_ptr": "*i32", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
                    "out_ptr": "*bf16", "M": "i32", "N": "i32", "HAS_BIAS": "constexpr",
                    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                   {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 128}),
}
results = []
for job in json.loads(sys.argv[1]):
    fn, sig, consts = kernels[job["kernel"]]
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={**consts, **job["constexprs"]}),
                              target=GPUTarget("cuda", job["capability"], 32),
                              options={"num_warps": job["num_warps"], "num_stages": job["num_stages"],
                                       "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    if job.get("cubin"):
        open(job["cubin"], "wb").write(compiled.asm["cubin"])
    results.append({
        "ops": sorted(set(re.findall(r"(wgmma\.mma_async[a-z_.0-9]*|mma\.sync[a-z_.0-9]*)", ptx))),
        "fma": len(re.findall(r"\bfma\.rn\.f32", ptx)),
        "divs": sorted(set(re.findall(r"\b(?:div|rcp)\.[a-z]+(?:\.ftz)?\.f32", ptx))),
        "rounding": [bool(re.search(r"add\.rn\.f32.*0f4B400000", ptx)),
                     bool(re.search(r"add\.rn\.f32.*0fCB400000", ptx))],
    })
print(json.dumps(results))
'''

HOPPER = "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"
AMPERE = "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"
# every division in the quantizer IEEE round-to-nearest (1 / amax may lower to rcp.rn)
IEEE_DIV = ["div.rn.f32"]


def _compile(jobs: list[dict]) -> list[dict]:
    jobs = [{"constexprs": {}, "num_warps": 4, "num_stages": 3, **job} for job in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_lower_to_int8_tensor_cores_without_fma():
    jobs = [{"kernel": k, "capability": cap, "num_warps": 8 if k == "block" else 4}
            for k in ("bitmap", "bitmap_quant", "block") for cap in (90, 80)]
    for job, found in zip(jobs, _compile(jobs)):
        assert (HOPPER if job["capability"] == 90 else AMPERE) in found["ops"], (job, found)
        # The epilogue must not contract mul + add into an FMA (bit-exactness with torch).
        assert found["fma"] == 0, (job, found)
        if job["kernel"] == "bitmap_quant":  # the in-kernel quantizer keeps IEEE division/rounding
            assert found["divs"] == IEEE_DIV and found["rounding"] == [True, True], found


def test_dequantize_kernel_has_no_fma():
    for found in _compile([{"kernel": "dequantize", "capability": cap} for cap in (90, 80)]):
        assert found["fma"] == 0, found


def test_quantize_kernel_keeps_ieee_division_and_rounding():
    for found in _compile([{"kernel": "quantize", "capability": cap} for cap in (90, 80)]):
        assert found["divs"] == IEEE_DIV, found           # no approximate division
        assert found["rounding"] == [True, True], found    # (v + 1.5*2^23) - 1.5*2^23 not folded
        assert found["fma"] == 0, found


def _cuobjdump():
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or (str(bundled) if bundled.exists() else None)


def test_autotune_configs_compile_for_hopper_without_spills(tmp_path):
    from sparse_ofa.kernels import bitmap_int8, block_int8

    dump = _cuobjdump()
    if dump is None:
        pytest.skip("no cuobjdump to read register/stack usage")
    jobs = [{"kernel": kernel, "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn}, "num_warps": w,
             "num_stages": st} for bm, bn, w, st in bitmap_int8._CONFIGS
            for kernel in ("bitmap", "bitmap_quant")]
    jobs += [{"kernel": "block", "constexprs": {"BLOCK_M": bm}, "num_warps": w, "num_stages": st}
             for bm, w, st in block_int8._CONFIGS]
    for i, job in enumerate(jobs):
        job.update(capability=90, cubin=str(tmp_path / f"k{i}.cubin"))
    _compile(jobs)
    for job in jobs:
        usage = subprocess.run([dump, "-res-usage", job["cubin"]], capture_output=True, text=True).stdout
        stack = re.search(r"STACK:(\d+)", usage)
        assert stack is not None, usage
        assert int(stack.group(1)) == 0, f"{job} spills to the stack: {usage}"
