"""The dense INT8 backend: the packed weight expanded once to a dense int8 matrix, multiplied with
`torch._int_mm` (oneDNN/fbgemm on CPU, cuBLASLt on CUDA) or, on CPUs where that is slow, with this
package's own exact int16-pair GEMM (csrc/cpu/dense_gemm.h, the "panel" route). Same numerics as the
sparse kernels, so backend="auto" falls back to it for any layer where sparse would be slower.

CPU route, chosen once per process (`cpu_route`): $SPARSE_OFA_DENSE_ROUTE ("int_mm" or "panel") if
set, else measured: both timed on one 64 x 384 x 384 product (one thread, CPU time). On CPUs without VNNI torch's
CPU `_int_mm` runs a slow path (90 ms for 128 x 768 x 768 on a Zen 3, 20x fp32 F.linear), the panel
kernel ~2 ms; with VNNI `_int_mm` reaches ~87 % of the vpdpbusd peak, which vpmaddwd cannot approach.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..formats import PackedWeight, unpack_int8
from ..quant import ActQuant
from . import env_value
from .base import Backend


def _cpu_quantizer_ready() -> bool:
    """The C++ quantizer of the cpu backend, when its extension builds here (bit-identical to quant.py)."""
    from . import availability

    return availability("cpu")[0]


PANEL_VERSION = 1  # csrc/cpu_dense.cpp kPanelVersion
PANEL_COLS = 16    # csrc/cpu/dense_gemm.h kDenseCols
ROUTES = ("int_mm", "panel")
_route: dict[str, str] = {}


def derive_panel(w_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int16 weight panel of the panel route (csrc/cpu/dense_gemm.h) from W_q int8 [N, K]:
    panel[s, p, c, j] = W_q[16 s + c, 2 p + j], zeros past N and K; w_layout = [version, N, K]."""
    n, k = w_q.shape
    w = F.pad(w_q.cpu().to(torch.int16), (0, k % 2, 0, -n % PANEL_COLS))
    panel = w.view(w.shape[0] // PANEL_COLS, PANEL_COLS, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
    return {"w_panel": panel, "w_layout": torch.tensor([PANEL_VERSION, n, k], dtype=torch.int32)}


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up (first-call allocations, oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def measure_cpu_route(m: int = 64, k: int = 384, n: int = 384) -> dict[str, float]:
    """CPU seconds (best of 5) of one m x k x n exact int8 product by each CPU route that computes it
    exactly (checked against int64 first; raises if neither does), on one thread. One thread and the calling thread's CPU time:
    with several threads on a busy machine a wall-clock product waits for descheduled threads at its
    barriers (steps of a scheduler slice, 4-40 ms, seen on a shared Zen 3), which once made the route
    that is 50x slower there win the comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_routes(m, k, n)
    finally:
        torch.set_num_threads(threads)


def _measure_routes(m: int, k: int, n: int) -> dict[str, float]:
    from .cpu import load

    load()
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w_t, panel = w_q.t(), derive_panel(w_q)
    op = torch.ops.sparse_ofa.cpu_dense_panel_int_mm
    # both against the exact int64 product: a route that gets it wrong is not timed (torch's _int_mm
    # with oneDNN held to AVX2 on an AVX-512 CPU, ONEDNN_MAX_CPU_ISA=AVX2, returned products off by up
    # to 1e5 in torch 2.13)
    exact = x_q.long() @ w_q.long().t()
    routes = {"int_mm": lambda: torch._int_mm(x_q, w_t), "panel": lambda: op(x_q, panel["w_panel"], panel["w_layout"])}
    right = {name: fn for name, fn in routes.items() if torch.equal(fn().long(), exact)}
    if not right:
        raise RuntimeError("sparse_ofa dense: neither torch._int_mm nor the panel GEMM is exact on this CPU")
    return {name: _best_seconds(fn) for name, fn in right.items()}


def cpu_route() -> str:
    """"int_mm" or "panel": how this process multiplies dense INT8 on the CPU (see the module doc)."""
    forced = env_value("SPARSE_OFA_DENSE_ROUTE")
    if forced:
        if forced not in ROUTES:
            raise ValueError(f"SPARSE_OFA_DENSE_ROUTE={forced!r}; expected one of {ROUTES}")
        return forced
    if "cpu" not in _route:
        from .cpu import best_isa

        # the panel kernel needs AVX2 to be fast (its portable loop is for forced-ISA checks only)
        if not _cpu_quantizer_ready() or best_isa() == "scalar":
            _route["cpu"] = "int_mm"
        else:
            times = measure_cpu_route()
            _route["cpu"] = min(times, key=times.get)
    return _route["cpu"]


class DenseInt8Backend(Backend):
    name = "dense"

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        w_q = unpack_int8(packed)
        if packed.values.device.type == "cpu" and cpu_route() == "panel":
            return derive_panel(w_q)
        # [K, N] as a transposed view of the row-major [N, K] matrix: what _int_mm reads fastest.
        return {"w_t": w_q.t()}

    def int_mm(self, x_q, prepared):
        if "w_panel" in prepared:
            return torch.ops.sparse_ofa.cpu_dense_panel_int_mm(x_q, prepared["w_panel"], prepared["w_layout"])
        w_t = prepared["w_t"]
        if x_q.device.type != "cuda":
            if w_t.shape[0] == 1:  # torch's CPU _int_mm is wrong for K = 1, N >= 2 (seen in 2.13)
                return x_q.to(torch.int32) * w_t.to(torch.int32)
            return torch._int_mm(x_q, w_t)
        k, n = w_t.shape
        if k % 8 or n % 8:
            # cuBLASLt int8 needs K and N multiples of 8; zero padding leaves the sums unchanged.
            w_t = F.pad(w_t, (0, -n % 8, 0, -k % 8))
            x_q = F.pad(x_q, (0, -k % 8))
        m = x_q.shape[0]
        if m <= 16:  # cuBLASLt int8 needs M > 16
            x_q = F.pad(x_q, (0, 0, 0, 17 - m))
        return torch._int_mm(x_q, w_t)[:m, :n]

    def linear(self, x, prepared, w_scale, bias, act: ActQuant, out_dtype):
        if x.is_cuda:
            return self._linear_cuda(x, prepared, w_scale, bias, act, out_dtype)
        if not _cpu_quantizer_ready():
            return super().linear(x, prepared, w_scale, bias, act, out_dtype)
        from .cpu import isa_code

        # One C++ op (csrc/cpu_dense.cpp): quantize, the product, and the epilogue; as ~10 torch ops
        # this was 2x slower than torch's quantize_dynamic.
        if "w_panel" in prepared:
            return torch.ops.sparse_ofa.cpu_dense_panel_linear(x, prepared["w_panel"], prepared["w_layout"], w_scale,
                                                               bias, *act.kernel_args(), out_dtype, isa_code())
        return torch.ops.sparse_ofa.cpu_dense_linear(x, prepared["w_t"], w_scale, bias, *act.kernel_args(),
                                                     out_dtype, isa_code())

    def linear_fn(self, prepared, w_scale, bias, act, m, out_dtype, post):
        # CPU: the same op, with the post-ops (residual, GELU, LayerNorm) on each row while in cache
        panel = "w_panel" in prepared
        if (not panel and prepared["w_t"].device.type != "cpu") or not _cpu_quantizer_ready():
            return None
        from .cpu import fuses_post_ops, isa_code, post_op_fn

        isa = isa_code()
        if not fuses_post_ops(isa, out_dtype, post):
            return None
        if panel:
            args = (prepared["w_panel"], prepared["w_layout"], w_scale, bias, *act.kernel_args(), out_dtype, isa)
            return post_op_fn(torch.ops.sparse_ofa.cpu_dense_panel_linear.default, args, post)
        args = (prepared["w_t"], w_scale, bias, *act.kernel_args(), out_dtype, isa)
        return post_op_fn(torch.ops.sparse_ofa.cpu_dense_linear.default, args, post)

    def _linear_cuda(self, x, prepared, w_scale, bias, act, out_dtype):
        # Triton's one-launch quantizer and dequantizer where Triton is installed (same bits as
        # quant.py; torch's ops take ~13 launches for the two), torch's ops otherwise.
        from .triton import dequantize_output, quantize_input

        x_q, x_scale = quantize_input(x, act)
        bias = None if bias is None else bias.to(torch.float32)
        return dequantize_output(self.int_mm(x_q, prepared), x_scale, w_scale, bias, out_dtype)
