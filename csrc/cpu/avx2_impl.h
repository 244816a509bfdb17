// The AVX2 product (8 tokens per ymm), included by avx2.cpp (plain AVX2) and avxvnni.cpp (AVX-VNNI)
// under their own `#pragma GCC target`, with SPARSE_OFA_VNNI 0 or 1 and SPARSE_OFA_SPMM the name of
// the product; and by fused_avx2.cpp / fused_avxvnni.cpp (target + "fma", SPARSE_OFA_AVX2_MATH) with
// SPARSE_OFA_SPMM_COLS the name of the fused ops' channel-major product. Each name that is defined gets
// its function. Both layouts: aligned quads (row_product8) and gathered quads (gather_tokens).
//
// VNNI (flip 0x80, xt holds u8 = x + 128):  c += vpdpbusd(x_u8 quads, w quads)   (AVX-VNNI, ymm)
// plain AVX2 (flip 0): vpmaddubsw would saturate int16 (255 * 127 * 2 > 32767), so the products use
// vpmaddwd on int16 activations packed for it: the aligned quads as even / odd int16 pairs
// (kActQuads16, against the weight halves of Weight4), the gathered columns as int16 (kActCols16),
// interleaved in pairs of rows in registers.
// The epilogue writes a [64 channels][128 tokens] tile and stores it transposed, 8x8 dwords at a
// time (store_tile8).
#include <immintrin.h>

#include <cstring>

#include "avx2_util.h"
#include "sparse_cpu.h"

namespace sparse_ofa_cpu {
namespace {

// 8 floats -> 8 bf16 (round to nearest even, NaN -> 0x7FC0), as float_to_bf16
inline __m128i to_bf16_8(__m256 f) {
  const __m256i b = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // dwords (< 2^16) -> words: packus in 128-bit lanes, then the two lanes' low halves together
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(w);
}

// out rows m0 + i (i < mt) x channels n0 + r (r < nr) from tile[r][i], 8 x 8 at a time; the float
// epilogue y = ((float)acc * x_scale[m]) * w_scale[n] + bias[n] in vector form (same operations, same
// order as store_epilogue_scalar). Tile rows [nr, nr rounded up to 8) must be readable.
template <int LD>
inline void store_tile8(const Epilogue& e, const PackedActs& a, const int32_t (*tile)[LD], int64_t m0, int64_t mt,
                        int64_t n0, int64_t nr) {
  for (int64_t i0 = 0; i0 < mt; i0 += 8) {
    const int rows = mt - i0 < 8 ? (int)(mt - i0) : 8;
    for (int64_t r0 = 0; r0 < nr; r0 += 8) {
      const int nc = nr - r0 < 8 ? (int)(nr - r0) : 8;
      __m256i v[8];
      for (int j = 0; j < 8; ++j) v[j] = _mm256_load_si256((const __m256i*)&tile[r0 + j][i0]);
      transpose8x8(v);  // v[t] = channels r0 .. r0 + 7 of token i0 + t
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(nc), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      __m256 ws = _mm256_setzero_ps(), b = _mm256_setzero_ps();
      if (e.kind != kOutInt32) {
        ws = _mm256_maskload_ps(e.w_scale + n0 + r0, live);
        if (e.bias) b = _mm256_maskload_ps(e.bias + n0 + r0, live);
      }
      for (int t = 0; t < rows; ++t) {
        const int64_t off = (m0 + i0 + t) * e.ldo + n0 + r0;
        if (e.kind == kOutInt32) {
          if (nc == 8) _mm256_storeu_si256((__m256i*)((int32_t*)e.out + off), v[t]);
          else _mm256_maskstore_epi32((int32_t*)e.out + off, live, v[t]);
          continue;
        }
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v[t]), _mm256_set1_ps(a.x_scale[m0 + i0 + t])), ws);
        if (e.bias) y = _mm256_add_ps(y, b);
        if (e.kind == kOutFloat) {
          if (nc == 8) _mm256_storeu_ps((float*)e.out + off, y);
          else _mm256_maskstore_ps((float*)e.out + off, live, y);
        } else if (nc == 8) {
          _mm_storeu_si128((__m128i*)((uint16_t*)e.out + off), to_bf16_8(y));
        } else {
          alignas(16) uint16_t h[8];
          _mm_store_si128((__m128i*)h, to_bf16_8(y));
          std::memcpy((uint16_t*)e.out + off, h, sizeof(uint16_t) * nc);
        }
      }
    }
  }
}

// One weight quad broadcast: as is for vpdpbusd (u8 x s8) with VNNI; without it split into
// sign-extended int16 halves for vpmaddwd against kActQuads16, exactly: even = (w0, w2), odd =
// (w1, w3) per dword; each madd lane is x0*w0 + x2*w2, |.| <= 2 * 128 * 128.
struct Weight4 {
#if SPARSE_OFA_VNNI
  __m256i w;
  explicit Weight4(int32_t q) : w(_mm256_set1_epi32(q)) {}
#else
  __m256i even, odd;
  explicit Weight4(int32_t q) {
    const __m256i w = _mm256_set1_epi32(q);
    even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
    odd = _mm256_srai_epi16(w, 8);
  }
#endif
};

#if SPARSE_OFA_VNNI
inline __m256i dot4(__m256i c, __m256i x, const Weight4& w) { return _mm256_dpbusd_avx_epi32(c, x, w.w); }
constexpr int64_t kQuadTokenBytes = 4;  // kActQuads: one u8 quad per token
#else
constexpr int64_t kQuadTokenBytes = 8;  // kActQuads16: per 8 tokens 32 B of (x0, x2) then 32 B of (x1, x3)
#endif

// Layout kind 0 (aligned quads): out[0..T) = the sums of tokens 8t .. 8t + 7 from `base`, quad q of
// the row at base + q * qstride.
template <int T>
inline void row_product8(const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1,
                         const uint8_t* base, int64_t qstride, __m256i* out) {
  __m256i c[T];
  for (int t = 0; t < T; ++t) c[t] = _mm256_setzero_si256();
  for (int32_t p = p0; p < p1; ++p) {
    const Weight4 w(qw[p]);
    const uint8_t* src = base + (int64_t)qk[p] * qstride;
    for (int t = 0; t < T; ++t) {
#if SPARSE_OFA_VNNI
      c[t] = dot4(c[t], _mm256_loadu_si256((const __m256i*)(src + 32 * t)), w);
#else
      const __m256i even = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(src + 64 * t)), w.even);
      const __m256i odd = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(src + 64 * t + 32)), w.odd);
      c[t] = _mm256_add_epi32(c[t], _mm256_add_epi32(even, odd));
#endif
    }
  }
  for (int t = 0; t < T; ++t) out[t] = c[t];
}

// Layout kind 1 (gathered quads: 4 arbitrary input channels per quad, activations column-major
// xk[k][token]); the sums come out 8 tokens per ymm, in token order.
#if SPARSE_OFA_VNNI
using ColValue = uint8_t;  // the columns hold u8 = x + 128 (sparse_cpu.h, kActCols8)

// out[0 .. NT/8) = the sums of tokens 0 .. NT-1 (NT = 32 or 64) from `base`. Per quad and 32 tokens:
// 4 row loads, then ab = unpack{lo,hi}_epi8(a, b), cd = ..(c, d), q_j = unpack{lo,hi}_epi16(ab, cd):
// q_j holds, in 128-bit lane L, tokens 16L + 4j .. 16L + 4j + 3. NT = 32 keeps two quads in flight
// (8 chains); NT = 64 one quad for all 64 tokens (8 chains, the weight broadcast and the row
// addresses once per 64 tokens).
template <int NT>
inline void row_gather8(const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1, const uint8_t* base,
                        int64_t mp, __m256i* out) {
  constexpr int U = NT == 32 ? 2 : 1;  // quads in flight
  __m256i acc[U][NT / 8];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NT / 8; ++j) acc[u][j] = _mm256_setzero_si256();
  auto step = [&](int u, int32_t p) {
    const Weight4 w(qw[p]);
    const uint16_t* ks = qk + 4 * (int64_t)p;
    const uint8_t *ra = base + ks[0] * mp, *rb = base + ks[1] * mp, *rc = base + ks[2] * mp, *rd = base + ks[3] * mp;
    for (int h = 0; h < NT / 32; ++h) {
      const __m256i xa = _mm256_loadu_si256((const __m256i*)(ra + 32 * h));
      const __m256i xb = _mm256_loadu_si256((const __m256i*)(rb + 32 * h));
      const __m256i xc = _mm256_loadu_si256((const __m256i*)(rc + 32 * h));
      const __m256i xd = _mm256_loadu_si256((const __m256i*)(rd + 32 * h));
      const __m256i ab_lo = _mm256_unpacklo_epi8(xa, xb), ab_hi = _mm256_unpackhi_epi8(xa, xb);
      const __m256i cd_lo = _mm256_unpacklo_epi8(xc, xd), cd_hi = _mm256_unpackhi_epi8(xc, xd);
      __m256i* c = acc[u] + 4 * h;
      c[0] = dot4(c[0], _mm256_unpacklo_epi16(ab_lo, cd_lo), w);
      c[1] = dot4(c[1], _mm256_unpackhi_epi16(ab_lo, cd_lo), w);
      c[2] = dot4(c[2], _mm256_unpacklo_epi16(ab_hi, cd_hi), w);
      c[3] = dot4(c[3], _mm256_unpackhi_epi16(ab_hi, cd_hi), w);
    }
  };
  int32_t p = p0;
  if (U == 2)
    for (; p + 2 <= p1; p += 2) step(0, p), step(U - 1, p + 1);
  for (; p < p1; ++p) step(0, p);
  for (int h = 0; h < NT / 32; ++h) {
    __m256i c[4];
    for (int j = 0; j < 4; ++j) c[j] = U == 2 ? _mm256_add_epi32(acc[0][4 * h + j], acc[U - 1][4 * h + j]) : acc[0][4 * h + j];
    // c[j] lane L = tokens 16L + 4j ..: tokens 0-7 = lane 0 of c0, c1; 8-15 lane 0 of c2, c3; 16-31 lane 1
    out[4 * h + 0] = _mm256_permute2x128_si256(c[0], c[1], 0x20);
    out[4 * h + 1] = _mm256_permute2x128_si256(c[2], c[3], 0x20);
    out[4 * h + 2] = _mm256_permute2x128_si256(c[0], c[1], 0x31);
    out[4 * h + 3] = _mm256_permute2x128_si256(c[2], c[3], 0x31);
  }
}
#else
using ColValue = int16_t;  // the columns hold int16 x (sparse_cpu.h, kActCols16)

// out[0 .. NT/8) = the sums of tokens 0 .. NT-1 (NT = 32 or 64). Per quad: the weight pairs (w0, w1)
// and (w2, w3) as int16 dwords, broadcast once for all NT tokens; per 16 tokens of rows a, b:
// unpack{lo,hi}_epi16(a, b) = the (x_a, x_b) pairs of tokens 0-3 | 8-11 and 4-7 | 12-15, and vpmaddwd
// with (w0, w1) gives x_a w0 + x_b w1 per token (exact int32); rows c, d likewise, into the same sums.
template <int NT>
inline void row_gather16(const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1, const int16_t* base,
                         int64_t mp, __m256i* out) {
  __m256i acc[NT / 8];  // [2h]: tokens 16h + (0-3 | 8-11), [2h + 1]: 16h + (4-7 | 12-15)
  for (int j = 0; j < NT / 8; ++j) acc[j] = _mm256_setzero_si256();
  for (int32_t p = p0; p < p1; ++p) {
    const __m128i w16 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(qw[p]));
    const __m256i wab = _mm256_broadcastd_epi32(w16), wcd = _mm256_broadcastd_epi32(_mm_srli_si128(w16, 4));
    const uint16_t* ks = qk + 4 * (int64_t)p;
    const int16_t *ra = base + ks[0] * mp, *rb = base + ks[1] * mp, *rc = base + ks[2] * mp, *rd = base + ks[3] * mp;
    for (int h = 0; h < NT / 16; ++h) {
      const __m256i xa = _mm256_loadu_si256((const __m256i*)(ra + 16 * h));
      const __m256i xb = _mm256_loadu_si256((const __m256i*)(rb + 16 * h));
      const __m256i xc = _mm256_loadu_si256((const __m256i*)(rc + 16 * h));
      const __m256i xd = _mm256_loadu_si256((const __m256i*)(rd + 16 * h));
      const __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi16(xa, xb), wab),
                                          _mm256_madd_epi16(_mm256_unpacklo_epi16(xc, xd), wcd));
      const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpackhi_epi16(xa, xb), wab),
                                          _mm256_madd_epi16(_mm256_unpackhi_epi16(xc, xd), wcd));
      acc[2 * h] = _mm256_add_epi32(acc[2 * h], lo);
      acc[2 * h + 1] = _mm256_add_epi32(acc[2 * h + 1], hi);
    }
  }
  for (int h = 0; h < NT / 16; ++h) {
    out[2 * h] = _mm256_permute2x128_si256(acc[2 * h], acc[2 * h + 1], 0x20);      // tokens 16h + 0 .. 7
    out[2 * h + 1] = _mm256_permute2x128_si256(acc[2 * h], acc[2 * h + 1], 0x31);  // tokens 16h + 8 .. 15
  }
}
#endif

// out[0 .. tokens/8) = the sums of `tokens` (32 or 64) tokens from `base` of the gathered columns
inline void gather_tokens(int tokens, const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1,
                          const ColValue* base, int64_t mp, __m256i* out) {
#if SPARSE_OFA_VNNI
  if (tokens > 32) row_gather8<64>(qw, qk, p0, p1, base, mp, out);
  else row_gather8<32>(qw, qk, p0, p1, base, mp, out);
#else
  if (tokens > 32) row_gather16<64>(qw, qk, p0, p1, base, mp, out);
  else row_gather16<32>(qw, qk, p0, p1, base, mp, out);
#endif
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

#ifdef SPARSE_OFA_SPMM
void SPARSE_OFA_SPMM(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  const int64_t ngroups = (w.n + kRowGroup - 1) / kRowGroup;
  const int64_t qstride = a.mp * kQuadTokenBytes;
  alignas(32) int32_t tile[kRowGroup][kTokenBlock];
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t m0 = (task / ngroups) * kTokenBlock, n0 = (task % ngroups) * kRowGroup;
    const int64_t mt = a.m - m0 < kTokenBlock ? a.m - m0 : kTokenBlock;
    const int64_t nr = w.n - n0 < kRowGroup ? w.n - n0 : kRowGroup;
    const int64_t nr8 = (nr + 7) / 8 * 8, mt8 = (mt + 7) / 8 * 8;  // the 8x8 transposes read these
    for (int64_t r = nr; r < nr8; ++r) std::memset(tile[r], 0, sizeof(int32_t) * mt8);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t n = n0 + r;
      const uint32_t corr = (uint32_t)w.rowsum[n] * (a.flip ? 128u : 0u);
      if (w.gather) {  // 64 tokens at a time (the columns are padded to 64 tokens), 32 for a short rest
        for (int64_t h = 0; h < mt; h += 64) {
          const int tokens = mt - h > 32 ? 64 : 32;
          __m256i acc[8];
          gather_tokens(tokens, w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], (const ColValue*)a.xt + m0 + h,
                        a.mp, acc);
          for (int t = 0; t < tokens / 8 && h + 8 * t < mt8; ++t)
            _mm256_store_si256((__m256i*)&tile[r][h + 8 * t],
                               _mm256_sub_epi32(acc[t], _mm256_set1_epi32((int32_t)corr)));
        }
        continue;
      }
      for (int64_t h = 0; h < mt; h += 64) {  // 64 tokens (8 ymm) at a time: 16 registers only
        const int T = (int)((mt - h < 64 ? mt - h : 64) + 7) / 8;
        __m256i acc[8];
        row_product8_any(T, w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], a.xt + (m0 + h) * kQuadTokenBytes,
                         qstride, acc);
        for (int t = 0; t < T; ++t)
          _mm256_store_si256((__m256i*)&tile[r][h + 8 * t],
                             _mm256_sub_epi32(acc[t], _mm256_set1_epi32((int32_t)corr)));
      }
    }
    store_tile8<kTokenBlock>(e, a, tile, m0, mt, n0, nr);
  }
}
#endif  // SPARSE_OFA_SPMM

#ifdef SPARSE_OFA_SPMM_COLS
// The fused ops' channel-major product on one 64-token tile (sparse_cpu.h, spmm_cols_avx512): row n of
// yt gets y = GELU(((float)acc * x_scale) * w_scale[n] + b[n]) for the 64 tokens, as the 8 accumulators
// hold them (no transposes); the same operations in the same order as store_tile8 + post_rows_avx2,
// so the same bits as the row-major linear. amax / nonfinite: per token max |y| and NaN/Inf.
void SPARSE_OFA_SPMM_COLS(const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias,
                          bool gelu, float* yt, int64_t ldy, float* amax, uint64_t* nonfinite) {
  // only the 8-token vectors holding live tokens (a short tile: 12 tokens cost 2 vectors, not 8); the
  // rest of yt is not written (quant_pack_cols_avx2 packs those tokens as zeros)
  const int T = (int)((a.m + 7) / 8);
  alignas(32) float xs_pad[kTileTokens];  // padding tokens: scale 0
  for (int i = 0; i < kTileTokens; ++i) xs_pad[i] = i < a.m ? a.x_scale[i] : 0.0f;
  alignas(32) float mx[kTileTokens] = {};
  alignas(32) uint32_t bad[kTileTokens] = {};
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  for (int64_t n = 0; n < w.n; ++n) {
    __m256i acc[kTileTokens / 8];
    if (w.gather) {
      gather_tokens(T > 4 ? 64 : 32, w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], (const ColValue*)a.xt,
                    a.mp, acc);
    } else {
      row_product8_any(T, w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], a.xt, a.mp * kQuadTokenBytes, acc);
    }
    const __m256i corr = _mm256_set1_epi32((int32_t)((uint32_t)w.rowsum[n] * (a.flip ? 128u : 0u)));
    const __m256 ws = _mm256_set1_ps(w_scale[n]);
    const __m256 b = bias ? _mm256_set1_ps(bias[n]) : _mm256_setzero_ps();
    float* row = yt + n * ldy;
    for (int t = 0; t < T; ++t) {
      __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t], corr)),
                                             _mm256_load_ps(xs_pad + 8 * t)), ws);
      if (bias) y = _mm256_add_ps(y, b);
      if (gelu) y = gelu8(y);
      _mm256_storeu_ps(row + 8 * t, y);
      if (amax == nullptr) continue;
      const __m256 ay = _mm256_and_ps(y, abs_mask);
      _mm256_store_ps(mx + 8 * t, _mm256_max_ps(_mm256_load_ps(mx + 8 * t), ay));
      const __m256 nf = _mm256_cmp_ps(ay, inf, _CMP_NLT_UQ);  // NaN or Inf
      _mm256_store_si256((__m256i*)(bad + 8 * t),
                         _mm256_or_si256(_mm256_load_si256((const __m256i*)(bad + 8 * t)), _mm256_castps_si256(nf)));
    }
  }
  if (amax == nullptr) return;
  uint64_t bits = 0;
  for (int i = 0; i < kTileTokens; ++i) {
    amax[i] = mx[i];
    if (i < a.m && bad[i]) bits |= 1ull << i;
  }
  *nonfinite = bits;
}
#endif  // SPARSE_OFA_SPMM_COLS

}  // namespace sparse_ofa_cpu
