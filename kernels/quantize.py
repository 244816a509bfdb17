"""Dynamic per-token INT8 quantization in one kernel launch (torch needs ~8 for the same numerics).

Math, per row m of x [M, K] (sparse_ofa/quant.py:quantize_per_token, bit for bit):
    amax       = max_k |x[m, k]|          (NaN if any x[m, k] is NaN: torch.amax propagates it)
    x_scale[m] = amax / 127               (IEEE division, div.rn)
    inv        = fp32(1 / amax) * 127, 0 if amax == 0   (two roundings, as torch's `127.0 / amax`)
    x_q[m, k]  = clamp(round_half_even(x[m, k] * inv), -127, 127), NaN -> 0
round_half_even(v) = (v + 1.5 * 2^23) - 1.5 * 2^23, exact for |v| < 2^22 (here |v| <= 127) as long as
the compiler keeps both IEEE additions (no fast-math in Triton); it also works in the interpreter.
At few tokens the layer's matmul takes a few microseconds, so the launches saved here matter.
"""
import torch
import triton
import triton.language as tl

from .epilogue import NO_FP_FUSION


@triton.jit
def scales_from_amax(amax, has_nan):
    """(x_scale, inv) from a row's amax (elementwise, any shape); NaN rows get a NaN scale."""
    amax = tl.where(has_nan, float("nan"), amax)
    # div_rn: IEEE round-to-nearest division on every Triton version (tl.fdiv's ieee_rounding flag
    # is ignored by Triton 3.6, which emits the approximate div.full.f32 for it)
    x_scale = tl.math.div_rn(amax, 127.0)
    # reciprocal then multiply, not 127 / amax: ties (x = amax * j.5 / 127, common in fp16 inputs)
    # round differently otherwise
    inv = tl.where(amax != 0.0, tl.math.div_rn(1.0, amax) * 127.0, 0.0)
    return x_scale, inv


@triton.jit
def int8_codes(v):
    """clamp(round_half_even(v), -127, 127) as int8, NaN -> 0 (elementwise, any shape)."""
    r = (v + 12582912.0) - 12582912.0
    r = tl.where(r != r, 0.0, r)
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return r.to(tl.int8)


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    nans = tl.zeros((BLOCK,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        nans += (x != x).to(tl.int32)
    x_scale, inv = scales_from_amax(tl.max(amax, axis=0), tl.sum(nans, axis=0) > 0)
    tl.store(s_ptr + row, x_scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k0 + offs, int8_codes(x * inv), mask=k0 + offs < K)


@triton.jit
def row_scales(x_ptr, rm, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x_scale, inv) [BLOCK_M] for rows rm of float x [M, K]: a matmul prologue's first pass."""
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nans = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        nans += tl.sum((x != x).to(tl.int32), axis=1)
    return scales_from_amax(amax, nans > 0)


def quantize_per_token(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32/float16/bfloat16 -> (x_q int8 [M, K], x_scale float32 [M]), one launch."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"expected a 2-D float32/float16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    x_q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    x_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return x_q, x_scale
    if k == 0:
        return x_q, x_scale.zero_()
    block = block or min(triton.next_power_of_2(k), 4096)
    quantize_rows_kernel[(m,)](x, x_q, x_scale, k, x.stride(0), x_q.stride(0), BLOCK=block,
                               num_warps=4 if block <= 1024 else 8, **NO_FP_FUSION)
    return x_q, x_scale
