// Portable form of the dense panel GEMM (dense_gemm.h): the same tasks, plain loops over the pairs.
// Sums in uint32 (wrapping, no signed-overflow UB); the true sum fits in int32, so the bits are exact.
#include "dense_gemm.h"

namespace sparse_ofa_cpu {

void dense_widen_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int16_t* a, int64_t lda) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* x = xq + m * ldx;
    int16_t* r = a + m * lda;
    for (int64_t i = 0; i < k; ++i) r[i] = x[i];
    for (int64_t i = k; i < lda; ++i) r[i] = 0;
  }
}

void dense_gemm_scalar(const DensePanel& w, const int16_t* a, int64_t lda, int64_t m, const DenseBlocking& b,
                       const DenseOut& o, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t mb = t / b.nblocks, nb = t % b.nblocks;
    const int64_t r0 = mb * b.tiles * kDenseRows, r1 = r0 + b.tiles * kDenseRows < m ? r0 + b.tiles * kDenseRows : m;
    const int64_t s0 = nb * b.strips, s1 = s0 + b.strips < w.strips ? s0 + b.strips : w.strips;
    for (int64_t s = s0; s < s1; ++s) {
      const int16_t* ws = w.w + s * w.kp * 2 * kDenseCols;
      for (int64_t r = r0; r < r1; ++r) {
        const int16_t* ar = a + r * lda;
        uint32_t acc[kDenseCols] = {};
        for (int64_t p = 0; p < w.kp; ++p) {
          const int32_t a0 = ar[2 * p], a1 = ar[2 * p + 1];
          const int16_t* wp = ws + p * 2 * kDenseCols;
          for (int c = 0; c < kDenseCols; ++c)
            acc[c] += (uint32_t)(a0 * wp[2 * c]) + (uint32_t)(a1 * wp[2 * c + 1]);
        }
        for (int c = 0; c < kDenseCols && s * kDenseCols + c < w.n; ++c) {
          const int64_t j = s * kDenseCols + c;
          if (!o.x_scale) {
            static_cast<int32_t*>(o.out)[r * o.ldo + j] = (int32_t)acc[c];
          } else {
            const float v = ((float)(int32_t)acc[c] * o.x_scale[r]) * o.w_scale[j];
            static_cast<float*>(o.out)[r * o.ldo + j] = o.bias ? v + o.bias[j] : v;
          }
        }
      }
    }
  }
}

}  // namespace sparse_ofa_cpu
