// The channel-major products of the fused ops, AVX-512 VNNI, one 64-token tile: the FFN's intermediate
// (csrc/cpu_ffn.cpp) and the QKV projection read by the attention (csrc/cpu_attention.cpp).
//
//   spmm_cols_avx512:  y^T[n][0..64) = GELU(((acc[n] * x_scale) * w_scale[n]) + b[n])  for every row n
//       The row kernels' accumulators hold 16 tokens of ONE channel: stored as they are, they ARE
//       the channel-major output (no 16x16 transposes). On the way, if asked, per token lane: max |y|
//       (the next linear's dynamic quantization scale) and whether any y is NaN/Inf.
//   quant_pack_cols_avx512:  y^T -> the next linear's activation layout (sparse_cpu.h), quantized
//       per token exactly as quantize_rows_avx512 does a row-major row:
//           inv = (1 / amax) * 127, q = rne(y * inv)                     (dynamic, no clamp needed)
//           q = clamp(rne(y * inv_scale) + zero_point, qmin, qmax)     (static)
//       kind 0 quads: dword (q, m) = bytes q[4q + j][m] ^ flip, j = 0..3 (shifts and ors of 4 rows;
//       the row-major path needs dword transposes); kind 1 columns: bytes q[k][m] ^ flip as they are.
//       Tokens with a NaN/Inf anywhere take quantize_row_exact, like a bad row-major row.
#include <cstring>
#include <vector>

#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "avx512_util.h"
#include "avx512_rows.h"

namespace sparse_ofa_cpu {

void spmm_cols_avx512(const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias, bool gelu,
                      float* yt, int64_t ldy, float* amax, uint64_t* nonfinite) {
  constexpr int T = kTileTokens / 16;
  __m512 xs[T], mx[T];
  __mmask16 bad[T];
  for (int t = 0; t < T; ++t) {
    xs[t] = _mm512_maskz_loadu_ps(first_n(a.m - 16 * t), a.x_scale + 16 * t);  // padding tokens: 0
    mx[t] = _mm512_setzero_ps();
    bad[t] = 0;
  }
  for (int64_t n = 0; n < w.n; ++n) {
    __m512i acc[T];
    if (w.gather) row_gather<1, 4>(w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], a.xt, a.mp, acc);
    else row_product<T, 2>(w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], a.xt, a.mp * 4, acc);
    __m512 y[T];
    float_epilogue<T>(acc, flip_correction(w, n, a.flip), xs, w_scale[n], bias ? bias + n : nullptr, gelu, y);
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(yt + n * ldy + 16 * t, y[t]);
    if (amax == nullptr) continue;
    for (int t = 0; t < T; ++t) {
      mx[t] = _mm512_max_ps(mx[t], _mm512_abs_ps(y[t]));
      bad[t] |= _mm512_fpclass_ps_mask(y[t], 0x01 | 0x80 | 0x08 | 0x10);  // QNaN, SNaN, +Inf, -Inf
    }
  }
  if (amax == nullptr) return;
  uint64_t bits = 0;
  for (int t = 0; t < T; ++t) {
    _mm512_storeu_ps(amax + 16 * t, mx[t]);
    bits |= (uint64_t)(bad[t] & first_n(a.m - 16 * t)) << (16 * t);
  }
  *nonfinite = bits;
}

void quant_pack_cols_avx512(const float* yt, int64_t k, int64_t m, const float* amax, uint64_t nonfinite,
                            const QuantParams& qp, int layout, uint8_t flip, uint8_t* xt, float* x_scale) {
  constexpr int T = kTileTokens / 16;
  const bool dynamic = qp.static_scale == 0.0f;
  __m512 inv[T];
  for (int t = 0; t < T; ++t) {
    const __mmask16 live = first_n(m - 16 * t);
    if (dynamic) {
      // as quantize_rows: inv = (1 / a) * 127 and x_scale = a / 127, both 0 for an all-zero token
      const __m512 a = _mm512_loadu_ps(amax + 16 * t);
      const __mmask16 nz = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      inv[t] = _mm512_maskz_mul_ps(nz, _mm512_div_ps(_mm512_set1_ps(1.0f), a), _mm512_set1_ps(127.0f));
      _mm512_mask_storeu_ps(x_scale + 16 * t, live, _mm512_maskz_div_ps(nz, a, _mm512_set1_ps(127.0f)));
    } else {
      inv[t] = _mm512_set1_ps(qp.inv_scale);
      _mm512_mask_storeu_ps(x_scale + 16 * t, live, _mm512_set1_ps(qp.static_scale));
    }
  }
  const __m512 lo = _mm512_set1_ps((float)qp.qmin), hi = _mm512_set1_ps((float)qp.qmax);
  const __m512 zp = _mm512_set1_ps((float)qp.zero_point);
  // int32 q (16 tokens) of channel row kk; rows past k are zeros (the padding of the last quad)
  auto quant16 = [&](int64_t kk, int t) -> __m512i {
    if (kk >= k) return _mm512_setzero_si512();
    __m512 v = _mm512_mul_ps(_mm512_load_ps(yt + kk * kTileTokens + 16 * t), inv[t]);
    if (!dynamic) {
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zp), lo), hi);
    }
    return _mm512_cvtps_epi32(v);  // round half to even (MXCSR default)
  };
  const __m512i ff = _mm512_set1_epi32(0xFF);
  if (layout == kActCols8) {
    const __m128i flip16 = _mm_set1_epi8((char)flip);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int t = 0; t < T; ++t)
        _mm_store_si128((__m128i*)(xt + kk * kTileTokens + 16 * t),
                        _mm_xor_si128(_mm512_cvtepi32_epi8(quant16(kk, t)), flip16));
  } else {
    const __m512i flip32 = _mm512_set1_epi32((int32_t)(0x01010101u * flip));
    const int64_t nq = (k + 3) / 4;
    for (int64_t q = 0; q < nq; ++q)
      for (int t = 0; t < T; ++t) {
        const __m512i b0 = _mm512_and_si512(quant16(4 * q, t), ff);
        const __m512i b1 = _mm512_slli_epi32(_mm512_and_si512(quant16(4 * q + 1, t), ff), 8);
        const __m512i b2 = _mm512_slli_epi32(_mm512_and_si512(quant16(4 * q + 2, t), ff), 16);
        const __m512i b3 = _mm512_slli_epi32(quant16(4 * q + 3, t), 24);
        const __m512i d = _mm512_or_si512(_mm512_or_si512(b0, b1), _mm512_or_si512(b2, b3));
        _mm512_store_si512(xt + (q * kTileTokens + 16 * t) * 4, _mm512_xor_si512(d, flip32));
      }
  }
  for (uint64_t bits = nonfinite; bits; bits &= bits - 1)
    quantize_token_exact(yt, k, __builtin_ctzll(bits), qp, layout, flip, xt, x_scale);
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#endif  // x86 (elsewhere the fused ops run their op sequences and these are never referenced)
