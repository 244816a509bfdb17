"""The `cpu` backend: sparse-INT8 kernels in C++ (csrc/cpu/), exposed as torch.ops.sparse_ofa.cpu_*.

prepare() derives the kernel layout "quads v1" from packed format v1, once per module:
each output row keeps the aligned input-channel quads (k = 4q..4q+3) that hold a non-zero weight,
as one int32 of 4 int8 weights plus the quad index (see csrc/cpu/sparse_cpu.h). For "1x4" weights
the kept quads are exactly the kept blocks; for "unstructured"/"2:4" weights a quad with any
non-zero weight is kept, with zeros inside (VNNI does 4 products per lane regardless).

The fused linear quantizes activations per token (or with the static QAT scale) exactly as
sparse_ofa/quant.py does, multiplies with vpdpbusd (AVX-512 VNNI / AVX-VNNI) or an exact vpmaddwd
form (AVX2) or plain C++ (any CPU), and applies the epilogue (x_scale * w_scale, bias, fp32/bf16) in
the kernel. Threads: torch's pool (at::parallel_for), so torch.set_num_threads applies.

ISA: the best the CPU runs, or the one named by SPARSE_OFA_CPU_ISA (scalar, avx2, avxvnni,
avx512vnni) if this CPU runs it.

Dispatch (`prefers`): sparse wins when the VNNI work it keeps, the fraction of kept quads, is small
enough against dense INT8 (`torch._int_mm`); see `prefers` and docs/cpu_kernels.md for the measured
thresholds.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..formats import PackedWeight, unpack_int8
from ..quant import ActQuant
from .base import Backend, LayerInfo

EXTENSION = "sparse_ofa_cpu"
SOURCES = ["sparse_ofa_cpu.cpp", "cpu/dispatch.cpp", "cpu/scalar.cpp", "cpu/avx2.cpp", "cpu/avxvnni.cpp",
           "cpu/avx512.cpp"]
# -ffp-contract=off: the epilogue must round like the reference ((acc * xs) * ws + b, no FMA).
# -fopenmp: at::parallel_for is inline OpenMP in the ATen headers; without the flag its pragma is
# ignored and every kernel runs on one thread (the OpenMP runtime is torch's own, already loaded).
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
LAYOUT_VERSION = 1
ISAS = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}
ISA_NAMES = {v: k for k, v in ISAS.items()}

_state: dict[str, object] = {}


def load() -> None:
    """Build (first use, cached) and load the extension, and register its fake kernels."""
    if "loaded" in _state:
        return
    from .._ext import load_extension

    # extra flags, e.g. the sanitizer build of scripts/asan_cpu.sh (use with its own TORCH_EXTENSIONS_DIR)
    cflags = CFLAGS + os.environ.get("SPARSE_OFA_CPU_CFLAGS", "").split()
    ldflags = LDFLAGS + os.environ.get("SPARSE_OFA_CPU_LDFLAGS", "").split()
    load_extension(EXTENSION, SOURCES, extra_cflags=cflags, extra_ldflags=ldflags)
    _register_fakes()
    _state["loaded"] = True


def best_isa() -> str:
    load()
    return ISA_NAMES[int(torch.ops.sparse_ofa.cpu_isa())]


def isa_code(name: str | None = None) -> int:
    """ISA code for the kernels: `name`, else $SPARSE_OFA_CPU_ISA, else -1 (the best available)."""
    name = name or os.environ.get("SPARSE_OFA_CPU_ISA", "")
    if not name:
        return -1
    if name not in ISAS:
        raise ValueError(f"unknown CPU ISA {name!r}; expected one of {sorted(ISAS)}")
    return ISAS[name]


def _register_fakes() -> None:
    lib = "sparse_ofa::"

    @torch.library.register_fake(lib + "cpu_int_mm")
    def _(x_q, quad_w, quad_k, row_ptr, rowsum, layout, isa=-1):
        return x_q.new_empty((x_q.shape[0], row_ptr.shape[0] - 1), dtype=torch.int32)

    @torch.library.register_fake(lib + "cpu_linear")
    def _(x, quad_w, quad_k, row_ptr, rowsum, layout, w_scale, bias, static_scale, inv_scale, zero_point,
          qmin, qmax, out_dtype, isa=-1):
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1), dtype=out_dtype)

    @torch.library.register_fake(lib + "cpu_quantize")
    def _(x, static_scale, inv_scale, zero_point, qmin, qmax, isa=-1):
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32))

    @torch.library.register_fake(lib + "cpu_int_mm_out")
    def _(x_q, quad_w, quad_k, row_ptr, rowsum, layout, out, isa=-1):
        return None

    @torch.library.register_fake(lib + "cpu_linear_out")
    def _(x, quad_w, quad_k, row_ptr, rowsum, layout, w_scale, bias, static_scale, inv_scale, zero_point,
          qmin, qmax, out, isa=-1):
        return None


def derive_quads(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """Layout "quads v1" (csrc/cpu/sparse_cpu.h) from packed format v1."""
    packed.validate()
    w = unpack_int8(packed).cpu()
    n, k = w.shape
    w4 = F.pad(w, (0, -k % 4)).view(n, -1, 4)
    kept = (w4 != 0).any(-1)                      # [N, Q]: quads with a non-zero weight
    rows_quads = kept.nonzero()                   # row-major: ascending q within each row
    quad_w = w4[kept].contiguous().view(torch.int32).reshape(-1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = kept.sum(1).cumsum(0)
    return {
        "quad_w": quad_w,
        "quad_k": rows_quads[:, 1].to(torch.int32).contiguous(),
        "row_ptr": row_ptr.to(torch.int32),
        "rowsum": w.sum(1, dtype=torch.int32),
        "layout": torch.tensor([LAYOUT_VERSION, n, k, quad_w.numel()], dtype=torch.int32),
    }


def quad_density(info: LayerInfo) -> float:
    """Expected fraction of kept quads (the VNNI work left) for a layer of this pattern/density:
    exact for 1x4; for unstructured, quads kept if any of 4 independent weights is (1 - (1-d)^4)."""
    if info.pattern == "1x4":
        return info.density
    if info.pattern == "2:4":
        return min(1.0, 2 * info.density)  # at most 2 per quad: at least d*2 of quads hold one
    return 1.0 - (1.0 - info.density) ** 4


# Dispatch thresholds measured with bench/test_layers_cpu.py (see docs/cpu_kernels.md): sparse is
# chosen when the kept-quad fraction is below this, as a function of the token count.
_MAX_QUAD_DENSITY_SMALL_M = 0.75   # M <= 16: dense INT8 is memory/latency bound, sparse wins wide
_MAX_QUAD_DENSITY = 0.5            # M up to ~1024
_MAX_QUAD_DENSITY_LARGE_M = 0.4    # M > 1024: dense INT8 gets closer to peak


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)

    def availability(self) -> tuple[bool, str]:
        try:
            load()
        except Exception as exc:  # no compiler, compile error...: unavailable, with the reason
            return False, f"C++ extension {EXTENSION} did not build/load: {type(exc).__name__}: {exc}"
        return True, ""

    def supports(self, device: torch.device, info: LayerInfo) -> bool:
        return device.type == "cpu"

    def prefers(self, m: int, info: LayerInfo) -> bool:
        qd = quad_density(info)
        if m <= 16:
            return qd <= _MAX_QUAD_DENSITY_SMALL_M
        if m <= 1024:
            return qd <= _MAX_QUAD_DENSITY
        return qd <= _MAX_QUAD_DENSITY_LARGE_M

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        return derive_quads(packed)

    @staticmethod
    def _args(prepared):
        return (prepared["quad_w"], prepared["quad_k"], prepared["row_ptr"], prepared["rowsum"],
                prepared["layout"])

    def int_mm(self, x_q: torch.Tensor, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.ops.sparse_ofa.cpu_int_mm(x_q, *self._args(prepared), isa_code())

    def linear(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], w_scale: torch.Tensor,
               bias: torch.Tensor | None, act: ActQuant, out_dtype: torch.dtype) -> torch.Tensor:
        if act.is_static:
            q = (float(act.scale), act.inv_scale, act.zero_point, act.qmin, act.qmax)
        else:
            q = (0.0, 0.0, 0, -127, 127)
        return torch.ops.sparse_ofa.cpu_linear(x, *self._args(prepared), w_scale, bias, *q, out_dtype,
                                               isa_code())
