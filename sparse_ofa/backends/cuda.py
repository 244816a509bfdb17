"""The CUDA backend: 2:4 sparse INT8 on sparse tensor cores (csrc/cuda/sp24_int8.cu, mma.sp, sm_80+).

Serves "2:4" weights with in_features % 64 == 0 on CUDA devices of compute capability >= 8.0, for many
tokens (M > MIN_M, the compute-bound regime where the halved tensor-core work should pay). Measured
on an H200 it does not beat cuBLASLt int8 at BERT-base shapes (bench/NOTES.md "GPU kernels"), so
backend="auto" (order: triton, cuda, dense) reaches it only where Triton is missing.

The extension is compiled on first use (sparse_ofa/_ext.py) only where torch has CUDA and nvcc is
found. Its ops are torch.ops.sparse_ofa.cuda_sp24_int_mm / cuda_sp24_linear, with fake (meta)
implementations registered here so torch.compile can trace them. On first use the backend also
checks which metadata register layout (csrc/cuda/sp24_int8.h: Sp24MetaMode) reproduces the
reference exactly on this GPU and keeps that one; if neither does, the backend reports itself
unavailable with the reason instead of ever returning a wrong product.
"""
from __future__ import annotations

import os
import shutil

import torch

from ..formats import PackedWeight
from .base import Backend, LayerInfo
from .int8 import quantize_input

MIN_M = 256
TILE_ROWS = 128  # csrc/cuda/sp24_int8.h: kSp24TileRows
TILE_K = 64      # csrc/cuda/sp24_int8.h: kSp24TileK
META_MODES = {"rows": 1, "halves": 0}  # "rows" first: what CUTLASS's int8 metadata order suggests
_PAD_META = 0x44444444  # nibble 0b0100 = positions (0, 1): a valid ordered pair over zero values
_EXTENSION = "sparse_ofa_cuda"
_SOURCES = ["cuda/sp24_int8.cu", "cuda/sp24_binding.cpp"]
NVCC_FLAGS = ["-O3", "-std=c++17",
              "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_90a,code=sm_90a",
              "-gencode=arch=compute_80,code=compute_80"]  # PTX for newer GPUs


def _register_fakes() -> None:
    def int_mm_fake(x_q, values, meta, n, meta_mode):
        return x_q.new_empty((x_q.shape[0], n), dtype=torch.int32)

    def linear_fake(x_q, values, meta, x_scale, w_scale, bias, n, meta_mode, out_dtype):
        return x_q.new_empty((x_q.shape[0], n), dtype=out_dtype)

    for name, fn in (("cuda_sp24_int_mm", int_mm_fake), ("cuda_sp24_linear", linear_fake)):
        try:
            torch.library.register_fake(f"sparse_ofa::{name}")(fn)
        except RuntimeError as exc:  # already registered (module reloaded)
            if "already" not in str(exc):
                raise


def load_ops():
    """Compile (once) and load the extension; returns torch.ops.sparse_ofa. Raises RuntimeError."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise RuntimeError("needs a CUDA build of torch and a CUDA device")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("needs nvcc (CUDA toolkit) to compile csrc/cuda; set CUDA_HOME")
    from .._ext import load_extension

    load_extension(_EXTENSION, _SOURCES, extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS)
    _register_fakes()
    return torch.ops.sparse_ofa


def prepare_sp24(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """The 2:4 layout (kernels/layouts.py:sp24_layout) padded to a multiple of TILE_ROWS rows."""
    from sparse_ofa.kernels.layouts import sp24_layout

    layout = sp24_layout(packed)
    values, meta = layout["values"], layout["meta"]
    n = values.shape[0]
    pad = -n % TILE_ROWS
    if pad:
        values = torch.cat([values, values.new_zeros(pad, values.shape[1])])
        meta = torch.cat([meta, meta.new_full((pad, meta.shape[1]), _PAD_META)])
    # out_features as a CPU scalar: the padded values no longer say it, and reading it never syncs.
    return {"values": values.contiguous(), "meta": meta.contiguous(), "n": torch.tensor(n)}


def find_meta_mode(ops, device) -> int | None:
    """The metadata layout under which the kernel equals the reference on a random 2:4 product."""
    from ..formats import pack, unpack_int8
    from ..masks import magnitude_mask

    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(200, 128, generator=gen)
    w = w * magnitude_mask(w, 0.5, "2:4")
    packed = pack(w, "2:4").to(device)
    x_q = torch.randint(-127, 128, (77, 128), generator=gen, dtype=torch.int8).to(device)
    expected = (x_q.double() @ unpack_int8(packed).double().T).to(torch.int32)
    prepared = prepare_sp24(packed)
    for mode in META_MODES.values():
        got = ops.cuda_sp24_int_mm(x_q, prepared["values"], prepared["meta"], int(prepared["n"]), mode)
        if torch.equal(got, expected):
            return mode
    return None


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def __init__(self):
        self._status: tuple[bool, str] | None = None
        self.meta_mode: int | None = None

    def availability(self):
        if self._status is None:
            self._status = self._check()
        return self._status

    def _check(self) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "needs a CUDA device (torch.cuda.is_available() is False)"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"needs sparse tensor cores (compute capability >= 8.0), got {major}.{minor}"
        try:
            ops = load_ops()
        except Exception as exc:  # noqa: BLE001 - a failed build makes the backend unavailable
            return False, f"CUDA extension unavailable: {type(exc).__name__}: {exc}"
        forced = os.environ.get("SPARSE_OFA_SP24_META_MODE")
        if forced is not None:
            if forced not in META_MODES:
                return False, f"SPARSE_OFA_SP24_META_MODE must be one of {list(META_MODES)}"
            self.meta_mode = META_MODES[forced]
            return True, ""
        self.meta_mode = find_meta_mode(ops, torch.device("cuda"))
        if self.meta_mode is None:
            return False, "the 2:4 kernel did not reproduce the reference product (metadata layout)"
        return True, ""

    def supports(self, device, info: LayerInfo):
        return device.type == "cuda" and info.pattern == "2:4" and info.in_features % TILE_K == 0

    def prefers(self, m: int, info: LayerInfo) -> bool:
        return m > MIN_M

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        return prepare_sp24(packed)

    def int_mm(self, x_q, prepared):
        n = int(prepared["n"])
        return torch.ops.sparse_ofa.cuda_sp24_int_mm(x_q, prepared["values"], prepared["meta"], n,
                                                     self.meta_mode)

    def linear(self, x, prepared, w_scale, bias, act, out_dtype):
        x_q, x_scale = quantize_input(x, act)
        n = w_scale.shape[0]
        return torch.ops.sparse_ofa.cuda_sp24_linear(
            x_q, prepared["values"], prepared["meta"], x_scale, w_scale,
            None if bias is None else bias.to(torch.float32), n, self.meta_mode, out_dtype)
