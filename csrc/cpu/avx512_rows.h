// The AVX-512 row kernels shared by avx512.cpp (row-major output) and ffn_avx512.cpp (channel-major
// output): the int32 sums of one output channel over a block of 16*T tokens, from the packed layouts
// of sparse_cpu.h. Include only inside a `#pragma GCC target("...avx512vnni")` region, after
// <immintrin.h> and avx512_util.h.
#pragma once

namespace sparse_ofa_cpu {
namespace {

// c += vpdpbusd(x u8, w s8). Inline asm because GCC 12 turns the intrinsic into a copy + dpbusd +
// copy back per accumulator (2 extra zmm moves per instruction in the hot loop, ~1.6x slower).
inline __m512i dpbusd(__m512i c, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(x), "v"(w));
  return c;
}

// c[0..T) = sum over quads p0..p1 of dpbusd(xt[quad_k[p]] block, quad_w[p]); U quads in flight so
// that short T still has U*T independent chains to hide the vpdpbusd latency.
template <int T, int U>
inline void row_product(const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1,
                        const uint8_t* base, int64_t qstride, __m512i* out) {
  __m512i c[U][T];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) c[u][t] = _mm512_setzero_si512();
  int32_t p = p0;
  for (; p + U <= p1; p += U) {
    for (int u = 0; u < U; ++u) {
      const __m512i w = _mm512_set1_epi32(qw[p + u]);
      const uint8_t* src = base + (int64_t)qk[p + u] * qstride;
      for (int t = 0; t < T; ++t)
        c[u][t] = dpbusd(c[u][t], _mm512_loadu_si512(src + 64 * t), w);
    }
  }
  // the < U tail quads go to different accumulator sets (no serial latency chain at the row end)
  for (int u = 0; u < U - 1; ++u) {
    if (p + u >= p1) break;
    const __m512i w = _mm512_set1_epi32(qw[p + u]);
    const uint8_t* src = base + (int64_t)qk[p + u] * qstride;
    for (int t = 0; t < T; ++t) c[u][t] = dpbusd(c[u][t], _mm512_loadu_si512(src + 64 * t), w);
  }
  for (int t = 0; t < T; ++t) {
    __m512i s = c[0][t];
    for (int u = 1; u < U; ++u) s = _mm512_add_epi32(s, c[u][t]);
    out[t] = s;
  }
}

// Layout kind 1: c[0..T) (natural token order, T a multiple of 4) for quads p0..p1 whose 4 bytes
// come from 4 arbitrary activation rows. Per 64 tokens and quad: 4 row loads, then
//     ab = unpack{lo,hi}_epi8(a, b), cd = unpack{lo,hi}_epi8(c, d)     (pairs per token)
//     q_j = unpack{lo,hi}_epi16(ab, cd)                                 (quads per token)
// q_j holds, in 128-bit lane L, tokens 16L + 4j .. 16L + 4j + 3; the accumulators keep that order
// and one 4x4 transpose of 128-bit lanes per 64 tokens restores it at the end.
template <int H, int U>
inline void row_gather(const int32_t* qw, const uint16_t* qk, int32_t p0, int32_t p1, const uint8_t* base,
                       int64_t mp, __m512i* out) {
  __m512i acc[U][H][4];
  for (int u = 0; u < U; ++u)
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < 4; ++j) acc[u][h][j] = _mm512_setzero_si512();
  // U quads in flight (independent accumulators) so that H = 1 still has 8 vpdpbusd chains
  auto step = [&](int u, int32_t p) {
    const __m512i w = _mm512_set1_epi32(qw[p]);
    const uint16_t* ks = qk + 4 * (int64_t)p;
    const uint8_t *ra = base + ks[0] * mp, *rb = base + ks[1] * mp, *rc = base + ks[2] * mp,
                  *rd = base + ks[3] * mp;
    for (int h = 0; h < H; ++h) {
      const __m512i xa = _mm512_loadu_si512(ra + 64 * h), xb = _mm512_loadu_si512(rb + 64 * h);
      const __m512i xc = _mm512_loadu_si512(rc + 64 * h), xd = _mm512_loadu_si512(rd + 64 * h);
      const __m512i ab_lo = _mm512_unpacklo_epi8(xa, xb), ab_hi = _mm512_unpackhi_epi8(xa, xb);
      const __m512i cd_lo = _mm512_unpacklo_epi8(xc, xd), cd_hi = _mm512_unpackhi_epi8(xc, xd);
      acc[u][h][0] = dpbusd(acc[u][h][0], _mm512_unpacklo_epi16(ab_lo, cd_lo), w);
      acc[u][h][1] = dpbusd(acc[u][h][1], _mm512_unpackhi_epi16(ab_lo, cd_lo), w);
      acc[u][h][2] = dpbusd(acc[u][h][2], _mm512_unpacklo_epi16(ab_hi, cd_hi), w);
      acc[u][h][3] = dpbusd(acc[u][h][3], _mm512_unpackhi_epi16(ab_hi, cd_hi), w);
    }
  };
  int32_t p = p0;
  for (; p + U <= p1; p += U)
    for (int u = 0; u < U; ++u) step(u, p + u);
  for (int u = 0; u < U - 1; ++u) {  // tail quads on different accumulator sets
    if (p + u >= p1) break;
    step(u, p + u);
  }
  __m512i c[H][4];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < 4; ++j) {
      c[h][j] = acc[0][h][j];
      for (int u = 1; u < U; ++u) c[h][j] = _mm512_add_epi32(c[h][j], acc[u][h][j]);
    }
  for (int h = 0; h < H; ++h) {  // c[h][j] lane L -> out[4h + L] lane j
    const __m512i t0 = _mm512_shuffle_i32x4(c[h][0], c[h][1], 0x44), t1 = _mm512_shuffle_i32x4(c[h][2], c[h][3], 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(c[h][0], c[h][1], 0xEE), t3 = _mm512_shuffle_i32x4(c[h][2], c[h][3], 0xEE);
    out[4 * h + 0] = _mm512_shuffle_i32x4(t0, t1, 0x88);
    out[4 * h + 1] = _mm512_shuffle_i32x4(t0, t1, 0xDD);
    out[4 * h + 2] = _mm512_shuffle_i32x4(t2, t3, 0x88);
    out[4 * h + 3] = _mm512_shuffle_i32x4(t2, t3, 0xDD);
  }
}

// The float epilogue of one output channel n, in registers (sparse_cpu.h):
//     y[t] = ((float)(acc[t] - 128 * rowsum[n]) * x_scale[t]) * w_scale[n] + bias[n], then GELU if asked
// (no bias: no add, since y + 0 would turn -0 into +0). `corr` = 128 * rowsum[n] (or 0 without flip).
template <int T>
inline void float_epilogue(const __m512i* acc, __m512i corr, const __m512* xs, float w_scale, const float* bias,
                           bool gelu, __m512* y) {
  const __m512 ws = _mm512_set1_ps(w_scale);
  const __m512 b = _mm512_set1_ps(bias ? *bias : 0.0f);
  for (int t = 0; t < T; ++t) {
    y[t] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], corr)), xs[t]), ws);
    if (bias) y[t] = _mm512_add_ps(y[t], b);
    if (gelu) y[t] = gelu_ps(y[t]);
  }
}

// 128 * rowsum[n] mod 2^32 when the activations were flipped to u8 (undoes the +128 offset), else 0.
inline __m512i flip_correction(const QuadWeight& w, int64_t n, uint8_t flip) {
  return _mm512_set1_epi32((int32_t)((uint32_t)w.rowsum[n] * (flip ? 128u : 0u)));
}

}  // namespace
}  // namespace sparse_ofa_cpu
