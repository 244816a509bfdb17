"""Unstructured sparse INT8 matmul, "load as sparse, compute as dense" (few tokens, memory-bound).

Math, per output tile (rows m of x, output channels n) and K tile kt of width BLOCK_K:
    bit(n, k)    = bit (k mod 8) of bits[kt, n, (k mod BLOCK_K) / 8]
    pos(n, k)    = offsets[kt, n] + sum_{k' < k in tile} bit(n, k')     (exclusive prefix count)
    w(n, k)      = values[pos(n, k)] if bit(n, k) else 0                (int8 tile, K-major)
    acc[m, n]   += sum_k x_q[m, k] * w(n, k)                             (int8 tensor-core dot, int32)
The weight moves 1/8 byte per weight of bitmap + 1 byte per kept weight + 4/BLOCK_K bytes of offsets,
against 1 byte per weight dense: at 90 % sparsity ~0.26 bytes: at most ~4x fewer bytes than dense.
The expanded tile never touches memory: registers -> shared memory -> tl.dot (wgmma on Hopper).
Split-K (grid axis 2) gives small-M problems enough programs to fill the GPU; partial sums are then
atomically added in int32 and the float epilogue runs afterwards (kernels/dequantize.py).
bitmap_int8_linear also quantizes float activations per token inside the kernel (QUANT_X: a first
pass over the program's rows for amax, then kernels/quantize.py's rounding on each loaded tile), so
a few-token layer is a single launch.
Layout: kernels/layouts.py:bitmap_layout, derived from the packed weight.
"""
import functools

import torch
import triton
import triton.language as tl

from .epilogue import NO_FP_FUSION, interpreting, store_result, store_scaled
from .quantize import int8_codes, row_scales


@triton.jit
def bitmap_int8_kernel(x_ptr, bits_ptr, vals_ptr, offs_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
                       M, N, K, KT, stride_xm, stride_om, SPLIT_K,
                       EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       QUANT_X: tl.constexpr = False):
    # SPLIT_K is a run-time value (one compiled kernel for every split); ATOMIC = SPLIT_K > 1.
    # QUANT_X: x is float and quantized here per token (kernels/quantize.py numerics); the scales
    # stay in registers for the epilogue, and go to xs_ptr (an output then) for a split-K epilogue.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rbyte = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8)
    row_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if QUANT_X:
        x_scale, inv = row_scales(x_ptr, rm, M, K, stride_xm, BLOCK_M, BLOCK_K)
        if ATOMIC:
            if (pid_n == 0) & (pid_k == 0):
                tl.store(xs_ptr + rm, x_scale, mask=rm < M)
    for kt in range(pid_k, KT, SPLIT_K):
        k = kt * BLOCK_K + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0)
        if QUANT_X:
            x = int8_codes(x.to(tl.float32) * inv[:, None])
        # The tile's bitmap: BLOCK_N rows of BLOCK_K/8 bytes, one contiguous run in bits[kt].
        tile_row = kt * N + rn
        packed_bits = tl.load(bits_ptr + tile_row[:, None] * (BLOCK_K // 8) + rbyte[None, :],
                              mask=row_ok[:, None], other=0)
        bits = (packed_bits.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 1
        bits = tl.reshape(bits, (BLOCK_N, BLOCK_K))
        before = tl.cumsum(bits, axis=1) - bits
        start = tl.load(offs_ptr + tile_row, mask=row_ok, other=0)
        w = tl.load(vals_ptr + start[:, None] + before, mask=(bits != 0) & row_ok[:, None], other=0)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
    if QUANT_X and EPILOGUE and not ATOMIC:
        store_scaled(acc, x_scale, out_ptr, ws_ptr, bias_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
    else:
        store_result(acc, out_ptr, xs_ptr, ws_ptr, bias_ptr, rm, rn, M, N, stride_om,
                     EPILOGUE, HAS_BIAS, ATOMIC)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_K is fixed by the layout; few-token shapes want
# narrow N tiles (more programs). Expanding a tile keeps ~5 registers per weight element live (bit,
# prefix count, 64-bit address, value): these are the shapes that compile for sm_90 without spills,
# with and without the in-kernel quantizer (tests/test_gpu_triton_aot.py checks it); BLOCK_M = 64
# is the wgmma shape.
_CONFIGS = [(16, 32, 4, 3), (16, 64, 8, 3), (32, 32, 8, 3), (32, 64, 8, 3), (32, 64, 8, 4),
            (64, 32, 8, 3)]


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _CONFIGS]


def _split_k_for(m: int, n: int, kt: int, block_m: int, block_n: int, programs_wanted: int) -> int:
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return max(1, min(kt, programs_wanted // max(tiles, 1)))


_tuned = None


def _autotuned():
    global _tuned
    if _tuned is None:
        _tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "SPLIT_K"],
                                 reset_to_zero=["out_ptr"])(_with_bucket)
    return _tuned


@triton.jit
def _with_bucket(x_ptr, bits_ptr, vals_ptr, offs_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
                 M, N, K, KT, stride_xm, stride_om, SPLIT_K, M_BUCKET,
                 EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 QUANT_X: tl.constexpr):
    # M_BUCKET only keys the autotuner cache (next power of two of M); x's dtype keys QUANT_X.
    bitmap_int8_kernel(x_ptr, bits_ptr, vals_ptr, offs_ptr, out_ptr, xs_ptr, ws_ptr, bias_ptr,
                       M, N, K, KT, stride_xm, stride_om, SPLIT_K, EPILOGUE, HAS_BIAS, ATOMIC,
                       BLOCK_M, BLOCK_N, BLOCK_K, QUANT_X)


def bitmap_int8_mm(x_q: torch.Tensor, layout: dict, n: int, k: int, *, x_scale=None, w_scale=None,
                   bias=None, out_dtype=None, config: dict | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """x_q int8 [M, K] @ W_q^T with W_q in bitmap layout -> int32 [M, N] (exact), or, given x_scale,
    w_scale (and bias, out_dtype), the dequantized float [M, N].

    `config` ({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}) skips autotuning (the interpreter
    and tests use it); `split_k` None picks one that gives ~2 programs per SM."""
    _check_x(x_q, k, n)
    return _launch(x_q, layout, n, k, quant_x=False, x_scale=x_scale, w_scale=w_scale, bias=bias,
                   out_dtype=out_dtype, config=config, split_k=split_k)


def bitmap_int8_linear(x: torch.Tensor, layout: dict, n: int, k: int, *, w_scale, bias=None,
                       out_dtype=None, config: dict | None = None,
                       split_k: int | None = None) -> torch.Tensor:
    """The whole layer in one launch (three with split-K): float x [M, K] quantized per token inside
    the kernel (sparse_ofa.quant.quantize_per_token numerics), sparse int8 product, fused epilogue.
    Bit-identical to quantize -> bitmap_int8_mm -> dequantize."""
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"expected float32/float16/bfloat16 activations [M, {k}], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    check_int32_indexing(x.shape[0], k, n)
    return _launch(x, layout, n, k, quant_x=True, x_scale=None, w_scale=w_scale, bias=bias,
                   out_dtype=out_dtype or x.dtype, config=config, split_k=split_k)


def _launch(x, layout, n, k, *, quant_x, x_scale, w_scale, bias, out_dtype, config, split_k):
    if config is None and interpreting():
        bm, bn, warps, stages = _CONFIGS[0]
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    m = x.shape[0]
    bits = layout["bits"]
    kt, block_k = bits.shape[0], bits.shape[2] * 8
    epilogue = quant_x or x_scale is not None
    out_dtype = out_dtype or torch.float32
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype if epilogue else torch.int32, device=x.device)
    if split_k is None:
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 4
        bm, bn = (config or {}).get("BLOCK_M", 16), (config or {}).get("BLOCK_N", 64)
        split_k = _split_k_for(m, n, kt, bm, bn, 2 * sms)
    atomic = split_k > 1
    if atomic:  # partial sums are added into it
        out = torch.zeros(m, n, dtype=torch.int32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=out_dtype if epilogue else torch.int32, device=x.device)
    if quant_x and atomic:  # the kernel writes the token scales for the separate epilogue
        x_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    fused = epilogue and not atomic
    dummy = out  # pointer arguments a constexpr-disabled branch never reads
    args = (x, bits, layout["values"], layout["offsets"], out,
            x_scale if x_scale is not None and (fused or quant_x) else dummy,
            w_scale if fused else dummy, bias if (fused and bias is not None) else dummy,
            m, n, k, kt, x.stride(0), out.stride(0), split_k)
    flags = dict(EPILOGUE=fused, HAS_BIAS=fused and bias is not None, ATOMIC=atomic, BLOCK_K=block_k,
                 QUANT_X=quant_x)
    if config is not None:
        c = dict(config)
        meta = {"num_warps": c.pop("num_warps", 4), "num_stages": c.pop("num_stages", 2),
                **NO_FP_FUSION}
        grid = (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m, c["BLOCK_M"]), split_k)
        bitmap_int8_kernel[grid](*args, **flags, **c, **meta)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), split_k)
        _autotuned()[grid](*args, triton.next_power_of_2(m), **flags, **NO_FP_FUSION)
    if epilogue and atomic:
        from .dequantize import dequantize  # one launch for the split-K epilogue
        return dequantize(out, x_scale, w_scale, bias, out_dtype)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_x(x_q: torch.Tensor, k: int, n: int) -> None:
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != k:
        raise ValueError(f"expected int8 activations [M, {k}], got {x_q.dtype} {tuple(x_q.shape)}")
    if x_q.stride(1) != 1:
        raise ValueError("int8 activations must be contiguous along K (stride(1) == 1)")
    check_int32_indexing(x_q.shape[0], k, n)


def check_int32_indexing(m: int, k: int, n: int) -> None:
    """The kernels index with int32 offsets: x [M, K] and the output [M, N] must stay below 2^31."""
    if m * max(k, n) >= 2**31:
        raise ValueError(f"{m} tokens x {max(k, n)} features exceeds the kernels' 32-bit indexing; "
                         "split the batch")
