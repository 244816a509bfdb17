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

}  // namespace
}  // namespace sparse_ofa_cpu
