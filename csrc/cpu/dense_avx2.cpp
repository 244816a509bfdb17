// The dense panel GEMM (dense_gemm.h) on AVX2: a 6 x 16 register-blocked micro-kernel over int16
// pairs with vpmaddwd (exact: each int32 lane adds two int8 x int8 products) + vpaddd.
//
// Per input-channel pair p of a micro-tile: 2 weight loads (the strip's 64-byte row p), 6 broadcasts
// of an activation pair, 12 vpmaddwd + 12 vpaddd into 12 accumulators. On Zen 3 vpmaddwd issues on 2
// pipes and vpaddd on the others, so a pair costs ~6 cycles for 192 products: ~32 int8 MACs / cycle,
// 2x fp32 FMA (16 / cycle). The full K runs in one pass (no K blocking): a strip row is read from L1
// at K = 768 (24 KB a strip) and from L2 at K = 3072, at ~15 B / cycle, half of what L2 gives.
#include <cstring>

#include "dense_gemm.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2")

namespace sparse_ofa_cpu {

namespace {

typedef int32_t pair_t __attribute__((may_alias));  // an int16 pair read as one int32

// The K loop of a full 6 x 16 tile in assembly, accumulators in ymm0-11 (rows i: ymm2i, ymm2i+1),
// weights in ymm12-13, broadcast and product in ymm14-15: with intrinsics GCC 12 spills one or more
// of the 12 accumulators to the stack every pair (seen in its -O3 output). Per pair: 2 weight
// loads, 6 broadcasts, 12 vpmaddwd, 12 vpaddd. Result: out[i][0..15] = the int32 sums of row i.
inline void full_tile_loop(const pair_t* ap, int64_t la, const int16_t* ws, int64_t kp, int32_t* out) {
  const pair_t* a3 = ap + 3 * la;
  const int64_t stride = la * 4;  // bytes between activation rows
  asm volatile(
      "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
      "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
      "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
      "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
      "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
      "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
      "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
      "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
      "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
      "vpxor %%ymm10, %%ymm10, %%ymm10\n\t"
      "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
      "1:\n\t"
      "vmovdqu (%[w]), %%ymm12\n\t"
      "vmovdqu 32(%[w]), %%ymm13\n\t"
      "vpbroadcastd (%[a0]), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm0, %%ymm0\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm14, %%ymm1, %%ymm1\n\t"
      "vpbroadcastd (%[a0],%[s],1), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm2, %%ymm2\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm14, %%ymm3, %%ymm3\n\t"
      "vpbroadcastd (%[a0],%[s],2), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm4, %%ymm4\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm14, %%ymm5, %%ymm5\n\t"
      "vpbroadcastd (%[a3]), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm6, %%ymm6\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm14, %%ymm7, %%ymm7\n\t"
      "vpbroadcastd (%[a3],%[s],1), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm8, %%ymm8\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm14, %%ymm9, %%ymm9\n\t"
      "vpbroadcastd (%[a3],%[s],2), %%ymm14\n\t"
      "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"
      "vpaddd %%ymm15, %%ymm10, %%ymm10\n\t"
      "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm14, %%ymm11, %%ymm11\n\t"
      "addq $64, %[w]\n\t"
      "addq $4, %[a0]\n\t"
      "addq $4, %[a3]\n\t"
      "decq %[n]\n\t"
      "jnz 1b\n\t"
      "vmovdqa %%ymm0, 0(%[out])\n\t"
      "vmovdqa %%ymm1, 32(%[out])\n\t"
      "vmovdqa %%ymm2, 64(%[out])\n\t"
      "vmovdqa %%ymm3, 96(%[out])\n\t"
      "vmovdqa %%ymm4, 128(%[out])\n\t"
      "vmovdqa %%ymm5, 160(%[out])\n\t"
      "vmovdqa %%ymm6, 192(%[out])\n\t"
      "vmovdqa %%ymm7, 224(%[out])\n\t"
      "vmovdqa %%ymm8, 256(%[out])\n\t"
      "vmovdqa %%ymm9, 288(%[out])\n\t"
      "vmovdqa %%ymm10, 320(%[out])\n\t"
      "vmovdqa %%ymm11, 352(%[out])\n\t"
      : [w] "+r"(ws), [a0] "+r"(ap), [a3] "+r"(a3), [n] "+r"(kp)
      : [s] "r"(stride), [out] "r"(out)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
}

// rows [r, r + MR) x columns [c0, c0 + ncols) (ncols <= 16) of the product over the pairs [p0, p0 + kp)
// (ws: the strip's row p0): added to the int32 partial sums in the output unless `first`; stored back
// as int32 partial sums unless `last`, else the epilogue and the final store (float output: the same
// 4-byte elements, int32 until the last chunk)
template <int MR>
inline void micro_tile(const int16_t* a, int64_t lda, const int16_t* ws, int64_t p0, int64_t kp, int64_t r,
                       int64_t c0, int ncols, const DenseOut& o, bool first, bool last) {
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const pair_t* ap = reinterpret_cast<const pair_t*>(a + r * lda + 2 * p0);
  const int64_t la = lda / 2;
  if constexpr (MR == 6) {
    if (kp > 0) {  // (kp >= 1 always here: K >= 1 for a panel; the loop runs at least once)
      alignas(32) int32_t sums[6][kDenseCols];
      full_tile_loop(ap, la, ws, kp, &sums[0][0]);
      for (int i = 0; i < 6; ++i) {
        acc[i][0] = _mm256_load_si256((const __m256i*)sums[i]);
        acc[i][1] = _mm256_load_si256((const __m256i*)(sums[i] + 8));
      }
    }
  } else {
    for (int64_t p = 0; p < kp; ++p) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(ws + p * 2 * kDenseCols));
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(ws + p * 2 * kDenseCols + kDenseCols));
    for (int i = 0; i < MR; ++i) {
      const __m256i x = _mm256_set1_epi32(ap[i * la + p]);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(x, w0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(x, w1));
    }
    }
  }
  int32_t* partial = static_cast<int32_t*>(o.out) + r * o.ldo + c0;
  if (!first) {
    for (int i = 0; i < MR; ++i) {
      alignas(32) int32_t tmp[kDenseCols] = {};
      const int32_t* src = partial + i * o.ldo;
      if (ncols < kDenseCols) std::memcpy(tmp, src, ncols * sizeof(int32_t)), src = tmp;
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_loadu_si256((const __m256i*)src));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_loadu_si256((const __m256i*)(src + 8)));
    }
  }
  if (!o.x_scale || !last) {
    int32_t* out = partial;
    for (int i = 0; i < MR; ++i) {
      if (ncols == kDenseCols) {
        _mm256_storeu_si256((__m256i*)(out + i * o.ldo), acc[i][0]);
        _mm256_storeu_si256((__m256i*)(out + i * o.ldo + 8), acc[i][1]);
      } else {
        alignas(32) int32_t tmp[kDenseCols];
        _mm256_store_si256((__m256i*)tmp, acc[i][0]);
        _mm256_store_si256((__m256i*)(tmp + 8), acc[i][1]);
        std::memcpy(out + i * o.ldo, tmp, ncols * sizeof(int32_t));
      }
    }
    return;
  }
  // y = (float(acc) * x_scale) * w_scale + bias, the reference's order and roundings (separate
  // multiplies and add: this file is built with -ffp-contract=off, so no FMA is formed)
  alignas(32) float wsb[2][kDenseCols] = {};
  const float *wsp = o.w_scale + c0, *bp = o.bias ? o.bias + c0 : nullptr;
  if (ncols < kDenseCols) {  // the last strip: scales and bias past N read as 0 (columns not stored)
    std::memcpy(wsb[0], wsp, ncols * sizeof(float));
    if (bp) std::memcpy(wsb[1], bp, ncols * sizeof(float));
    wsp = wsb[0];
    bp = bp ? wsb[1] : nullptr;
  }
  const __m256 ws0 = _mm256_loadu_ps(wsp), ws1 = _mm256_loadu_ps(wsp + 8);
  const __m256 b0 = bp ? _mm256_loadu_ps(bp) : _mm256_setzero_ps(), b1 = bp ? _mm256_loadu_ps(bp + 8) : b0;
  float* out = static_cast<float*>(o.out) + r * o.ldo + c0;
  for (int i = 0; i < MR; ++i) {
    const __m256 xs = _mm256_set1_ps(o.x_scale[r + i]);
    __m256 y0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][0]), xs), ws0);
    __m256 y1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][1]), xs), ws1);
    if (bp) {  // (no bias: no add, so that -0.0 stays -0.0 as in the reference)
      y0 = _mm256_add_ps(y0, b0);
      y1 = _mm256_add_ps(y1, b1);
    }
    if (ncols == kDenseCols) {
      _mm256_storeu_ps(out + i * o.ldo, y0);
      _mm256_storeu_ps(out + i * o.ldo + 8, y1);
    } else {
      alignas(32) float tmp[kDenseCols];
      _mm256_store_ps(tmp, y0);
      _mm256_store_ps(tmp + 8, y1);
      std::memcpy(out + i * o.ldo, tmp, ncols * sizeof(float));
    }
  }
}

}  // namespace

void dense_widen_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int16_t* a, int64_t lda) {
  const int64_t k16 = k / 16 * 16;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* x = xq + m * ldx;
    int16_t* r = a + m * lda;
    for (int64_t i = 0; i < k16; i += 16)
      _mm256_storeu_si256((__m256i*)(r + i), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(x + i))));
    for (int64_t i = k16; i < k; ++i) r[i] = x[i];
    for (int64_t i = k; i < lda; ++i) r[i] = 0;
  }
}

void dense_gemm_avx2(const DensePanel& w, const int16_t* a, int64_t lda, int64_t m, const DenseBlocking& b,
                     const DenseOut& o, int64_t t0, int64_t t1) {
  const int64_t mtiles = (m + kDenseRows - 1) / kDenseRows;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t mb = t / b.nblocks, nb = t % b.nblocks;
    const int64_t tt0 = mb * b.tiles, tt1 = tt0 + b.tiles < mtiles ? tt0 + b.tiles : mtiles;
    const int64_t s0 = nb * b.strips, s1 = s0 + b.strips < w.strips ? s0 + b.strips : w.strips;
    // K chunk outermost (the mblock's activation chunk and the partial sums stay in cache), then a
    // strip's chunk (kc x 64 B, in L1) against every micro-tile of the mblock
    for (int64_t p0 = 0; p0 < w.kp; p0 += b.kc) {
    const int64_t p1 = p0 + b.kc < w.kp ? p0 + b.kc : w.kp;
    const bool first = p0 == 0, last = p1 == w.kp;
    for (int64_t s = s0; s < s1; ++s) {
      const int16_t* ws = w.w + s * w.kp * 2 * kDenseCols;
      const int64_t c0 = s * kDenseCols;
      const int nc = (int)(w.n - c0 < kDenseCols ? w.n - c0 : kDenseCols);
      for (int64_t tt = tt0; tt < tt1; ++tt) {
        const int64_t r = tt * kDenseRows;
        const int64_t kp = p1 - p0;
        const int16_t* wp = ws + p0 * 2 * kDenseCols;
        switch (m - r < kDenseRows ? m - r : kDenseRows) {
          case 6: micro_tile<6>(a, lda, wp, p0, kp, r, c0, nc, o, first, last); break;
          case 5: micro_tile<5>(a, lda, wp, p0, kp, r, c0, nc, o, first, last); break;
          case 4: micro_tile<4>(a, lda, wp, p0, kp, r, c0, nc, o, first, last); break;
          case 3: micro_tile<3>(a, lda, wp, p0, kp, r, c0, nc, o, first, last); break;
          case 2: micro_tile<2>(a, lda, wp, p0, kp, r, c0, nc, o, first, last); break;
          default: micro_tile<1>(a, lda, wp, p0, kp, r, c0, nc, o, first, last); break;
        }
      }
    }
    }
  }
}

}  // namespace sparse_ofa_cpu
#pragma GCC pop_options

#else
namespace sparse_ofa_cpu {
void dense_widen_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int16_t* a, int64_t lda) {
  dense_widen_scalar(xq, ldx, k, m0, m1, a, lda);
}
void dense_gemm_avx2(const DensePanel& w, const int16_t* a, int64_t lda, int64_t m, const DenseBlocking& b,
                     const DenseOut& o, int64_t t0, int64_t t1) {
  dense_gemm_scalar(w, a, lda, m, b, o, t0, t1);
}
}  // namespace sparse_ofa_cpu
#endif
