// AVX-512 attention (attention.h), one (batch, head) task at a time:
//   1. K of the head, transposed once into kt[dim][seq_pad] (16x16 transposes, keys padded with 0);
//      from a channel-major qkv (AttnProblem.sc != 1) K^T is read in place and V is transposed instead;
//   2. for each block of R <= 6 query rows:
//        scores[r][j] = scale * sum_c q[r][c] * kt[c][j]          (attention_gemm.h: 6 x 64 accumulators)
//        softmax of each row in place (mask, max, exp, sum)     -> unnormalised p and 1/sum
//        out[r][c]    = (1/sum[r]) * sum_j p[r][j] * v[j][c]     (the same GEMM)
// The GEMM (attention_gemm.h) runs near the FMA ports' rate while the operands sit in L1/L2 (seq
// 128, dim 64: kt is 32 KB, a head's V rows 32 KB).
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention.h"
#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "avx512_util.h"

namespace sparse_ofa_cpu {
namespace {

constexpr int kRows = 6;  // query rows per block

// fp32 elements, one FMA per lane (attention_gemm.h)
struct Fp32Mul {
  using Elem = float;
  using Vec = __m512;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load_masked(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 bcast(float a) { return _mm512_set1_ps(a); }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

#include "attention_gemm.h"

// kt[c][j] = k[j][c] for c < dim, j < seq_pad (0 for j >= seq); k rows `ld` floats apart
void transpose_keys(const float* k, int64_t ld, int64_t seq, int64_t dim, int64_t seq_pad, float* kt) {
  for (int64_t j0 = 0; j0 < seq_pad; j0 += 16) {
    for (int64_t c0 = 0; c0 < dim; c0 += 16) {
      const __mmask16 cols = first_n(dim - c0);
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = j0 + j < seq ? _mm512_castps_si512(_mm512_maskz_loadu_ps(cols, k + (j0 + j) * ld + c0))
                            : _mm512_setzero_si512();
      transpose16x16(r);
      for (int64_t c = 0; c < std::min<int64_t>(16, dim - c0); ++c)
        _mm512_storeu_si512(kt + (c0 + c) * seq_pad + j0, r[c]);
    }
  }
}

}  // namespace

// 1 + the last key any of query rows [i0, i0 + rows) of (b, h) may attend to, by a backwards scan of
// their bool mask rows, 64 keys at a time: the keys past it carry probability exactly 0 (a padded
// batch's padding keys), so the kernels skip them; p.seq without a bool mask, 0 if all are masked.
int64_t keys_needed(const AttnProblem& p, int64_t b, int64_t h, int64_t i0, int64_t rows) {
  if (p.mask_kind != kMaskBool) return p.seq;
  int64_t need = 0;
  for (int64_t r = 0; r < rows && need < p.seq; ++r) {
    const uint8_t* m = static_cast<const uint8_t*>(mask_row(p, b, h, i0 + r));
    for (int64_t j0 = (p.seq - 1) / 64 * 64; j0 >= 0 && j0 + 64 > need; j0 -= 64) {
      const __mmask64 live = p.seq - j0 >= 64 ? ~0ull : (1ull << (p.seq - j0)) - 1;
      const __m512i bytes = _mm512_maskz_loadu_epi8(live, m + j0);
      const uint64_t keep = _mm512_test_epi8_mask(bytes, bytes);
      if (keep) {
        need = std::max<int64_t>(need, j0 + 64 - __builtin_clzll(keep));
        break;
      }
    }
  }
  return need;
}

// Masked softmax of one score row s[0, seq) in place: s[j] = exp(x_j - max), returns 1 / sum (0 when
// every key is masked, with s = 0). x_j = s[j] + mask (additive), or -inf where a bool mask is false.
float softmax_row_avx512(float* s, int64_t seq, int mask_kind, const void* mask) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  for (int64_t j = 0; j < seq; j += 16) {
    const __mmask16 m = first_n(seq - j);
    __m512 x = _mm512_maskz_loadu_ps(m, s + j);
    if (mask_kind == kMaskBool) {
      const __m128i keep = _mm_maskz_loadu_epi8(m, static_cast<const uint8_t*>(mask) + j);
      x = _mm512_mask_blend_ps(_mm_test_epi8_mask(keep, keep), neg_inf, x);
    } else if (mask_kind == kMaskAdd) {
      x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, static_cast<const float*>(mask) + j));
    }
    _mm512_mask_storeu_ps(s + j, m, x);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
  }
  const float row_max = _mm512_reduce_max_ps(vmax);
  if (row_max == -std::numeric_limits<float>::infinity()) {
    std::fill(s, s + seq, 0.f);
    return 0.f;
  }
  const __m512 vm = _mm512_set1_ps(row_max);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < seq; j += 16) {
    const __mmask16 m = first_n(seq - j);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vm));
    _mm512_mask_storeu_ps(s + j, m, e);
    vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
  }
  return 1.f / _mm512_reduce_add_ps(vsum);
}

void attention_avx512(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  const int64_t seq_pad = (p.seq + 15) / 16 * 16, dim_pad = (p.dim + 15) / 16 * 16;
  const bool channel_major = p.sc != 1;
  float* kv = scratch;                                        // K^T [dim][seq_pad] or V [seq][dim_pad]
  float* scores = kv + std::max(p.dim * seq_pad, p.seq * dim_pad);  // [kRows][seq_pad]
  float scale[kRows], inv_sum[kRows];
  std::fill(scale, scale + kRows, p.scale);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.heads, h = t % p.heads;
    const float* q = p.qkv + b * p.sb + h * p.dim * p.sc;
    const float *kt, *v;  // K^T rows (ldk apart, up to nk columns read) and V rows (ldv apart)
    int64_t ldk, nk, ldv;
    if (channel_major) {  // K^T in place; V rows by transposing V^T (the roles of transpose_keys swap)
      kt = q + p.k_off * p.sc, ldk = p.sc, nk = p.seq;
      transpose_keys(q + p.v_off * p.sc, p.sc, p.dim, p.seq, dim_pad, kv);
      v = kv, ldv = dim_pad;
    } else {
      transpose_keys(q + p.k_off, p.st, p.seq, p.dim, seq_pad, kv);
      kt = kv, ldk = seq_pad, nk = seq_pad;
      v = q + p.v_off, ldv = p.st;
    }
    float* out = p.out + b * p.ob + h * p.dim;
    for (int64_t i0 = 0; i0 < p.seq; i0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, p.seq - i0);
      const int64_t keys = keys_needed(p, b, h, i0, rows);  // the rest have probability 0
      gemm_cols<Fp32Mul>(rows, q + i0 * p.st, p.st, p.sc, kt, ldk, p.dim, scale, scores, seq_pad, std::min(nk, keys));
      for (int64_t r = 0; r < rows; ++r) {
        inv_sum[r] = softmax_row_avx512(scores + r * seq_pad, keys, p.mask_kind, mask_row(p, b, h, i0 + r));
      }
      gemm_cols<Fp32Mul>(rows, scores, seq_pad, 1, v, ldv, keys, inv_sum, out + i0 * p.ot, p.ot, p.dim);
    }
  }
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#else  // not x86: never selected (isa_supported is false), defined so that the binding links
namespace sparse_ofa_cpu {
void attention_avx512(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  attention_scalar(p, t0, t1, scratch);
}
}  // namespace sparse_ofa_cpu
#endif
