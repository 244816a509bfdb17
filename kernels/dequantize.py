"""The dequantizing epilogue as one launch, for routes whose product is a separate int32 tensor
(split-K bitmap, dense torch._int_mm): torch needs ~5 launches for the same numerics.

Math (sparse_ofa/quant.py:dequantize, bit for bit: float32, no FMA contraction):
    y[m, n] = (float32(acc[m, n]) * x_scale[m]) * w_scale[n] + bias[n],  rounded to out's dtype
"""
import torch
import triton
import triton.language as tl

from .epilogue import NO_FP_FUSION


@triton.jit
def dequantize_kernel(acc_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm[:, None] * N + rn[None, :], mask=inside, other=0)
    x_scale = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    w_scale = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None]
    y = y * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)


def dequantize(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as sparse_ofa.quant.dequantize (acc int32 [M, N] contiguous, scales float32)."""
    if acc.dtype != torch.int32 or acc.dim() != 2:
        raise ValueError(f"expected an int32 [M, N] product, got {acc.dtype} {tuple(acc.shape)}")
    acc = acc.contiguous()
    m, n = acc.shape
    out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n = 16, 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    dequantize_kernel[grid](acc, x_scale.contiguous(), w_scale.contiguous(),
                            out if bias is None else bias.contiguous(), out, m, n,
                            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                            num_warps=4, **NO_FP_FUSION)
    return out
