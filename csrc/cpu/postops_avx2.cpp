// AVX2 + FMA post-ops (sparse_cpu.h, PostOps) on a finished float32 output row, 8 channels at a time:
// the AVX-512 post-ops (postops_avx512.cpp) in 256-bit lanes, same formulas and order.
//   GELU: gelu8 (avx2_util.h), also used by the AVX2 fused ops' epilogue.
//   LayerNorm: mean, then the mean square of (y - mean) (two passes over the cached row), fp32 lanes.
// The last n % 8 channels go through the same vector code on a zero-padded copy (lanes past n are
// masked out of the LayerNorm sums and never stored).
#include <cmath>
#include <cstring>

#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSE_OFA_AVX2_MATH
#include "avx2_util.h"

namespace sparse_ofa_cpu {

namespace {

// 8 floats from p, or the first `live` of them and zeros (live < 8)
inline __m256 load8(const float* p, int64_t live) {
  if (live >= 8) return _mm256_loadu_ps(p);
  alignas(32) float t[8] = {};
  std::memcpy(t, p, live * sizeof(float));
  return _mm256_load_ps(t);
}

inline void store8(float* p, __m256 v, int64_t live) {
  if (live >= 8) return _mm256_storeu_ps(p, v);
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  std::memcpy(p, t, live * sizeof(float));
}

inline __m256 first_lanes(int64_t live) {  // all-ones in lanes < live
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(live < 8 ? live : 8)), iota));
}

}  // namespace

void post_rows_avx2(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* row = y + m * ldy;
    const float* res = p.residual ? p.residual + m * p.ldr : nullptr;
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
      const int64_t live = n - j;
      __m256 v = load8(row + j, live);
      if (res) v = _mm256_add_ps(v, load8(res + j, live));
      if (p.gelu) v = gelu8(v);
      vsum = _mm256_add_ps(vsum, live >= 8 ? v : _mm256_and_ps(v, first_lanes(live)));
      store8(row + j, v, live);
    }
    if (!p.ln_w) continue;
    const float mean = hsum8(vsum) / (float)n;
    const __m256 vmean = _mm256_set1_ps(mean);
    __m256 vsq = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
      const int64_t live = n - j;
      __m256 d = _mm256_sub_ps(load8(row + j, live), vmean);
      if (live < 8) d = _mm256_and_ps(d, first_lanes(live));
      vsq = _mm256_fmadd_ps(d, d, vsq);
    }
    const float rstd = 1.f / std::sqrt(hsum8(vsq) / (float)n + p.ln_eps);
    const __m256 vrstd = _mm256_set1_ps(rstd);
    for (int64_t j = 0; j < n; j += 8) {
      const int64_t live = n - j;
      __m256 v = _mm256_mul_ps(_mm256_sub_ps(load8(row + j, live), vmean), vrstd);
      v = _mm256_mul_ps(v, load8(p.ln_w + j, live));
      if (p.ln_b) v = _mm256_add_ps(v, load8(p.ln_b + j, live));
      store8(row + j, v, live);
    }
  }
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#else  // not x86: never selected (isa_supported is false), defined so that the binding links
namespace sparse_ofa_cpu {
void post_rows_avx2(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  post_rows_scalar(p, y, ldy, n, m0, m1);
}
}  // namespace sparse_ofa_cpu
#endif
