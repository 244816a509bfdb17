// 256-bit helpers shared by the AVX2 / AVX-VNNI translation units (avx2_impl.h, attention_avx2.cpp).
// Include only inside a `#pragma GCC target("avx2...")` region, after <immintrin.h>. The math part
// (gelu8, exp8, horizontal sums) uses FMA: it is compiled only where the region also enables "fma"
// (define SPARSE_OFA_AVX2_MATH before including).
#pragma once

#include <cstdint>

namespace sparse_ofa_cpu {
namespace {

// r[i] lane j <-> r[j] lane i (8x8 dwords: 24 shuffles)
inline void transpose8x8(__m256i r[8]) {
  __m256i a[8], b[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    b[i] = _mm256_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm256_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm256_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm256_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x31);
  }
}

// all-ones in the dword lanes < n (n clamped to [0, 8])
inline __m256i lanes_below(int64_t n) {
  const int live = n <= 0 ? 0 : (n >= 8 ? 8 : (int)n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(live), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#ifdef SPARSE_OFA_AVX2_MATH
// GELU(x) = 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.28 as gelu_ps in avx512_util.h;
// 1 / p by a division (AVX2 has no vrcp14ps: vrcpps' 12 bits + one Newton step would leave ~2 ulp
// before the 16th power). The AVX2 post-ops and the AVX2 fused ops' epilogue both use this one, so
// the fused ops equal the linears they replace bit for bit.
inline __m256 gelu8(__m256 x) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // z capped at 5 (NaN stays NaN: min returns its second operand then), as gelu_ps
  const __m256 z = _mm256_min_ps(_mm256_set1_ps(5.0f),
                                 _mm256_and_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)), abs_mask));
  __m256 p = _mm256_set1_ps(0.0000430638f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.0002765672f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.0001520143f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.0092705272f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.0422820123f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.0705230784f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.f));
  __m256 r = _mm256_div_ps(_mm256_set1_ps(1.f), p);
  r = _mm256_mul_ps(r, r);
  r = _mm256_mul_ps(r, r);
  r = _mm256_mul_ps(r, r);
  r = _mm256_mul_ps(r, r);
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  const __m256 erf = _mm256_or_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), r), _mm256_and_ps(x, sign));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), erf));
}

// e^x as exp_ps in avx512_util.h (degree-7 Taylor polynomial of e^r, r = x - n ln 2), with 2^n built
// in the exponent bits (no vscalefps): x is clamped to [-87.3, 88.3] so that n stays in [-126, 127];
// x below -87.3 (and -inf) gives 0, NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 tiny = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(lowest, _mm256_min_ps(_mm256_set1_ps(88.3f), x));  // both return x when x is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif  // SPARSE_OFA_AVX2_MATH

}  // namespace
}  // namespace sparse_ofa_cpu
