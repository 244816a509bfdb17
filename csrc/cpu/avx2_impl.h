// The AVX2 product (8 tokens per ymm), included by avx2.cpp (plain AVX2) and avxvnni.cpp (AVX-VNNI)
// under their own `#pragma GCC target`, with SPARSE_OFA_VNNI 0 or 1 and SPARSE_OFA_SPMM the name.
//
// VNNI (flip 0x80, xt holds u8 = x + 128):  c += vpdpbusd(x_u8 quads, w quads)   (AVX-VNNI, ymm)
// plain AVX2 (flip 0, xt holds s8): vpmaddubsw would saturate int16 (255 * 127 * 2 > 32767), so the
// quads are split into sign-extended int16 halves and multiplied with vpmaddwd, exactly:
//     even = (x0, x2), odd = (x1, x3) per dword;  c += madd(even_x, even_w) + madd(odd_x, odd_w)
// each madd lane is x0*w0 + x2*w2, |.| <= 2 * 128 * 127, so nothing saturates.
// The epilogue writes a [16 channels][128 tokens] tile and stores it transposed with scalar code.
#include <immintrin.h>

#include "sparse_cpu.h"

namespace sparse_ofa_cpu {
namespace {

template <int T>
inline void row_product8(const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1,
                         const uint8_t* base, int64_t qstride, __m256i* out) {
  __m256i c[T];
  for (int t = 0; t < T; ++t) c[t] = _mm256_setzero_si256();
  for (int32_t p = p0; p < p1; ++p) {
    const __m256i w = _mm256_set1_epi32(qw[p]);
    const uint8_t* src = base + (int64_t)qk[p] * qstride;
#if SPARSE_OFA_VNNI
    for (int t = 0; t < T; ++t)
      c[t] = _mm256_dpbusd_avx_epi32(c[t], _mm256_loadu_si256((const __m256i*)(src + 32 * t)), w);
#else
    const __m256i w_even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
    const __m256i w_odd = _mm256_srai_epi16(w, 8);
    for (int t = 0; t < T; ++t) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)(src + 32 * t));
      const __m256i x_even = _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 8);
      const __m256i x_odd = _mm256_srai_epi16(x, 8);
      c[t] = _mm256_add_epi32(c[t], _mm256_add_epi32(_mm256_madd_epi16(x_even, w_even),
                                                     _mm256_madd_epi16(x_odd, w_odd)));
    }
#endif
  }
  for (int t = 0; t < T; ++t) out[t] = c[t];
}

inline void row_product8_any(int T, const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1,
                             const uint8_t* base, int64_t qstride, __m256i* out) {
  switch (T) {
    case 1: return row_product8<1>(qw, qk, p0, p1, base, qstride, out);
    case 2: return row_product8<2>(qw, qk, p0, p1, base, qstride, out);
    case 3: return row_product8<3>(qw, qk, p0, p1, base, qstride, out);
    case 4: return row_product8<4>(qw, qk, p0, p1, base, qstride, out);
    case 5: return row_product8<5>(qw, qk, p0, p1, base, qstride, out);
    case 6: return row_product8<6>(qw, qk, p0, p1, base, qstride, out);
    case 7: return row_product8<7>(qw, qk, p0, p1, base, qstride, out);
    default: return row_product8<8>(qw, qk, p0, p1, base, qstride, out);
  }
}

}  // namespace

void SPARSE_OFA_SPMM(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  const int64_t ngroups = (w.n + kRowGroup - 1) / kRowGroup;
  const int64_t qstride = a.mp * 4;
  alignas(32) int32_t tile[kRowGroup][kTokenBlock];
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t m0 = (task / ngroups) * kTokenBlock, n0 = (task % ngroups) * kRowGroup;
    const int64_t mt = a.m - m0 < kTokenBlock ? a.m - m0 : kTokenBlock;
    const int64_t nr = w.n - n0 < kRowGroup ? w.n - n0 : kRowGroup;
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t n = n0 + r;
      const uint32_t corr = (uint32_t)w.rowsum[n] * (a.flip ? 128u : 0u);
      for (int64_t h = 0; h < mt; h += 64) {  // 64 tokens (8 ymm) at a time: 16 registers only
        const int T = (int)((mt - h < 64 ? mt - h : 64) + 7) / 8;
        __m256i acc[8];
        row_product8_any(T, w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], a.xt + (m0 + h) * 4,
                         qstride, acc);
        for (int t = 0; t < T; ++t)
          _mm256_store_si256((__m256i*)&tile[r][h + 8 * t],
                             _mm256_sub_epi32(acc[t], _mm256_set1_epi32((int32_t)corr)));
      }
    }
    // tile[channel][token] -> out[token][channel]; the epilogue inline (a call per element was
    // most of this path's time)
    for (int64_t i = 0; i < mt; ++i) {
      const int64_t m = m0 + i;
      if (e.kind == kOutInt32) {
        int32_t* o = (int32_t*)e.out + m * e.ldo + n0;
        for (int64_t r = 0; r < nr; ++r) o[r] = tile[r][i];
        continue;
      }
      const float xs = a.x_scale[m];
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t n = n0 + r;
        float y = ((float)tile[r][i] * xs) * e.w_scale[n];
        if (e.bias) y = y + e.bias[n];
        if (e.kind == kOutFloat) ((float*)e.out)[m * e.ldo + n] = y;
        else ((uint16_t*)e.out)[m * e.ldo + n] = float_to_bf16(y);
      }
    }
  }
}

}  // namespace sparse_ofa_cpu
