// The channel-major steps of the fused FFN and QKV-attention ops on the 256-bit paths (the AVX-512
// ones: ffn_avx512.cpp), one 64-token tile:
//   spmm_cols_avx2:  the AVX2 product (vpmaddwd on int16 halves) written channel-major (avx2_impl.h);
//                    spmm_cols_avxvnni (fused_avxvnni.cpp) is the same with vpdpbusd.
//   quant_pack_cols_avx2:  y^T [k][64] -> the next linear's activation layout, quantized per token
//       exactly as quantize_rows_avx2 does a row-major row (same formulas: the fused FFN equals the
//       two linears bit for bit), for either 256-bit path (`flip` 0 for AVX2, 0x80 for AVX-VNNI):
//         inv = (1 / amax) * 127, q = rne(y * inv)                       (dynamic, no clamp needed)
//         q = clamp(rne(y * inv_scale) + zero_point, qmin, qmax)       (static)
//       kind 0 quads: dword (q, m) = bytes q[4q + j][m] ^ flip (shifts and ors of 4 channel rows), or
//       on plain AVX2 the int16 pairs (q[4q][m], q[4q + 2][m]) and (q[4q + 1][m], q[4q + 3][m]);
//       kind 1 columns: bytes q[k][m] ^ flip (AVX-VNNI) or int16 q[k][m] (plain AVX2, flip 0), 32
//       tokens per step; only the 8-token vectors with a live token (and for kind 1 up to the next
//       32); vectors past them as zeros, padding tokens inside a live vector as whatever the epilogue
//       gave them (their output rows are never stored).
//       Tokens with a NaN/Inf take
//       quantize_token_exact, like a bad row-major row.
// AVX2 + FMA (the GELU of the epilogue): the fused ops take these only where fma_supported().
#include <cstdint>

#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSE_OFA_AVX2_MATH
#define SPARSE_OFA_VNNI 0
#define SPARSE_OFA_SPMM_COLS spmm_cols_avx2
#include "avx2_impl.h"

namespace sparse_ofa_cpu {

void quant_pack_cols_avx2(const float* yt, int64_t k, int64_t m, const float* amax, uint64_t nonfinite,
                          const QuantParams& qp, int layout, uint8_t flip, uint8_t* xt, float* x_scale) {
  const int live = (int)((m + 7) / 8);  // vectors spmm_cols_avx2 wrote; the others are packed as zeros
  const bool dynamic = qp.static_scale == 0.0f;
  alignas(32) float inv[kTileTokens];
  for (int i = 0; i < kTileTokens; ++i) {
    if (dynamic) {  // as quantize_rows_avx2: both 0 for an all-zero token
      const float a = amax[i];
      inv[i] = a != 0.0f ? (1.0f / a) * 127.0f : 0.0f;
      if (i < m) x_scale[i] = a != 0.0f ? a / 127.0f : 0.0f;
    } else {
      inv[i] = qp.inv_scale;
      if (i < m) x_scale[i] = qp.static_scale;
    }
  }
  const __m256 lo = _mm256_set1_ps((float)qp.qmin), hi = _mm256_set1_ps((float)qp.qmax);
  const __m256 zp = _mm256_set1_ps((float)qp.zero_point);
  // int32 q (8 tokens) of channel row kk; rows past k are zeros (the padding of the last quad)
  auto quant8 = [&](int64_t kk, int t) -> __m256i {
    if (kk >= k || t >= live) return _mm256_setzero_si256();
    __m256 v = _mm256_mul_ps(_mm256_load_ps(yt + kk * kTileTokens + 8 * t), _mm256_load_ps(inv + 8 * t));
    if (!dynamic) {
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zp), lo), hi);
    }
    return _mm256_cvtps_epi32(v);  // round half to even (MXCSR default)
  };
  if (layout == kActCols16) {
    // 16 tokens -> 16 int16: one saturating pack (values in range), lanes [t 0-3, t+1 0-3 | t 4-7,
    // t+1 4-7] put in token order by one 64-bit permute
    int16_t* cols = (int16_t*)xt;
    const int vectors = (live + 3) / 4 * 4;  // whole 32-token steps: the gathered product reads those
    for (int64_t kk = 0; kk < k; ++kk)
      for (int t = 0; t < vectors; t += 2) {
        const __m256i pair = _mm256_packs_epi32(quant8(kk, t), quant8(kk, t + 1));
        _mm256_store_si256((__m256i*)(cols + kk * kTileTokens + 8 * t), _mm256_permute4x64_epi64(pair, 0xD8));
      }
  } else if (layout == kActCols8) {
    // 32 tokens -> 32 bytes: two saturating packs (values in range), then the dword order fixed
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i flip8 = _mm256_set1_epi8((char)flip);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int t = 0; t < live; t += 4) {  // (the gathered product reads whole 32-token steps)
        const __m256i ab = _mm256_packs_epi32(quant8(kk, t), quant8(kk, t + 1));
        const __m256i cd = _mm256_packs_epi32(quant8(kk, t + 2), quant8(kk, t + 3));
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        _mm256_store_si256((__m256i*)(xt + kk * kTileTokens + 8 * t), _mm256_xor_si256(bytes, flip8));
      }
  } else if (layout == kActQuads16) {
    // per quad and 8 tokens: even = (q0, q2), odd = (q1, q3) as int16 pairs (values in [-128, 127])
    const __m256i low16 = _mm256_set1_epi32(0xFFFF);
    int16_t* quads = (int16_t*)xt;
    const int64_t nq = (k + 3) / 4;
    for (int64_t q = 0; q < nq; ++q)
      for (int t = 0; t < live; ++t) {  // (the aligned product reads the live vectors only)
        const __m256i even = _mm256_or_si256(_mm256_and_si256(quant8(4 * q, t), low16),
                                             _mm256_slli_epi32(quant8(4 * q + 2, t), 16));
        const __m256i odd = _mm256_or_si256(_mm256_and_si256(quant8(4 * q + 1, t), low16),
                                            _mm256_slli_epi32(quant8(4 * q + 3, t), 16));
        int16_t* dst = quads + quads16_index(4 * q, 8 * t, kTileTokens);
        _mm256_store_si256((__m256i*)dst, even);
        _mm256_store_si256((__m256i*)(dst + 16), odd);
      }
  } else {
    const __m256i ff = _mm256_set1_epi32(0xFF);
    const __m256i flip32 = _mm256_set1_epi32((int32_t)(0x01010101u * flip));
    const int64_t nq = (k + 3) / 4;
    for (int64_t q = 0; q < nq; ++q)
      for (int t = 0; t < live; ++t) {  // (the aligned product reads the live vectors only)
        const __m256i b0 = _mm256_and_si256(quant8(4 * q, t), ff);
        const __m256i b1 = _mm256_slli_epi32(_mm256_and_si256(quant8(4 * q + 1, t), ff), 8);
        const __m256i b2 = _mm256_slli_epi32(_mm256_and_si256(quant8(4 * q + 2, t), ff), 16);
        const __m256i b3 = _mm256_slli_epi32(quant8(4 * q + 3, t), 24);
        const __m256i d = _mm256_or_si256(_mm256_or_si256(b0, b1), _mm256_or_si256(b2, b3));
        _mm256_store_si256((__m256i*)(xt + (q * kTileTokens + 8 * t) * 4), _mm256_xor_si256(d, flip32));
      }
  }
  for (uint64_t bits = nonfinite; bits; bits &= bits - 1)
    quantize_token_exact(yt, k, __builtin_ctzll(bits), qp, layout, flip, xt, x_scale);
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#endif  // x86 (elsewhere the fused ops run their op sequences and these are never referenced)
