// AVX-512 BF16 attention (attention.h, opt-in `attention="bf16"`): the fp32 kernel's structure
// (attention_avx512.cpp) with both products on `vdpbf16ps`, which multiplies PAIRS of bf16 and adds
// both products into an fp32 lane: 64 flops per instruction against 32 for an fp32 FMA.
//   q, k, v rounded to bf16 (round to nearest even), paired along the summed dimension:
//     qp[c2][i] = (q[i][2 c2], q[i][2 c2 + 1])      kp[c2][j] = (k[j][2 c2], k[j][2 c2 + 1])
//     vp[j2][c] = (v[2 j2][c], v[2 j2 + 1][c])      (zero past the last channel / key)
//   scores[r][j] = scale * sum_c2 dot(qp[c2][i0 + r], kp[c2][j])              (fp32 accumulation)
//   softmax of each row in fp32 as in the fp32 kernel -> unnormalised p and 1 / sum
//   pp[r][j2] = (p[r][2 j2], p[r][2 j2 + 1]) rounded to bf16
//   out[r][c] = (1 / sum[r]) * sum_j2 dot(pp[r][j2], vp[j2][c])
// The products of two bf16 are exact in fp32; only the inputs' rounding and the summation order
// differ from fp32 attention. Same result for a row-major qkv and a channel-major one (the pairs are
// the same numbers), so cpu_qkv_attention equals cpu_linear + cpu_attention bit for bit here too.
#include <algorithm>

#include "attention.h"
#include "sparse_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")
#include "avx512_util.h"

namespace sparse_ofa_cpu {
namespace {

constexpr int kRows = 6;  // query rows per block (as the fp32 kernel)

// 16 pairs from 32 floats (lo: elements 0-15, hi: 16-31) -> (bf16(x[2i]), bf16(x[2i+1])) in lane i
inline __m512i pairs_of(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

// 16 pairs from two rows of 16 floats: lane i = (bf16(even[i]), bf16(odd[i]))
inline __m512i interleave_pairs(__m512 even, __m512 odd) {
  // cvtne2ps gives 16-bit words [even 0..15 | odd 0..15]; word 2i takes even i, word 2i+1 odd i
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

// out[p2][l] = pair(x(l, 2 p2), x(l, 2 p2 + 1)) for l < lane_pad (0 past n_lane, or past n_pair),
// x(l, e) = base[l * s_lane + e * s_pair]; one of the two strides is 1. out rows lane_pad apart.
void pack_pairs(const float* base, int64_t s_lane, int64_t s_pair, int64_t n_lane, int64_t n_pair,
                int64_t lane_pad, uint32_t* out) {
  const int64_t n2 = (n_pair + 1) / 2;
  if (s_pair == 1) {  // each lane's elements contiguous: convert 32 at a time, transpose 16 x 16
    for (int64_t l0 = 0; l0 < lane_pad; l0 += 16) {
      for (int64_t e0 = 0; e0 < n_pair; e0 += 32) {
        const __mmask16 lo_live = first_n(n_pair - e0), hi_live = first_n(n_pair - e0 - 16);
        __m512i r[16];
        for (int l = 0; l < 16; ++l) {
          if (l0 + l >= n_lane) {
            r[l] = _mm512_setzero_si512();
            continue;
          }
          const float* row = base + (l0 + l) * s_lane + e0;
          r[l] = pairs_of(_mm512_maskz_loadu_ps(lo_live, row), _mm512_maskz_loadu_ps(hi_live, row + 16));
        }
        transpose16x16(r);  // r[i] = pair e0/2 + i of lanes l0..l0+15
        for (int64_t i = 0; i < std::min<int64_t>(16, n2 - e0 / 2); ++i)
          _mm512_storeu_si512(out + (e0 / 2 + i) * lane_pad + l0, r[i]);
      }
    }
    return;
  }
  // s_lane == 1: each pair element's lanes contiguous: two rows at a time, interleaved
  for (int64_t p2 = 0; p2 < n2; ++p2) {
    const float* even = base + 2 * p2 * s_pair;
    const bool has_odd = 2 * p2 + 1 < n_pair;
    for (int64_t l0 = 0; l0 < lane_pad; l0 += 16) {
      const __mmask16 live = first_n(n_lane - l0);
      const __m512 e = _mm512_maskz_loadu_ps(live, even + l0);
      const __m512 o = has_odd ? _mm512_maskz_loadu_ps(live, even + s_pair + l0) : _mm512_setzero_ps();
      _mm512_storeu_si512(out + p2 * lane_pad + l0, interleave_pairs(e, o));
    }
  }
}

// pairs of bf16 in 32 bits, one vdpbf16ps per lane: acc + a.lo * b.lo + a.hi * b.hi (attention_gemm.h)
struct Bf16PairMul {
  using Elem = uint32_t;
  using Vec = __m512bh;
  static __m512bh load(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh load_masked(__mmask16 m, const uint32_t* p) { return (__m512bh)_mm512_maskz_loadu_epi32(m, p); }
  static __m512bh bcast(uint32_t a) { return (__m512bh)_mm512_set1_epi32((int)a); }
  static __m512 madd(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
};

#include "attention_gemm.h"

}  // namespace

int64_t attention_bf16_scratch_words(const AttnProblem& p) {
  const int64_t seq_pad = (p.seq + 15) / 16 * 16, dim_pad = (p.dim + 15) / 16 * 16;
  const int64_t d2 = (p.dim + 1) / 2, s2 = (p.seq + 1) / 2;
  return 2 * d2 * seq_pad + s2 * dim_pad + kRows * seq_pad + kRows * seq_pad / 2 + 16;
}

void attention_avx512_bf16(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  const int64_t seq_pad = (p.seq + 15) / 16 * 16, dim_pad = (p.dim + 15) / 16 * 16;
  const int64_t d2 = (p.dim + 1) / 2, s2 = (p.seq + 1) / 2, pp_ld = seq_pad / 2;
  uint32_t* qp = reinterpret_cast<uint32_t*>(scratch);  // [d2][seq_pad]
  uint32_t* kp = qp + d2 * seq_pad;                       // [d2][seq_pad]
  uint32_t* vp = kp + d2 * seq_pad;                       // [s2][dim_pad]
  float* scores = reinterpret_cast<float*>(vp + s2 * dim_pad);  // [kRows][seq_pad]
  uint32_t* pp = reinterpret_cast<uint32_t*>(scores + kRows * seq_pad);  // [kRows][seq_pad / 2]
  float scale[kRows], inv_sum[kRows];
  std::fill(scale, scale + kRows, p.scale);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.heads, h = t % p.heads;
    const float* q = p.qkv + b * p.sb + h * p.dim * p.sc;
    // element (token j, channel c) of q / k / v at base + j * st + c * sc
    pack_pairs(q, p.st, p.sc, p.seq, p.dim, seq_pad, qp);
    pack_pairs(q + p.k_off * p.sc, p.st, p.sc, p.seq, p.dim, seq_pad, kp);
    pack_pairs(q + p.v_off * p.sc, p.sc, p.st, p.dim, p.seq, dim_pad, vp);
    float* out = p.out + b * p.ob + h * p.dim;
    for (int64_t i0 = 0; i0 < p.seq; i0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, p.seq - i0);
      const int64_t keys = keys_needed(p, b, h, i0, rows);  // the rest have probability 0
      const int64_t cols = std::min(seq_pad, (keys + 15) / 16 * 16);  // whole vectors: the pairs read them
      gemm_cols<Bf16PairMul>(rows, qp + i0, 1, seq_pad, kp, seq_pad, d2, scale, scores, seq_pad, cols);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores + r * seq_pad;
        inv_sum[r] = softmax_row_avx512(s, keys, p.mask_kind, mask_row(p, b, h, i0 + r));
        for (int64_t j = keys; j < cols; ++j) s[j] = 0.f;  // the odd key's partner; a NaN there would reach out
        for (int64_t j0 = 0; j0 < cols; j0 += 32) {
          const __m512 lo = _mm512_loadu_ps(s + j0);
          const __m512 hi = j0 + 16 < cols ? _mm512_loadu_ps(s + j0 + 16) : _mm512_setzero_ps();
          _mm512_mask_storeu_epi32(pp + r * pp_ld + j0 / 2, first_n(std::min<int64_t>(16, (cols - j0) / 2)),
                                   pairs_of(lo, hi));
        }
      }
      gemm_cols<Bf16PairMul>(rows, pp, pp_ld, 1, vp, dim_pad, (keys + 1) / 2, inv_sum, out + i0 * p.ot, p.ot,
                             p.dim);
    }
  }
}

bool bf16_attention_supported() {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
  return isa_supported(kAvx512Vnni) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace sparse_ofa_cpu

#pragma GCC pop_options
#else  // not x86: never selected (bf16_attention_supported is false), defined so that the binding links
namespace sparse_ofa_cpu {
int64_t attention_bf16_scratch_words(const AttnProblem&) { return 0; }
void attention_avx512_bf16(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  attention_scalar(p, t0, t1, scratch);
}
bool bf16_attention_supported() { return false; }
}  // namespace sparse_ofa_cpu
#endif
