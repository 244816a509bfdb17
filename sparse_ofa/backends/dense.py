"""The dense INT8 backend: the packed weight expanded once to a dense int8 matrix, multiplied with
`torch._int_mm` (oneDNN/fbgemm on CPU, cuBLASLt on CUDA). Same numerics as the sparse kernels, so
backend="auto" falls back to it for any layer where sparse would be slower."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import PackedWeight, unpack_int8
from ..quant import ActQuant
from .base import Backend


def _cpu_quantizer_ready() -> bool:
    """The C++ quantizer of the cpu backend, when its extension builds here (bit-identical to quant.py)."""
    from . import availability

    return availability("cpu")[0]


class DenseInt8Backend(Backend):
    name = "dense"

    def prepare(self, packed: PackedWeight) -> dict[str, torch.Tensor]:
        # [K, N] as a transposed view of the row-major [N, K] matrix: what _int_mm reads fastest.
        return {"w_t": unpack_int8(packed).t()}

    def int_mm(self, x_q, prepared):
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

        # One C++ op (csrc/cpu_dense.cpp): quantize, _int_mm, and the epilogue over the int32
        # accumulators in place; as ~10 torch ops this was 2x slower than torch's quantize_dynamic.
        return torch.ops.sparse_ofa.cpu_dense_linear(x, prepared["w_t"], w_scale, bias, *act.kernel_args(),
                                                     out_dtype, isa_code())

    def linear_fn(self, prepared, w_scale, bias, act, m, out_dtype, post):
        # CPU: the same op, with the post-ops (residual, GELU, LayerNorm) on each row while in cache
        if prepared["w_t"].device.type != "cpu" or not _cpu_quantizer_ready():
            return None
        from .cpu import fuses_post_ops, isa_code, post_op_fn

        isa = isa_code()
        if not fuses_post_ops(isa, out_dtype, post):
            return None
        args = (prepared["w_t"], w_scale, bias, *act.kernel_args(), out_dtype, isa)
        return post_op_fn(torch.ops.sparse_ofa.cpu_dense_linear.default, args, post)

    def _linear_cuda(self, x, prepared, w_scale, bias, act, out_dtype):
        # Triton's one-launch quantizer and dequantizer where Triton is installed (same bits as
        # quant.py; torch's ops take ~13 launches for the two), torch's ops otherwise.
        from .triton import dequantize_output, quantize_input

        x_q, x_scale = quantize_input(x, act)
        bias = None if bias is None else bias.to(torch.float32)
        return dequantize_output(self.int_mm(x_q, prepared), x_scale, w_scale, bias, out_dtype)
