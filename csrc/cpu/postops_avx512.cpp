// AVX-512 post-ops (sparse_cpu.h, PostOps) on a finished float32 output row, 16 channels at a time.
//   GELU: gelu_ps (avx512_util.h), also used by the product's own epilogue.
//   LayerNorm: mean, then the mean square of (y - mean) (two passes over the cached row), fp32 lanes.
#include <cmath>

#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "avx512_util.h"

namespace sparse_ofa_cpu {

void post_rows_avx512(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* row = y + m * ldy;
    const float* res = p.residual ? p.residual + m * p.ldr : nullptr;
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 live = first_n(n - j);
      __m512 v = _mm512_maskz_loadu_ps(live, row + j);
      if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, res + j));
      if (p.gelu) v = gelu_ps(v);
      vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(live, v));
      _mm512_mask_storeu_ps(row + j, live, v);
    }
    if (!p.ln_w) continue;
    const float mean = _mm512_reduce_add_ps(vsum) / (float)n;
    const __m512 vmean = _mm512_set1_ps(mean);
    __m512 vsq = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 live = first_n(n - j);
      const __m512 d = _mm512_maskz_sub_ps(live, _mm512_maskz_loadu_ps(live, row + j), vmean);
      vsq = _mm512_fmadd_ps(d, d, vsq);
    }
    const float rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(vsq) / (float)n + p.ln_eps);
    const __m512 vrstd = _mm512_set1_ps(rstd);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 live = first_n(n - j);
      __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + j), vmean), vrstd);
      v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(live, p.ln_w + j));
      if (p.ln_b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, p.ln_b + j));
      _mm512_mask_storeu_ps(row + j, live, v);
    }
  }
}

void dequant_rows_avx512(const int32_t* acc, int64_t lda, const float* x_scale, const float* w_scale,
                         const float* bias, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* a = acc + m * lda;
    float* row = y + m * ldy;
    const __m512 xs = _mm512_set1_ps(x_scale[m]);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 live = first_n(n - j);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(live, a + j));
      __m512 r = _mm512_mul_ps(_mm512_mul_ps(v, xs), _mm512_maskz_loadu_ps(live, w_scale + j));
      if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(live, bias + j));
      _mm512_mask_storeu_ps(row + j, live, r);
    }
  }
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#else  // not x86: never selected (isa_supported is false), defined so that the binding links
namespace sparse_ofa_cpu {
void post_rows_avx512(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  post_rows_scalar(p, y, ldy, n, m0, m1);
}
void dequant_rows_avx512(const int32_t* acc, int64_t lda, const float* x_scale, const float* w_scale,
                         const float* bias, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  dequant_rows_scalar(acc, lda, x_scale, w_scale, bias, y, ldy, n, m0, m1);
}
}  // namespace sparse_ofa_cpu
#endif
