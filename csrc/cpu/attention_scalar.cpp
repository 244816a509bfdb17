// Portable attention (attention.h): plain loops, one query row at a time. Runs on any CPU; the fast
// path only calls the op where the AVX-512 kernel runs, so this is the correctness fallback.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention.h"

namespace sparse_ofa_cpu {

int64_t attention_scratch_floats(const AttnProblem& p) {
  const int64_t seq_pad = (p.seq + 15) / 16 * 16, dim_pad = (p.dim + 15) / 16 * 16;
  // AVX-512: K^T [dim][seq_pad] (row-major qkv) or V [seq][dim_pad] (channel-major) + 6 score rows;
  // AVX2: the same with K^T rows up to seq_pad + 16 apart; scalar: 1 row
  return seq_pad * (dim_pad + 8) + 16 * dim_pad + 64;
}

void attention_scalar(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float* s = scratch;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.heads, h = t % p.heads;
    const float* q = p.qkv + b * p.sb + h * p.dim * p.sc;
    const float* k = q + p.k_off * p.sc;
    const float* v = q + p.v_off * p.sc;
    const int64_t sc = p.sc;
    for (int64_t i = 0; i < p.seq; ++i) {
      const float* qi = q + i * p.st;
      const int64_t moff = b * p.mb + h * p.mh + i * p.mi;
      float row_max = neg_inf;
      for (int64_t j = 0; j < p.seq; ++j) {
        float dot = 0.f;
        for (int64_t c = 0; c < p.dim; ++c) dot += qi[c * sc] * k[j * p.st + c * sc];
        float x = dot * p.scale;
        if (p.mask_kind == kMaskBool && !static_cast<const bool*>(p.mask)[moff + j]) x = neg_inf;
        if (p.mask_kind == kMaskAdd) x += static_cast<const float*>(p.mask)[moff + j];
        s[j] = x;
        row_max = std::max(row_max, x);
      }
      float* o = p.out + b * p.ob + i * p.ot + h * p.dim;
      if (row_max == neg_inf) {  // every key masked: zeros, as torch's SDPA gives
        std::fill(o, o + p.dim, 0.f);
        continue;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < p.seq; ++j) {
        s[j] = std::exp(s[j] - row_max);
        sum += s[j];
      }
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < p.dim; ++c) {
        float acc = 0.f;
        for (int64_t j = 0; j < p.seq; ++j) acc += s[j] * v[j * p.st + c * sc];
        o[c] = acc * inv;
      }
    }
  }
}

}  // namespace sparse_ofa_cpu
