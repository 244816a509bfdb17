// AVX-512 VNNI path (x86-64 with avx512f/bw/vl/dq/vnni; chosen at run time by dispatch.cpp).
//
// Kernel, for one output channel n and a block of 16*T tokens (T zmm accumulators c[t]):
//     for each kept quad p of row n:            w = broadcast(quad_w[p])        (4 x s8)
//         for t < T:  c[t] += vpdpbusd(xt[quad_k[p]][16t : 16t+16], w)       (16 tokens x 4 u8)
// i.e. 64 multiply-adds per instruction, all useful for 1x4 blocks. Per quad: 1 broadcast, T loads,
// T vpdpbusd, so the loop is bound by the VNNI ports as long as the activation block stays in L1/L2.
// c[t] holds 16 tokens of ONE channel; the epilogue turns 16 channels x 16 tokens into 16 output
// rows with a 16x16 transpose (64 shuffles per 256 outputs).
#include <algorithm>
#include <cstring>

#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "avx512_util.h"
#include "avx512_rows.h"

namespace sparse_ofa_cpu {
namespace {

// 16 floats -> bf16 (round to nearest even, NaN -> 0x7FC0), as in float_to_bf16.
inline __m256i to_bf16(__m512 f) {
  __m512i b = _mm512_castps_si512(f);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace

// r[j] = quad q0 + j (4 input channels) of tokens mb .. mb + 15, one dword per token, each byte
// ^ flip (s8 -> u8 for vpdpbusd); tokens past `rows` and channels past k read as 0 ^ flip.
static inline void load_quads_transposed(const int8_t* xq, int64_t ldx, int64_t k, int64_t mb, int64_t rows,
                                         int64_t q0, __m512i flipv, __m512i r[16]) {
  const int64_t kb = k - 4 * q0;  // bytes of a token row left from quad q0
  const __mmask64 live = kb >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << kb) - 1);
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, xq + (mb + i) * ldx + 4 * q0), flipv) : flipv;
  transpose16x16(r);
}

// xk[kk * mp + m] = x_q[m, kk] ^ flip: 16 tokens x 16 quads -> dword transpose (one quad of 16
// tokens per register) -> bytes regrouped per input channel (vpshufb in lanes, vpermd across).
void pack_cols_avx512(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xk, int64_t mp) {
  const int64_t nq = (k + 3) / 4;
  const __m512i flipv = _mm512_set1_epi8((char)flip);
  // in a 128-bit lane: 4 tokens x 4 channels -> 4 channels x 4 tokens
  const __m512i bytes_t = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  // dword (4L + j) -> (4j + L): channel j of all 4 lanes together
  const __m512i dwords_t = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t mb = m0; mb < mend; mb += 16) {
    const int64_t rows = m1 - mb < 16 ? (m1 - mb > 0 ? m1 - mb : 0) : 16;
    for (int64_t q0 = 0; q0 < nq; q0 += 16) {
      __m512i r[16];
      load_quads_transposed(xq, ldx, k, mb, rows, q0, flipv, r);
      for (int j = 0; j < 16 && q0 + j < nq; ++j) {
        const __m512i v = _mm512_permutexvar_epi32(dwords_t, _mm512_shuffle_epi8(r[j], bytes_t));
        const int64_t kk = 4 * (q0 + j);
        _mm_storeu_si128((__m128i*)(xk + kk * mp + mb), _mm512_castsi512_si128(v));
        if (kk + 1 < k) _mm_storeu_si128((__m128i*)(xk + (kk + 1) * mp + mb), _mm512_extracti32x4_epi32(v, 1));
        if (kk + 2 < k) _mm_storeu_si128((__m128i*)(xk + (kk + 2) * mp + mb), _mm512_extracti32x4_epi32(v, 2));
        if (kk + 3 < k) _mm_storeu_si128((__m128i*)(xk + (kk + 3) * mp + mb), _mm512_extracti32x4_epi32(v, 3));
      }
    }
  }
}

void pack_acts_avx512(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xt, int64_t mp) {
  const int64_t nq = (k + 3) / 4;
  const __m512i flipv = _mm512_set1_epi8((char)flip);
  for (int64_t mb = m0; mb < mend; mb += 16) {
    const int64_t rows = m1 - mb < 16 ? (m1 - mb > 0 ? m1 - mb : 0) : 16;
    for (int64_t q0 = 0; q0 < nq; q0 += 16) {
      __m512i r[16];
      load_quads_transposed(xq, ldx, k, mb, rows, q0, flipv, r);
      for (int j = 0; j < 16 && q0 + j < nq; ++j) _mm512_storeu_si512(xt + ((q0 + j) * mp + mb) * 4, r[j]);
    }
  }
}

void quantize_rows_avx512(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                          const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale) {
  const bool dynamic = qp.static_scale == 0.0f;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int64_t k64 = k / 64 * 64;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = xq + m * ldq;
    // pass 1: amax and finiteness (a row with NaN/Inf takes the exact scalar path)
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 live = first_n(k - i);
      const __m512 v = _mm512_maskz_loadu_ps(live, xr + i);
      bad |= _mm512_mask_fpclass_ps_mask(live, v, 0x01 | 0x80 | 0x08 | 0x10);
      amax = _mm512_max_ps(amax, _mm512_and_ps(v, sign));
    }
    if (bad) {
      quantize_row_exact(xr, k, qp, qr, x_scale + m);
      continue;
    }
    float inv;
    __m512 lo, hi, zp;
    if (dynamic) {
      const float a = _mm512_reduce_max_ps(amax);
      inv = a != 0.0f ? (1.0f / a) * 127.0f : 0.0f;  // as torch: reciprocal, then * 127
      x_scale[m] = a != 0.0f ? a / 127.0f : 0.0f;
      lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f), zp = _mm512_setzero_ps();
    } else {
      inv = qp.inv_scale;
      x_scale[m] = qp.static_scale;
      lo = _mm512_set1_ps((float)qp.qmin), hi = _mm512_set1_ps((float)qp.qmax);
      zp = _mm512_set1_ps((float)qp.zero_point);
    }
    const __m512 invv = _mm512_set1_ps(inv);
    // pass 2: q = clamp(rne(x * inv) + zp, lo, hi); x * inv may overflow to +-Inf, which clamps.
    // Dynamic rows need no clamp: |x * inv| <= 127 * (1 + 2^-23) rounds to at most 127.
    auto quant16 = [&](__m512 v) -> __m512i {
      v = _mm512_mul_ps(v, invv);
      if (!dynamic) {
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zp), lo), hi);
      }
      return _mm512_cvtps_epi32(v);  // round half to even (MXCSR default)
    };
    int64_t i = 0;
    for (; i < k64; i += 64) {
      // 64 values -> 64 bytes: two saturating packs (values are already in range) + lane fix-up
      const __m512i a = quant16(_mm512_loadu_ps(xr + i)), b = quant16(_mm512_loadu_ps(xr + i + 16));
      const __m512i c = quant16(_mm512_loadu_ps(xr + i + 32)), d = quant16(_mm512_loadu_ps(xr + i + 48));
      const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
      _mm512_storeu_si512(qr + i, _mm512_permutexvar_epi32(order, bytes));
    }
    for (; i < k; i += 16) {
      const __mmask16 live = first_n(k - i);
      _mm_mask_storeu_epi8(qr + i, live, _mm512_cvtepi32_epi8(quant16(_mm512_maskz_loadu_ps(live, xr + i))));
    }
  }
}

namespace {

// Output channels the product runs into one tile before a staged epilogue (spmm_task): up to
// kRunGroups consecutive tasks of a thread (same token block), so that each output row is written
// as one run of up to 1 KB.
constexpr int kRunGroups = 4;
constexpr int kRunRows = kRunGroups * kRowGroup;
constexpr int kTileInts = kRunRows * 64;  // 64 KB: 256 channels x 64 tokens, or 128 x 128

// out[off .. off + nc) = v (int32 / float bits, or bf16 of the floats); masked only for a partial
// group (masked stores are slow on some cores).
inline void store16(const Epilogue& e, int64_t off, __m512i v, int64_t nc) {
  if (e.kind == kOutBFloat16) {
    const __m256i h = to_bf16(_mm512_castsi512_ps(v));
    if (nc == 16) _mm256_storeu_si256((__m256i*)((uint16_t*)e.out + off), h);
    else _mm256_mask_storeu_epi16((uint16_t*)e.out + off, first_n(nc), h);
  } else if (nc == 16) {
    _mm512_storeu_si512((int32_t*)e.out + off, v);
  } else {
    _mm512_mask_storeu_epi32((int32_t*)e.out + off, first_n(nc), v);
  }
}

// Channels [n0, n0 + nr) (nr <= kTileInts / (16 T)) x tokens [m0, m0 + mt), T = ceil(mt / 16) token
// vectors. Accumulators stay in registers (T is a compile-time constant); each channel's results go
// to tile[channel][token], then to out[token][channel] through 16x16 transposes (see below).
template <int T, int U, bool Gather>
void spmm_task(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t m0, int64_t mt,
               int64_t n0, int64_t nr, bool staged, int32_t* tile_buf) {
  // rows of 16 * T tokens, contiguous (a 64-token tile row is 256 B, not 256 B used of every 512 B)
  int32_t (*tile)[16 * T] = reinterpret_cast<int32_t (*)[16 * T]>(tile_buf);
  const int64_t qstride = a.mp * 4;
  const uint8_t* base = a.xt + m0 * 4;
  const int64_t nr16 = (nr + 15) / 16 * 16;  // the transposes read whole 16-row groups
  if (nr16 != nr) std::memset(tile[nr], 0, sizeof(int32_t) * (nr16 - nr) * 16 * T);
  __m512 xs[T];
  if (e.kind != kOutInt32)
    for (int t = 0; t < T; ++t) xs[t] = _mm512_maskz_loadu_ps(first_n(mt - 16 * t), a.x_scale + m0 + 16 * t);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t n = n0 + r;
    __m512i acc[T];
    if constexpr (Gather) row_gather<T / 4, U>(w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], a.xt + m0, a.mp, acc);
    else row_product<T, U>(w.quad_w, w.quad_k, w.row_ptr[n], w.row_ptr[n + 1], base, qstride, acc);
    // undo the +128 offset: acc = dot_u8s8 - 128 * rowsum  (mod 2^32, exact)
    const __m512i corr = flip_correction(w, n, a.flip);
    if (e.kind == kOutInt32) {
      for (int t = 0; t < T; ++t) _mm512_store_si512(&tile[r][16 * t], _mm512_sub_epi32(acc[t], corr));
      continue;
    }
    __m512 y[T];  // GELU is elementwise: before the transposes, in registers
    float_epilogue<T>(acc, corr, xs, e.w_scale[n], e.bias ? e.bias + n : nullptr, e.gelu, y);
    for (int t = 0; t < T; ++t) _mm512_store_ps((float*)&tile[r][16 * t], y[t]);
  }
  // tile[channel][token] -> out[token][channel], 16 x 16 at a time. Direct: each transpose's 16
  // rows stored at once, 64 B into each of 16 output rows. Staged (output rows a multiple of 2 KB
  // apart, where those 16 stores share one or two L1 sets: N = 1024, 3072, 4096 paid 6x for them,
  // bench/NOTES.md, "staged epilogue"): the transposes fill a 16-token row-major stage, then each token row is
  // written as one run of up to kRunRows channels.
  alignas(64) int32_t stage[16][kRunRows];
  for (int t = 0; t < T && 16 * t < mt; ++t) {
    const int rows = mt - 16 * t < 16 ? (int)(mt - 16 * t) : 16;
    for (int64_t c0 = 0; c0 < nr; c0 += 16) {
      const int64_t nc = nr - c0 < 16 ? nr - c0 : 16;
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(&tile[c0 + r][16 * t]);
      transpose16x16(v);
      if (staged) {
        for (int j = 0; j < 16; ++j) _mm512_store_si512(&stage[j][c0], v[j]);
        continue;
      }
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j >= rows) break;
        store16(e, (m0 + 16 * t + j) * e.ldo + n0 + c0, v[j], nc);
      }
    }
    if (!staged) continue;
    for (int j = 0; j < rows; ++j)
      for (int64_t c0 = 0; c0 < nr; c0 += 16)
        store16(e, (m0 + 16 * t + j) * e.ldo + n0 + c0, _mm512_load_si512(&stage[j][c0]), nr - c0 < 16 ? nr - c0 : 16);
  }
}

}  // namespace

void spmm_avx512(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  const int64_t ngroups = (w.n + kRowGroup - 1) / kRowGroup;
  alignas(64) int32_t tile[kTileInts];
  const int64_t row_bytes = e.ldo * (e.kind == kOutBFloat16 ? 2 : 4);
  const bool staged = row_bytes % 2048 == 0;
  const int64_t run_groups = staged ? kRunGroups : 1;
  for (int64_t task = t0; task < t1;) {
    const int64_t m0 = (task / ngroups) * kTokenBlock, g = task % ngroups, n0 = g * kRowGroup;
    const int64_t mt = a.m - m0 < kTokenBlock ? a.m - m0 : kTokenBlock;
    const int64_t tv = (mt + 15) / 16;
    const int64_t tile_t = w.gather ? (mt > 64 ? 8 : 4) : tv;  // the T of the spmm_task below
    // this thread's next tasks of the same token block, as many as the tile holds
    const int64_t fit = kTileInts / (16 * tile_t * kRowGroup);
    const int64_t run = std::min({t1 - task, ngroups - g, fit < run_groups ? fit : run_groups});
    const int64_t nr = std::min(w.n - n0, run * kRowGroup);
    task += run;
    if (w.gather) {  // 64-token groups (xk is padded to a multiple of 64 tokens)
      if (mt > 64) spmm_task<8, 1, true>(w, a, e, m0, mt, n0, nr, staged, tile);
      else spmm_task<4, 4, true>(w, a, e, m0, mt, n0, nr, staged, tile);  // 4 quads in flight: 16 chains
      continue;
    }
    // U quads in flight so that short T still has U * T independent vpdpbusd chains
    switch (tv) {
      case 1: spmm_task<1, 4, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      case 2: spmm_task<2, 4, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      case 3: spmm_task<3, 2, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      case 4: spmm_task<4, 2, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      case 5: spmm_task<5, 1, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      case 6: spmm_task<6, 1, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      case 7: spmm_task<7, 1, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
      default: spmm_task<8, 1, false>(w, a, e, m0, mt, n0, nr, staged, tile); break;
    }
  }
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#else  // not x86: never selected (isa_supported is false), defined so that the binding links
namespace sparse_ofa_cpu {
void pack_acts_avx512(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xt, int64_t mp) { pack_acts_scalar(xq, ldx, k, m0, m1, mend, flip, xt, mp); }
void quantize_rows_avx512(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                          const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale) {
  quantize_rows_scalar(x, ldx, k, m0, m1, qp, xq, ldq, x_scale);
}
void spmm_avx512(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  spmm_scalar(w, a, e, t0, t1);
}
void pack_cols_avx512(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xk, int64_t mp) { pack_cols_scalar(xq, ldx, k, m0, m1, mend, flip, xk, mp); }
}  // namespace sparse_ofa_cpu
#endif
