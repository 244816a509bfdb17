"""The fused epilogue shared by the Triton kernels: the numerics of sparse_ofa.quant.dequantize.

    y[m, n] = (float32(acc[m, n]) * x_scale[m]) * w_scale[n] + bias[n],  stored in out's dtype
or, with EPILOGUE False, the exact int32 acc itself; with ATOMIC True (split-K) acc is atomically
added into a zeroed int32 buffer (integer addition is associative, so the sum stays exact).
"""
import os

import triton
import triton.language as tl

# Launch option: no mul+add -> FMA contraction, so the float epilogue rounds exactly like torch's
# separate ops in dequantize (bit-identical outputs, not merely close).
NO_FP_FUSION = {"enable_fp_fusion": False}


def interpreting() -> bool:
    """Under TRITON_INTERPRET=1 the autotuner cannot time configs: wrappers use their first one."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def store_result(acc, out_ptr, xs_ptr, ws_ptr, bias_ptr, rm, rn, M, N, stride_om,
                 EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    in_bounds = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=in_bounds)
    elif EPILOGUE:
        x_scale = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        store_scaled(acc, x_scale, out_ptr, ws_ptr, bias_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
    else:
        tl.store(ptrs, acc, mask=in_bounds)


@triton.jit
def store_scaled(acc, x_scale, out_ptr, ws_ptr, bias_ptr, rm, rn, M, N, stride_om,
                 HAS_BIAS: tl.constexpr):
    """The float epilogue with x_scale [BLOCK_M] already in registers."""
    w_scale = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None]
    y = y * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0)
        y = y + bias[None, :]
    in_bounds = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=in_bounds)
