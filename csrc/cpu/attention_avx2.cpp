// AVX2 + FMA attention (attention.h): the AVX-512 kernel's steps (attention_avx512.cpp) in 256-bit
// lanes, one (batch, head) task at a time:
//   1. K of the head transposed once into kt[dim][seq_pad] (8x8 transposes, keys padded with 0); from
//      a channel-major qkv (AttnProblem.sc != 1) K^T is read in place and V is transposed instead;
//   2. for each block of R <= 6 query rows:
//        scores[r][j] = scale * sum_c q[r][c] * kt[c][j]        (6 x 16 broadcast-FMA microkernel)
//        softmax of each row in place (mask, max, exp8, sum)  -> unnormalised p and 1/sum
//        out[r][c]    = (1/sum[r]) * sum_j p[r][j] * v[j][c]   (the same microkernel)
// The microkernel keeps 6 rows x 2 ymm = 12 accumulators (AVX2 has 16 registers): 2 loads + 6
// broadcasts per 12 FMAs.
#include <algorithm>
#include <cstring>
#include <limits>

#include "attention.h"
#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSE_OFA_AVX2_MATH
#include "avx2_util.h"

namespace sparse_ofa_cpu {
namespace {

constexpr int kRows = 6;  // query rows per block
constexpr int kVecs = 2;  // 8-lane column vectors per microkernel call

//   c[r][0 : 8 NV] = row_scale[r] * sum_k a[r * lda + k * ka] * b[k * ldb + 0 : 8 NV]      (r < R)
// Masked: the last vector of every b row and c row is read / written under `last` (lanes < cols).
template <int R, int NV, bool Masked>
void gemm8(const float* a, int64_t lda, int64_t ka, const float* b, int64_t ldb, int64_t kdim, const float* row_scale,
           float* c, int64_t ldc, __m256i last) {
  // (the unroll pragmas keep acc in registers: without them GCC stores every accumulator back to the
  // stack in each k iteration, which halved the rate)
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kdim; ++k) {
    const float* bk = b + k * ldb;
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV - 1; ++v) bv[v] = _mm256_loadu_ps(bk + 8 * v);
    bv[NV - 1] = Masked ? _mm256_maskload_ps(bk + 8 * (NV - 1), last) : _mm256_loadu_ps(bk + 8 * (NV - 1));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k * ka);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_set1_ps(row_scale[r]);
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV - 1; ++v) _mm256_storeu_ps(cr + 8 * v, _mm256_mul_ps(acc[r][v], s));
    const __m256 y = _mm256_mul_ps(acc[r][NV - 1], s);
    if (Masked) _mm256_maskstore_ps(cr + 8 * (NV - 1), last, y);
    else _mm256_storeu_ps(cr + 8 * (NV - 1), y);
  }
}

using Gemm8Fn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t,
                         __m256i);

template <int R>
Gemm8Fn gemm8_for(int64_t nv, bool masked) {
  if (nv == 1) return masked ? gemm8<R, 1, true> : gemm8<R, 1, false>;
  return masked ? gemm8<R, kVecs, true> : gemm8<R, kVecs, false>;
}

Gemm8Fn gemm8_for_rows(int64_t rows, int64_t nv, bool masked) {
  switch (rows) {
    case 1: return gemm8_for<1>(nv, masked);
    case 2: return gemm8_for<2>(nv, masked);
    case 3: return gemm8_for<3>(nv, masked);
    case 4: return gemm8_for<4>(nv, masked);
    case 5: return gemm8_for<5>(nv, masked);
    default: return gemm8_for<6>(nv, masked);
  }
}

// gemm8 over `cols` output columns, kVecs vectors at a time (rows <= 6)
void gemm8_cols(int64_t rows, const float* a, int64_t lda, int64_t ka, const float* b, int64_t ldb, int64_t kdim,
                const float* row_scale, float* c, int64_t ldc, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += 8 * kVecs) {
    const int64_t left = cols - c0, nv = std::min<int64_t>(kVecs, (left + 7) / 8);
    const int64_t tail = left - 8 * (nv - 1);
    gemm8_for_rows(rows, nv, tail < 8)(a, lda, ka, b + c0, ldb, kdim, row_scale, c + c0, ldc, lanes_below(tail));
  }
}

// dst[c][j] = src[j][c] for c < cols, j < rows_pad (0 for j >= rows); src rows `ld` floats apart
void transpose8(const float* src, int64_t ld, int64_t rows, int64_t cols, int64_t rows_pad, float* dst) {
  for (int64_t j0 = 0; j0 < rows_pad; j0 += 8) {
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      const bool full = cols - c0 >= 8;
      const __m256i live = lanes_below(cols - c0);
      __m256i r[8];
      for (int j = 0; j < 8; ++j) {
        const float* row = src + (j0 + j) * ld + c0;
        r[j] = j0 + j >= rows ? _mm256_setzero_si256()
                              : _mm256_castps_si256(full ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, live));
      }
      transpose8x8(r);
      for (int64_t c = 0; c < std::min<int64_t>(8, cols - c0); ++c)
        _mm256_storeu_si256((__m256i*)(dst + (c0 + c) * rows_pad + j0), r[c]);
    }
  }
}

// 1 + the last key any of query rows [i0, i0 + rows) may attend to (keys_needed in
// attention_avx512.cpp, without AVX-512): the keys past it have probability exactly 0.
int64_t keys_needed8(const AttnProblem& p, int64_t b, int64_t h, int64_t i0, int64_t rows) {
  if (p.mask_kind != kMaskBool) return p.seq;
  int64_t need = 0;
  for (int64_t r = 0; r < rows && need < p.seq; ++r) {
    const uint8_t* m = static_cast<const uint8_t*>(mask_row(p, b, h, i0 + r));
    for (int64_t j = p.seq; j > need; --j)
      if (m[j - 1]) {
        need = j;
        break;
      }
  }
  return need;
}

// Masked softmax of one score row in place, as softmax_row_avx512: s[j] = exp(x_j - max), returns
// 1 / sum (0 when every key is masked, with s = 0).
float softmax_row8(float* s, int64_t seq, int mask_kind, const void* mask) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = neg_inf;
  // (full vectors by plain loads / stores: vmaskmovps stores are microcoded on Zen 1-3)
  for (int64_t j = 0; j < seq; j += 8) {
    const bool full = seq - j >= 8;
    const __m256i live = lanes_below(seq - j);
    __m256 x = full ? _mm256_loadu_ps(s + j) : _mm256_maskload_ps(s + j, live);
    if (mask_kind == kMaskBool) {
      uint64_t bytes = 0;
      std::memcpy(&bytes, static_cast<const uint8_t*>(mask) + j, (size_t)std::min<int64_t>(8, seq - j));
      const __m256i keep = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes));
      x = _mm256_blendv_ps(x, neg_inf, _mm256_castsi256_ps(_mm256_cmpeq_epi32(keep, _mm256_setzero_si256())));
    } else if (mask_kind == kMaskAdd) {
      const float* add = static_cast<const float*>(mask) + j;
      x = _mm256_add_ps(x, full ? _mm256_loadu_ps(add) : _mm256_maskload_ps(add, live));
    }
    if (full) {
      _mm256_storeu_ps(s + j, x);
      vmax = _mm256_max_ps(vmax, x);
    } else {
      _mm256_maskstore_ps(s + j, live, x);
      vmax = _mm256_blendv_ps(vmax, _mm256_max_ps(vmax, x), _mm256_castsi256_ps(live));
    }
  }
  const float row_max = hmax8(vmax);
  if (row_max == -std::numeric_limits<float>::infinity()) {
    std::fill(s, s + seq, 0.f);
    return 0.f;
  }
  const __m256 vm = _mm256_set1_ps(row_max);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= seq; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (j < seq) {
    const __m256i live = lanes_below(seq - j);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + j, live), vm)), _mm256_castsi256_ps(live));
    _mm256_maskstore_ps(s + j, live, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  return 1.f / hsum8(vsum);
}

}  // namespace

void attention_avx2(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  // the scratch layout of attention_scratch_floats (padding to 16 as on the AVX-512 path)
  const int64_t seq_pad = (p.seq + 15) / 16 * 16, dim_pad = (p.dim + 15) / 16 * 16;
  const bool channel_major = p.sc != 1;
  // K^T rows 16 floats more than seq_pad apart where seq_pad is a multiple of 256: 1 KB-multiple strides
  // put the 64 rows of a head in a few L1 sets (1.3x slower than torch's SDPA at 256-512 keys)
  const int64_t ldkt = seq_pad % 256 == 0 ? seq_pad + 16 : seq_pad;
  float* kv = scratch;                                           // K^T [dim][ldkt] or V [seq][dim_pad]
  float* scores = kv + std::max(p.dim * ldkt, p.seq * dim_pad);  // [kRows][seq_pad]
  float scale[kRows], inv_sum[kRows];
  std::fill(scale, scale + kRows, p.scale);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.heads, h = t % p.heads;
    const float* q = p.qkv + b * p.sb + h * p.dim * p.sc;
    const float *kt, *v;  // K^T rows (ldk apart, up to nk columns read) and V rows (ldv apart)
    int64_t ldk, nk, ldv;
    if (channel_major) {
      kt = q + p.k_off * p.sc, ldk = p.sc, nk = p.seq;
      transpose8(q + p.v_off * p.sc, p.sc, p.dim, p.seq, dim_pad, kv);
      v = kv, ldv = dim_pad;
    } else {
      transpose8(q + p.k_off, p.st, p.seq, p.dim, ldkt, kv);
      kt = kv, ldk = ldkt, nk = seq_pad;
      v = q + p.v_off, ldv = p.st;
    }
    float* out = p.out + b * p.ob + h * p.dim;
    for (int64_t i0 = 0; i0 < p.seq; i0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, p.seq - i0);
      const int64_t keys = keys_needed8(p, b, h, i0, rows);
      gemm8_cols(rows, q + i0 * p.st, p.st, p.sc, kt, ldk, p.dim, scale, scores, seq_pad, std::min(nk, keys));
      for (int64_t r = 0; r < rows; ++r)
        inv_sum[r] = softmax_row8(scores + r * seq_pad, keys, p.mask_kind, mask_row(p, b, h, i0 + r));
      gemm8_cols(rows, scores, seq_pad, 1, v, ldv, keys, inv_sum, out + i0 * p.ot, p.ot, p.dim);
    }
  }
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#else  // not x86: never selected (isa_supported is false), defined so that the binding links
namespace sparse_ofa_cpu {
void attention_avx2(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  attention_scalar(p, t0, t1, scratch);
}
}  // namespace sparse_ofa_cpu
#endif
