"""The CUDA sources compile on a machine without a GPU: the kernel with nvcc for sm_80 and sm_90a
(and its SASS really holds sparse tensor-core MMAs), the torch binding with the C++ compiler."""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from sparse_ofa._ext import CSRC
from sparse_ofa.backends.cuda import NVCC_FLAGS

KERNEL = CSRC / "cuda" / "sp24_int8.cu"
BINDING = CSRC / "cuda" / "sp24_binding.cpp"
NVCC = shutil.which("nvcc")
ARCHES = {"sm_80": "-gencode=arch=compute_80,code=sm_80",
          "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton wheels carry one
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None


def test_build_flags_name_both_targets():
    for flag in ARCHES.values():
        assert flag in NVCC_FLAGS


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: cannot compile-check csrc/cuda")
@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_kernel_compiles_to_sparse_tensor_core_code(arch, tmp_path):
    cubin = tmp_path / f"sp24_{arch}.cubin"
    cmd = [NVCC, "-cubin", "-O3", "-std=c++17", ARCHES[arch], "-Xptxas", "-v", str(KERNEL),
           "-o", str(cubin)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "spill" in done.stderr and " 0 bytes spill stores" in done.stderr, done.stderr
    dump = _cuobjdump()
    if dump is None:
        pytest.skip("no cuobjdump to read the SASS (compiled fine)")
    sass = subprocess.run([dump, "--dump-sass", str(cubin)], capture_output=True, text=True,
                          timeout=120).stdout
    assert "IMMA.SP" in sass, "no sparse tensor-core instruction in the kernel"
    assert "LDGSTS" in sass, "no cp.async (LDGSTS) in the kernel"


def _binding_flags(tmp_path):
    torch_inc = Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME"), Path(NVCC).resolve().parent.parent, "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found: set CUDA_HOME")
    cuda_inc = found[0]
    if not (torch_inc / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    # A CPU-only torch lacks the one header its CMake generates for CUDA builds; an empty stand-in
    # is enough for a syntax check (it only sets export macros).
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return ["-I", str(tmp_path / "stub"), "-I", str(BINDING.parent.parent), "-I", str(torch_inc),
            "-I", str(torch_inc / "torch" / "csrc" / "api" / "include"), "-I", str(cuda_inc),
            "-I", sysconfig.get_paths()["include"]]


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None,
                    reason="needs g++ and the CUDA headers (nvcc) to check the binding")
def test_binding_compiles(tmp_path):
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", *_binding_flags(tmp_path), str(BINDING)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
