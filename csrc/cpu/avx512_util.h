// AVX-512 helpers shared by the AVX-512 translation units (avx512.cpp, attention_avx512.cpp).
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

}  // namespace
}  // namespace sparse_ofa_cpu
