// AVX-512 helpers shared by the AVX-512 translation units (avx512.cpp, attention_avx512.cpp,
// postops_avx512.cpp).
// Include only inside a `#pragma GCC target("avx512f,...")` region, after <immintrin.h>.
#pragma once

namespace sparse_ofa_cpu {
namespace {

// r[i] (16 rows of 16 dwords) -> r[j] holds column j. Three unpack/shuffle stages + one permute.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4b + c] now holds, in 128-bit lane L, column 4L + c' of rows 4b..4b+3 (c' = c order 0,1,2,3)
  for (int i = 0; i < 4; ++i) {
    // combine blocks b = 0,1 and 2,3: lanes (0,2) <- first, ...
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);        // lanes 0,2 of r[i]; 0,2 of r[4+i]
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xDD);    // lanes 1,3
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);        // column i
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);    // column 8 + i
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);  // column 4 + i
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);  // column 12 + i
  }
}

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// e^x = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
// so that n ln 2 is exact), e^r by its degree-7 Taylor polynomial (truncation < 3e-9 relative),
// 2^n applied by vscalefps. x below -87.3 (and -inf) gives 0; NaN stays NaN.
inline __m512 exp_ps(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.3f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
  x = _mm512_max_ps(lowest, x);  // returns x when x is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

// GELU(x) = 0.5 x (1 + erf(x / sqrt 2)).
// erf by Abramowitz & Stegun 7.1.28, erf(z) = 1 - (1 + a1 z + ... + a6 z^6)^-16 for z >= 0,
// odd for z < 0 (|error| <= 3e-7): evaluated in fp32 the GELU is within ~9e-7 of exact on
// [-12, 12], torch's own fp32 GELU within ~1.2e-6. No exp and no division: ~2x cheaper than
// 7.1.26 (t = 1/(1 + p z), e^(-z^2)), which measured as slow as torch's separate gelu op.
inline __m512 gelu_ps(__m512 x) {
  // z capped at 5 (NaN stays NaN: min returns its second operand then): there 1 - r is already 1.0f,
  // and larger z would drive r^16 into denormals (100+ cycle assists) without changing the result
  const __m512 z = _mm512_min_ps(_mm512_set1_ps(5.0f), _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f))));
  __m512 p = _mm512_set1_ps(0.0000430638f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0002765672f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0001520143f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0092705272f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0422820123f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0705230784f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f));
  // r = 1 / p by vrcp14ps + one Newton step (~1 ulp), then r^16 by four squarings (p = inf: r = 0)
  __m512 r = _mm512_rcp14_ps(p);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(p, r, _mm512_set1_ps(2.f)));
  r = _mm512_mul_ps(r, r);
  r = _mm512_mul_ps(r, r);
  r = _mm512_mul_ps(r, r);
  r = _mm512_mul_ps(r, r);
  // erf(z) = 1 - r with the sign of x
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
  const __m512 erf = _mm512_or_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), r), _mm512_and_ps(x, sign));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}

}  // namespace
}  // namespace sparse_ofa_cpu
