"""INT8 steps every backend may use, on torch tensors of either device: the dense exact product
(`int_mm`, torch._int_mm with its device quirks handled), and on CUDA the one-launch Triton
quantizer and epilogue where Triton is installed (bit-identical to sparse_ofa.quant, torch's ops
otherwise)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import dequantize, quantize_activations


def int_mm(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 [M, N] = x_q [M, K] int8 @ w_t [K, N] int8 by torch._int_mm (oneDNN/fbgemm on
    CPU, cuBLASLt on CUDA)."""
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


def quantize_input(x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation quantization: one Triton launch for dynamic per-token on CUDA (bit-identical to
    sparse_ofa.quant.quantize_per_token), torch otherwise (static scales, CPU tensors)."""
    if act.is_static or not x.is_cuda:
        return quantize_activations(x, act)
    try:
        from sparse_ofa.kernels.quantize import quantize_per_token
    except ImportError:  # no Triton: the CUDA backend still works, with torch's quantization
        return quantize_activations(x, act)
    return quantize_per_token(x)


def dequantize_output(acc: torch.Tensor, x_scale, w_scale, bias, out_dtype) -> torch.Tensor:
    """The epilogue on an int32 product: one Triton launch on CUDA (bit-identical to
    sparse_ofa.quant.dequantize, which takes ~5 torch ops), torch otherwise."""
    if acc.is_cuda:
        try:
            from sparse_ofa.kernels.dequantize import dequantize as dequantize_one_launch
        except ImportError:  # no Triton
            return dequantize(acc, x_scale, w_scale, bias, out_dtype)
        return dequantize_one_launch(acc, x_scale, w_scale, bias, out_dtype)
    return dequantize(acc, x_scale, w_scale, bias, out_dtype)
