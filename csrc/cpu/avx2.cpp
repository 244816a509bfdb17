// AVX2 path without VNNI (Haswell .. Skylake client, Zen 1-3): product via vpmaddwd (avx2_impl.h)
// and a vectorised activation quantizer.
#include <cmath>
#include <cstdint>

#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2")
#define SPARSE_OFA_VNNI 0
#define SPARSE_OFA_SPMM spmm_avx2
#include "avx2_impl.h"

namespace sparse_ofa_cpu {

// The loop of the 256-bit packs, 8 tokens x 8 quads per 8x8 dword transpose (one 32-byte load per
// token row): block(r, q0, m) gets r[j] dword t = quad q0 + j (4 input channels) of token m + t, each
// byte ^ flip; tail(q_from, m_lo, m_hi, m_end) packs quads [q_from, nq) of tokens [m_lo, m_end) (those
// past m_hi as padding): the quads past the last 8-quad block, the partial quad at K, padding tokens
// and partial token blocks.
template <class Block, class Tail>
static inline void pack_8x8(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend,
                            uint8_t flip, const Block& block, const Tail& tail) {
  const int64_t q8 = k / 4 / 8 * 8;  // quads in whole 8-quad blocks, all inside K
  const __m256i flipv = _mm256_set1_epi8((char)flip);
  int64_t m = m0;
  for (; m + 8 <= m1 && q8 > 0; m += 8) {
    for (int64_t q0 = 0; q0 < q8; q0 += 8) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(xq + (m + i) * ldx + 4 * q0)), flipv);
      transpose8x8(r);
      block(r, q0, m);
    }
    if (q8 * 4 < k) tail(q8, m, m + 8, m + 8);
  }
  if (m < mend) tail(0, m, m1, mend);
}

// A quad's dword per token (8 tokens) regrouped by channel: qword c = channel c of the quad, tokens
// in order (vpshufb in lanes: 4 tokens x 4 channels -> 4 channels x 4 tokens; vpermd: the two
// lanes' halves of a channel together).
static inline __m256i by_channel(__m256i quad) {
  const __m256i shuffle =
      _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  return _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(quad, shuffle), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The layout-0 pack of the 256-bit paths (AVX2 and AVX-VNNI: the same layout, `flip` differs):
// xt[(q * mp + m) * 4 ..] = quad q of token m ^ flip, one 32-byte store per quad and 8 tokens.
void pack_acts_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                    uint8_t* xt, int64_t mp) {
  pack_8x8(xq, ldx, k, m0, m1, mend, flip,
           [&](const __m256i* r, int64_t q0, int64_t m) {
             for (int j = 0; j < 8; ++j) _mm256_storeu_si256((__m256i*)(xt + ((q0 + j) * mp + m) * 4), r[j]);
           },
           [&](int64_t q, int64_t lo, int64_t hi, int64_t end) { pack_quads_scalar(xq, ldx, k, q, lo, hi, end, flip, xt, mp); });
}

// Layout kActQuads16 (the plain AVX2 path): each quad's dwords split into sign-extended int16 pairs,
// even = (x0, x2) = (dword << 8 per word) >> 8 arithmetic, odd = (x1, x3) = dword >> 8 per word.
void pack_acts16_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, int16_t* xt,
                      int64_t mp) {
  pack_8x8(xq, ldx, k, m0, m1, mend, 0,
           [&](const __m256i* r, int64_t q0, int64_t m) {
             for (int j = 0; j < 8; ++j) {
               int16_t* dst = xt + quads16_index(4 * (q0 + j), m, mp);
               _mm256_storeu_si256((__m256i*)dst, _mm256_srai_epi16(_mm256_slli_epi16(r[j], 8), 8));
               _mm256_storeu_si256((__m256i*)(dst + 16), _mm256_srai_epi16(r[j], 8));
             }
           },
           [&](int64_t q, int64_t lo, int64_t hi, int64_t end) { pack_quads16_scalar(xq, ldx, k, q, lo, hi, end, xt, mp); });
}

// Layout kind 1 (gathered quads): xk[kk * mp + m] = x_q[m, kk] ^ flip, 8 bytes stored per channel.
void pack_cols_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                    uint8_t* xk, int64_t mp) {
  pack_8x8(xq, ldx, k, m0, m1, mend, flip,
           [&](const __m256i* r, int64_t q0, int64_t m) {
             for (int j = 0; j < 8; ++j) {
               const __m256i v = by_channel(r[j]);
               uint8_t* dst = xk + 4 * (q0 + j) * mp + m;  // qword c of v: channel 4 (q0 + j) + c
               const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
               _mm_storel_epi64((__m128i*)dst, lo);
               _mm_storeh_pd((double*)(dst + mp), _mm_castsi128_pd(lo));
               _mm_storel_epi64((__m128i*)(dst + 2 * mp), hi);
               _mm_storeh_pd((double*)(dst + 3 * mp), _mm_castsi128_pd(hi));
             }
           },
           [&](int64_t q, int64_t lo, int64_t hi, int64_t end) {
             pack_cols_range_scalar(xq, ldx, k, 4 * q, lo, hi, end, flip, xk, mp);
           });
}

// Layout kActCols16 (the plain AVX2 path): xk[kk * mp + m] = (int16) x_q[m, kk], each channel's 8
// token bytes sign-extended and stored as 16 bytes.
void pack_cols16_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, int16_t* xk,
                      int64_t mp) {
  pack_8x8(xq, ldx, k, m0, m1, mend, 0,
           [&](const __m256i* r, int64_t q0, int64_t m) {
             for (int j = 0; j < 8; ++j) {
               const __m256i v = by_channel(r[j]);
               int16_t* dst = xk + 4 * (q0 + j) * mp + m;  // qword c of v: channel 4 (q0 + j) + c
               const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
               _mm_storeu_si128((__m128i*)dst, _mm_cvtepi8_epi16(lo));
               _mm_storeu_si128((__m128i*)(dst + mp), _mm_cvtepi8_epi16(_mm_unpackhi_epi64(lo, lo)));
               _mm_storeu_si128((__m128i*)(dst + 2 * mp), _mm_cvtepi8_epi16(hi));
               _mm_storeu_si128((__m128i*)(dst + 3 * mp), _mm_cvtepi8_epi16(_mm_unpackhi_epi64(hi, hi)));
             }
           },
           [&](int64_t q, int64_t lo, int64_t hi, int64_t end) {
             pack_cols16_range_scalar(xq, ldx, k, 4 * q, lo, hi, end, xk, mp);
           });
}

// quant.py numerics, 8 floats at a time; rows with NaN/Inf go to quantize_row_exact.
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                        const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale) {
  const bool dynamic = qp.static_scale == 0.0f;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const int64_t kv = k / 8 * 8;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = xq + m * ldq;
    __m256 amax = _mm256_setzero_ps();
    __m256 bad = _mm256_setzero_ps();
    for (int64_t i = 0; i < kv; i += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + i), abs_mask);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or Inf
      amax = _mm256_max_ps(amax, a);
    }
    float am = 0.0f;
    bool nonfinite = _mm256_movemask_ps(bad) != 0;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    for (int j = 0; j < 8; ++j) am = lanes[j] > am ? lanes[j] : am;
    for (int64_t i = kv; i < k; ++i) {
      const float a = xr[i] < 0 ? -xr[i] : xr[i];
      if (!(a < INFINITY)) nonfinite = true;
      else if (a > am) am = a;
    }
    if (nonfinite) {
      quantize_row_exact(xr, k, qp, qr, x_scale + m);
      continue;
    }
    float inv, lo, hi, zp;
    if (dynamic) {
      inv = am != 0.0f ? (1.0f / am) * 127.0f : 0.0f;  // as torch: reciprocal, then * 127
      x_scale[m] = am != 0.0f ? am / 127.0f : 0.0f;
      lo = -127.0f, hi = 127.0f, zp = 0.0f;
    } else {
      inv = qp.inv_scale, x_scale[m] = qp.static_scale;
      lo = (float)qp.qmin, hi = (float)qp.qmax, zp = (float)qp.zero_point;
    }
    const __m256 invv = _mm256_set1_ps(inv), lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi),
                 zpv = _mm256_set1_ps(zp);
    // q = clamp(rne(x * inv) + zp, lo, hi); dynamic rows need no clamp (|x * inv| <= 127 * (1 + 2^-23)
    // rounds to at most 127), as in quantize_rows_avx512
    auto quant8 = [&](const float* p) -> __m256i {
      __m256 r = _mm256_mul_ps(_mm256_loadu_ps(p), invv);
      if (!dynamic) {
        r = _mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zpv), lov), hiv);
      }
      return _mm256_cvtps_epi32(r);  // round half to even (MXCSR default)
    };
    // 32 values -> 32 bytes: two saturating packs (values already in range), in-lane order
    // [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7] as dwords, put back in order by one permute
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const int64_t k32 = k / 32 * 32;
    for (int64_t i = 0; i < k32; i += 32) {
      const __m256i ab = _mm256_packs_epi32(quant8(xr + i), quant8(xr + i + 8));
      const __m256i cd = _mm256_packs_epi32(quant8(xr + i + 16), quant8(xr + i + 24));
      _mm256_storeu_si256((__m256i*)(qr + i), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order));
    }
    for (int64_t i = k32; i < kv; i += 8) {
      alignas(32) int32_t qi[8];
      _mm256_store_si256((__m256i*)qi, quant8(xr + i));
      for (int j = 0; j < 8; ++j) qr[i + j] = (int8_t)qi[j];
    }
    for (int64_t i = kv; i < k; ++i) {
      float r = __builtin_nearbyintf(xr[i] * inv) + zp;
      r = r < lo ? lo : (r > hi ? hi : r);
      qr[i] = (int8_t)(int)r;
    }
  }
}

}  // namespace sparse_ofa_cpu
#pragma GCC pop_options

#else
// Not x86: these only link. isa_supported(kAvx2) is false here, so no caller reaches them (and
// spmm_scalar would read the int16 layouts as bytes).
namespace sparse_ofa_cpu {
void pack_acts_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                    uint8_t* xt, int64_t mp) { pack_acts_scalar(xq, ldx, k, m0, m1, mend, flip, xt, mp); }
void pack_cols_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                    uint8_t* xk, int64_t mp) { pack_cols_scalar(xq, ldx, k, m0, m1, mend, flip, xk, mp); }
void pack_cols16_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, int16_t* xk,
                      int64_t mp) { pack_cols16_range_scalar(xq, ldx, k, 0, m0, m1, mend, xk, mp); }
void pack_acts16_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, int16_t* xt,
                      int64_t mp) { pack_quads16_scalar(xq, ldx, k, 0, m0, m1, mend, xt, mp); }
void spmm_avx2(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  spmm_scalar(w, a, e, t0, t1);
}
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                        const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale) {
  quantize_rows_scalar(x, ldx, k, m0, m1, qp, xq, ldq, x_scale);
}
}  // namespace sparse_ofa_cpu
#endif
