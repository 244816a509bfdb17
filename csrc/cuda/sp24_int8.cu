// 2:4 sparse INT8 matmul on sparse tensor cores: out[m, n] = sum_k x[m, k] * W[n, k].
//
// Math. The weight W [N, K] keeps at most 2 of every 4 consecutive input channels, so the product
// runs as the transposed problem out^T = W . x^T with W as the sparse A operand of
//     mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32
// which multiplies a 16 x 32 (logical) A tile, given as 16 x 16 kept values plus 2-bit positions, by a
// dense 32 x 8 B tile: acc[r, c] += sum_{j<16} A_c[r, j] * B[pos(r, j), c]. The hardware skips the
// pruned half, so per instruction it does the work of a dense m16n8k32 at twice the dense rate.
// B = x^T in "col" layout is x itself (tokens are columns, K contiguous), so no transpose is needed.
//
// Operands (prepared once from the packed weight, kernels/layouts.py:sp24_layout):
//   values [n_padded, K/2]  the kept pair of each group of 4, in order
//   meta   [n_padded, K/32] per group of 4 a nibble (idx1 << 2 | idx0), 8 groups per word
// Rows past N are padding: values 0 and nibbles 0b0100 (positions 0, 1), so they add nothing.
//
// Fragments (PTX ISA, sparse mma.m16n8k32 .s8 and mma.m16n8k32): lane = 4 g + t,
//   A  reg0 = kept values of row g, logical k 8t..8t+7 (4 bytes); reg1 = the same for row g + 8
//   B  reg0 = x[col g][k 4t..4t+3];  reg1 = x[col g][k 16+4t..16+4t+3]
//   C  c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g + 8, cols 2t, 2t+1)
//   E  sparsity selector 0: lanes t = 0, 1 of each quad give the metadata. Which rows/columns each of
//      the two carries is set by meta_mode (kMetaHalves: t holds k 16t..16t+15 of row g in bits
//      0-15 and of row g+8 in bits 16-31; kMetaRows: t = 0 holds row g, t = 1 row g+8, all 32 k).
//      The Python backend checks both against the reference on first use and keeps the exact one.
//
// Tiling: a block of 256 threads (8 warps, 4 along weight rows x 2 along tokens) computes 128 weight
// rows x 64 tokens; each warp 32 x 32 = 2 x 4 mma tiles. K advances 64 per stage through two
// shared-memory stages filled with cp.async (16-byte copies; zero-filled past the last token).
// Shared rows are padded (48 B for A, 80 B for B) so the fragment reads hit 32 distinct banks.
//
// Epilogue (fused, float32, no contraction so it equals sparse_ofa.quant.dequantize bit for bit):
//   y[m, n] = (float(acc) * x_scale[m]) * w_scale[n] + bias[n], rounded to the output type.
#include "sp24_int8.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace sparse_ofa {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = kSp24TileRows;  // weight rows per block
constexpr int kTokens = 64;           // tokens per block
constexpr int kK = kSp24TileK;        // logical k per stage
constexpr int kAStride = 48;          // bytes per weight row in shared memory (32 used)
constexpr int kBStride = 80;          // bytes per token row in shared memory (64 used)
constexpr int kMetaWords = kK / 32;   // metadata words per weight row per stage

struct __align__(16) Stage {
  int8_t a[kRows * kAStride];
  int8_t b[kTokens * kBStride];
  uint32_t meta[kRows * kMetaWords];
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  // src_size 0 writes 16 zero bytes without reading src.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_sp(int (&acc)[4], uint32_t a0, uint32_t a1, uint32_t b0,
                                       uint32_t b1, uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5}, {%6, %7}, {%0, %1, %2, %3}, %8, 0x0;\n"
      : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
      : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
}

// Stage `kt` of the K loop: 128 rows x 32 bytes of values, 128 x 8 bytes of metadata, 64 tokens x
// 64 bytes of x. One 16-byte copy of values and of x per thread, one 8-byte copy of metadata per
// thread for the first 128 threads.
__device__ __forceinline__ void load_stage(Stage& s, const int8_t* x, const int8_t* values,
                                           const uint32_t* meta, int row0, int tok0, int m, int k,
                                           int kt) {
  const int tid = threadIdx.x;
  const int k0 = kt * kK;
  {
    const int r = tid >> 1, part = tid & 1;
    cp_async16(&s.a[r * kAStride + part * 16],
               values + static_cast<int64_t>(row0 + r) * (k / 2) + k0 / 2 + part * 16, true);
  }
  {
    const int tok = tid >> 2, part = tid & 3;
    const bool valid = tok0 + tok < m;
    const int src_tok = valid ? tok0 + tok : 0;  // any mapped address; nothing is read
    cp_async16(&s.b[tok * kBStride + part * 16],
               x + static_cast<int64_t>(src_tok) * k + k0 + part * 16, valid);
  }
  if (tid < kRows) {
    cp_async8(&s.meta[tid * kMetaWords],
              meta + static_cast<int64_t>(row0 + tid) * (k / 32) + k0 / 32);
  }
}

// The metadata register of lane (g, t) for the 16-row A tile starting at shared row r0, k32 step ks.
__device__ __forceinline__ uint32_t meta_fragment(const Stage& s, int r0, int ks, int g, int t,
                                                  int meta_mode) {
  const uint32_t lo = s.meta[(r0 + g) * kMetaWords + ks];
  const uint32_t hi = s.meta[(r0 + g + 8) * kMetaWords + ks];
  if (meta_mode == kMetaRows) return t == 0 ? lo : hi;
  const int shift = (t & 1) * 16;
  return ((lo >> shift) & 0xFFFFu) | (((hi >> shift) & 0xFFFFu) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename OutT, bool kFused>
__device__ __forceinline__ void store(OutT* out, int mi, int ni, int m, int n, int acc,
                                      const float* x_scale, const float* w_scale,
                                      const float* bias) {
  if (mi >= m || ni >= n) return;
  if constexpr (kFused) {
    float y = __fmul_rn(__fmul_rn(static_cast<float>(acc), x_scale[mi]), w_scale[ni]);
    if (bias != nullptr) y = __fadd_rn(y, bias[ni]);
    out[static_cast<int64_t>(mi) * n + ni] = from_float<OutT>(y);
  } else {
    out[static_cast<int64_t>(mi) * n + ni] = static_cast<OutT>(acc);
  }
}

template <typename OutT, bool kFused>
__global__ void __launch_bounds__(kThreads)
    sp24_int8_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ values,
                     const uint32_t* __restrict__ meta, OutT* __restrict__ out, int m, int n, int k,
                     const float* __restrict__ x_scale, const float* __restrict__ w_scale,
                     const float* __restrict__ bias, int meta_mode) {
  __shared__ Stage stages[2];
  const int row0 = blockIdx.x * kRows;
  const int tok0 = blockIdx.y * kTokens;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wr = (warp & 3) * 32;   // this warp's first weight row in the block
  const int wc = (warp >> 2) * 32;  // this warp's first token in the block

  int acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0;

  const int num_k = k / kK;
  load_stage(stages[0], x, values, meta, row0, tok0, m, k, 0);
  cp_async_commit();
  for (int kt = 0; kt < num_k; ++kt) {
    if (kt + 1 < num_k) load_stage(stages[(kt + 1) & 1], x, values, meta, row0, tok0, m, k, kt + 1);
    cp_async_commit();
    cp_async_wait<1>();  // stage kt has landed; stage kt + 1 may still be in flight
    __syncthreads();
    const Stage& s = stages[kt & 1];
#pragma unroll
    for (int ks = 0; ks < kK / 32; ++ks) {
      uint32_t a[2][2], e[2], b[4][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = wr + i * 16 + g;
        a[i][0] = *reinterpret_cast<const uint32_t*>(&s.a[r * kAStride + ks * 16 + t * 4]);
        a[i][1] = *reinterpret_cast<const uint32_t*>(&s.a[(r + 8) * kAStride + ks * 16 + t * 4]);
        e[i] = meta_fragment(s, wr + i * 16, ks, g, t, meta_mode);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = wc + j * 8 + g;
        b[j][0] = *reinterpret_cast<const uint32_t*>(&s.b[c * kBStride + ks * 32 + t * 4]);
        b[j][1] = *reinterpret_cast<const uint32_t*>(&s.b[c * kBStride + ks * 32 + 16 + t * 4]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_sp(acc[i][j], a[i][0], a[i][1], b[j][0], b[j][1], e[i]);
    }
    __syncthreads();  // everyone is done with stage kt before it is refilled
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int ni = row0 + wr + i * 16 + g;
      const int mi = tok0 + wc + j * 8 + 2 * t;
      store<OutT, kFused>(out, mi, ni, m, n, acc[i][j][0], x_scale, w_scale, bias);
      store<OutT, kFused>(out, mi + 1, ni, m, n, acc[i][j][1], x_scale, w_scale, bias);
      store<OutT, kFused>(out, mi, ni + 8, m, n, acc[i][j][2], x_scale, w_scale, bias);
      store<OutT, kFused>(out, mi + 1, ni + 8, m, n, acc[i][j][3], x_scale, w_scale, bias);
    }
}

template <typename OutT, bool kFused>
cudaError_t launch(const int8_t* x, const int8_t* values, const uint32_t* meta, void* out, int m,
                   int n, int n_padded, int k, const float* x_scale, const float* w_scale,
                   const float* bias, int meta_mode, cudaStream_t stream) {
  const dim3 grid(n_padded / kRows, (m + kTokens - 1) / kTokens);
  sp24_int8_kernel<OutT, kFused><<<grid, kThreads, 0, stream>>>(
      x, values, meta, static_cast<OutT*>(out), m, n, k, x_scale, w_scale, bias, meta_mode);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sp24_int8_launch(const int8_t* x, const int8_t* values, const uint32_t* meta, void* out,
                             int m, int n, int n_padded, int k, int out_kind, const float* x_scale,
                             const float* w_scale, const float* bias, int meta_mode,
                             cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  if (k % kK != 0 || n_padded % kRows != 0 || n_padded < n) return cudaErrorInvalidValue;
  switch (out_kind) {
    case kSp24Int32:
      return launch<int, false>(x, values, meta, out, m, n, n_padded, k, nullptr, nullptr, nullptr,
                                meta_mode, stream);
    case kSp24Float32:
      return launch<float, true>(x, values, meta, out, m, n, n_padded, k, x_scale, w_scale, bias,
                                 meta_mode, stream);
    case kSp24Float16:
      return launch<__half, true>(x, values, meta, out, m, n, n_padded, k, x_scale, w_scale, bias,
                                  meta_mode, stream);
    case kSp24BFloat16:
      return launch<__nv_bfloat16, true>(x, values, meta, out, m, n, n_padded, k, x_scale, w_scale,
                                         bias, meta_mode, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sparse_ofa
