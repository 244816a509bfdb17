"""The dense INT8 backend: the packed weight expanded once to a dense int8 matrix, multiplied with
`torch._int_mm` (oneDNN/fbgemm on CPU, cuBLASLt on CUDA) or, on CPUs where that is slow, with this
package's own exact int16-pair GEMM (csrc/cpu/dense_gemm.h, the "panel" route). Same numerics as the
sparse kernels, so backend="auto" falls back to it for any layer where sparse would be slower.

CPU route, chosen once per process (backends/cpu/dispatch.py `dense_route`): $SPARSE_OFA_DENSE_ROUTE
("int_mm" or "panel") if set, else the faster of the two on one product. On CPUs without VNNI torch's
CPU `_int_mm` runs a slow path (20x fp32 F.linear on a Zen 3), the panel kernel does not; with VNNI
`_int_mm` reaches ~87 % of the vpdpbusd peak, which vpmaddwd cannot approach.
"""
from __future__ import annotations

import torch

from ..formats import PackedWeight, unpack_int8
from ..quant import ActQuant
from .base import Backend
from .int8 import dequantize_output, int_mm, quantize_input


def _cpu_extension_ready() -> bool:
    """The CPU extension (its quantizer is bit-identical to quant.py), when it builds here."""
    from . import availability

    return availability("cpu")[0]


class DenseInt8Backend(Backend):
    name = "dense"

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        w_q = unpack_int8(packed)
        if packed.values.device.type == "cpu" and _cpu_extension_ready():
            from .cpu.dispatch import dense_route
            from .cpu.layouts import derive_panel

            if dense_route() == "panel":
                return derive_panel(w_q)
        # [K, N] as a transposed view of the row-major [N, K] matrix: what _int_mm reads fastest.
        return {"w_t": w_q.t()}

    def int_mm(self, x_q, prepared):
        if "w_panel" in prepared:
            return torch.ops.sparse_ofa.cpu_dense_panel_int_mm(x_q, prepared["w_panel"], prepared["w_layout"])
        return int_mm(x_q, prepared["w_t"])

    def linear(self, x, prepared, w_scale, bias, act: ActQuant, out_dtype):
        if x.is_cuda:
            return self._linear_cuda(x, prepared, w_scale, bias, act, out_dtype)
        if not _cpu_extension_ready():
            return super().linear(x, prepared, w_scale, bias, act, out_dtype)
        from .cpu.ops import isa_code

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
        if (not panel and prepared["w_t"].device.type != "cpu") or not _cpu_extension_ready():
            return None
        from .cpu.ops import fuses_post_ops, isa_code, post_op_fn

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
        x_q, x_scale = quantize_input(x, act)
        bias = None if bias is None else bias.to(torch.float32)
        return dequantize_output(self.int_mm(x_q, prepared), x_scale, w_scale, bias, out_dtype)
