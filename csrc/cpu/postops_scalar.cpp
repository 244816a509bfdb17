// Portable post-ops (sparse_cpu.h, PostOps): plain loops, std::erf, LayerNorm statistics in double.
#include <cmath>

#include "sparse_cpu.h"

namespace sparse_ofa_cpu {

void post_rows_scalar(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* row = y + m * ldy;
    if (p.residual) {
      const float* r = p.residual + m * p.ldr;
      for (int64_t j = 0; j < n; ++j) row[j] = row[j] + r[j];
    }
    if (p.gelu)
      for (int64_t j = 0; j < n; ++j) row[j] = 0.5f * row[j] * (1.0f + std::erf(row[j] * 0.70710678118654752f));
    if (p.ln_w) {
      double sum = 0.0, sq = 0.0;
      for (int64_t j = 0; j < n; ++j) sum += row[j];
      const double mean = sum / (double)n;
      for (int64_t j = 0; j < n; ++j) sq += (row[j] - mean) * (row[j] - mean);
      const float rstd = (float)(1.0 / std::sqrt(sq / (double)n + (double)p.ln_eps));
      const float mu = (float)mean;
      for (int64_t j = 0; j < n; ++j) {
        const float v = (row[j] - mu) * rstd * p.ln_w[j];
        row[j] = p.ln_b ? v + p.ln_b[j] : v;
      }
    }
  }
}

void dequant_rows_scalar(const int32_t* acc, int64_t lda, const float* x_scale, const float* w_scale,
                         const float* bias, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* a = acc + m * lda;
    float* row = y + m * ldy;
    const float xs = x_scale[m];
    for (int64_t j = 0; j < n; ++j) {
      const float v = ((float)a[j] * xs) * w_scale[j];
      row[j] = bias ? v + bias[j] : v;
    }
  }
}

}  // namespace sparse_ofa_cpu
