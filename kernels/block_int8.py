"""Block-sparse INT8 matmul that skips empty weight tiles (many tokens, compute-bound).

Math, per output tile (rows m, output channels n in N-tile nt):
    acc[m, n] = sum over listed tiles kt in tile_k[tile_ptr[nt] : tile_ptr[nt+1]] of
                sum_{k in tile kt} x_q[m, k] * W_q[n, k]                 (int8 tensor-core dot, int32)
Tiles that hold no kept weight contribute 0 and are never read, so at tile density d the kernel does
d of the dense work: 90 % block-pruned weights bound the speedup at 10x.
W_q is the dense int8 [N, K] matrix (K contiguous, the K-major operand wgmma wants); the tile list is
derived from the packed weight by kernels/layouts.py:block_layout. BLOCK_N and BLOCK_K are the
layout's tile shape; BLOCK_M, warps and pipeline depth are autotuned.
"""
import torch
import triton
import triton.language as tl

from .bitmap_int8 import check_int32_indexing
from .epilogue import NO_FP_FUSION, interpreting, store_result


@triton.jit
def block_int8_kernel(x_ptr, w_ptr, tile_ptr, tile_k, out_ptr, xs_ptr, ws_ptr, bias_ptr,
                      M, N, K, stride_xm, stride_wn, stride_om,
                      EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M consecutive M tiles share one N tile's weights while they sit in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    first = tl.load(tile_ptr + pid_n)
    last = tl.load(tile_ptr + pid_n + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(first, last):
        kt = tl.load(tile_k + i)
        k = kt * BLOCK_K + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :],
                    mask=(rn[:, None] < N) & (k[None, :] < K), other=0)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
    store_result(acc, out_ptr, xs_ptr, ws_ptr, bias_ptr, rm, rn, M, N, stride_om,
                 EPILOGUE, HAS_BIAS, False)


# (BLOCK_M, num_warps, num_stages): the ones that compile for sm_90 without spills (4 warps spill
# the int32 accumulator and the tile addresses; tests/test_gpu_triton_aot.py checks it).
_CONFIGS = [(64, 8, 3), (64, 8, 4), (128, 8, 3), (128, 8, 4)]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, w, s in _CONFIGS]


_tuned = None


def _autotuned():
    global _tuned
    if _tuned is None:
        _tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "NNZ_TILES"])(_with_keys)
    return _tuned


@triton.jit
def _with_keys(x_ptr, w_ptr, tile_ptr, tile_k, out_ptr, xs_ptr, ws_ptr, bias_ptr,
               M, N, K, stride_xm, stride_wn, stride_om, M_BUCKET, NNZ_TILES,
               EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr):
    # M_BUCKET and NNZ_TILES only key the autotuner cache.
    block_int8_kernel(x_ptr, w_ptr, tile_ptr, tile_k, out_ptr, xs_ptr, ws_ptr, bias_ptr,
                      M, N, K, stride_xm, stride_wn, stride_om, EPILOGUE, HAS_BIAS,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def block_int8_mm(x_q: torch.Tensor, layout: dict, n: int, k: int, *, block_n: int, block_k: int,
                  x_scale=None, w_scale=None, bias=None, out_dtype=None,
                  config: dict | None = None) -> torch.Tensor:
    """x_q int8 [M, K] @ W_q^T skipping empty block_n x block_k tiles -> int32 [M, N] (exact), or,
    given x_scale and w_scale (bias, out_dtype), the fused dequantized float [M, N].

    `config` ({"BLOCK_M", "GROUP_M", "num_warps", "num_stages"}) skips autotuning."""
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != k or x_q.stride(1) != 1:
        raise ValueError(f"expected K-contiguous int8 activations [M, {k}], got {x_q.dtype} "
                         f"{tuple(x_q.shape)}")
    check_int32_indexing(x_q.shape[0], k, n)
    if config is None and interpreting():
        bm, warps, stages = _CONFIGS[0]
        config = {"BLOCK_M": bm, "num_warps": warps, "num_stages": stages}
    m = x_q.shape[0]
    epilogue = x_scale is not None
    out_dtype = out_dtype or torch.float32
    out = torch.empty(m, n, dtype=out_dtype if epilogue else torch.int32, device=x_q.device)
    if m == 0:
        return out
    w = layout["dense"]
    args = (x_q, w, layout["tile_ptr"], layout["tile_k"], out,
            x_scale if epilogue else out, w_scale if epilogue else out,
            bias if (epilogue and bias is not None) else out,
            m, n, k, x_q.stride(0), w.stride(0), out.stride(0))
    flags = dict(EPILOGUE=epilogue, HAS_BIAS=epilogue and bias is not None,
                 BLOCK_N=block_n, BLOCK_K=block_k)
    num_n = triton.cdiv(n, block_n)
    if config is not None:
        c = dict(config)
        c.setdefault("GROUP_M", 8)
        meta = {"num_warps": c.pop("num_warps", 4), "num_stages": c.pop("num_stages", 2),
                **NO_FP_FUSION}
        grid = (triton.cdiv(m, c["BLOCK_M"]) * num_n,)
        block_int8_kernel[grid](*args, **flags, **c, **meta)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * num_n,)
        _autotuned()[grid](*args, triton.next_power_of_2(m), layout["tile_k"].numel(), **flags,
                           **NO_FP_FUSION)
    return out
