// Dense exact INT8 GEMM for CPUs without VNNI (the `dense` backend's "panel" route, cpu_dense.cpp):
//     acc[m, n] = sum_k x_q[m, k] * W_q[n, k]        (exact int32, any int8 values)
//     y[m, n]   = ((float)acc[m, n] * x_scale[m]) * w_scale[n] + bias[n]   (float32, no FMA)
// No torch headers (dense_avx2.cpp is compiled under `#pragma GCC target("avx2")`).
//
// Why int16 pairs: AVX2 has no int8 dot product into int32. vpmaddwd multiplies int16 pairs and adds
// each pair into an int32 lane exactly (|a0 w0 + a1 w1| <= 2 * 128 * 128 = 2^15 fits), 16 products per
// instruction; vpmaddubsw (u8 x s8 -> saturating int16) would need a per-product sign fix-up to stay
// exact and then a vpmaddwd anyway, so it does no more products per instruction.
//
// Weight panel (derived once from packed format v1 by sparse_ofa/backends/dense.py, int16 tensor
// [strips, kp, 16, 2]): output channels in strips of kDenseCols = 16, input channels in pairs,
//     panel[s][p][c][j] = W_q[16 s + c, 2 p + j]     (zero past N and past K)
// so one 64-byte row of a strip is two ymm of 8 columns x (pair p), multiplied against the broadcast
// int32 holding the pair (x_q[m, 2p], x_q[m, 2p + 1]).
// Activations: x_q widened to int16 rows of 2 kp values, a[m * lda + k] (zero at k = K when K is odd).
#pragma once

#include <cstdint>

namespace sparse_ofa_cpu {

constexpr int kDenseCols = 16;  // output channels per strip (two ymm of int32)
constexpr int kDenseRows = 6;   // tokens per micro-tile: 6 x 2 accumulators + 2 weight vectors +
                                // broadcast / product temporaries fill the 16 ymm registers

struct DensePanel {
  const int16_t* w;  // [strips][kp][16][2]
  int64_t n, k, kp, strips;
};

// Output of the product: int32 accumulators (x_scale == nullptr) or the float epilogue.
struct DenseOut {
  const float* x_scale;  // [m], nullptr: store int32 accumulators
  const float* w_scale;  // [n]
  const float* bias;     // [n] or nullptr
  void* out;             // [m, ldo] int32 or float
  int64_t ldo;
};

// Work split: tasks = mblocks x nblocks (mblock-major), an mblock of `tiles` micro-tiles of
// kDenseRows tokens, an nblock of `strips` strips. Chosen by dense_blocking.
struct DenseBlocking {
  int64_t tiles, strips, mblocks, nblocks;
  int64_t kc;  // input-channel pairs per K chunk (the AVX2 kernel; the portable loop runs all K at once)
  int64_t tasks() const { return mblocks * nblocks; }
};

// K in chunks of <= 256 pairs (even sizes): a strip's chunk (<= 16 KB) stays in L1 while every
// micro-tile of the mblock passes it (a whole strip is 24 KB at K = 768, with the activation rows
// more than L1 holds; 96 KB at K = 3072); the partial sums wait in the output (int32) between chunks.
// mblocks sized so that one mblock's activation chunk (tiles * 6 rows * kc pairs * 4 bytes) stays
// near 96 KB (L2), nblocks of up to 4 strips (64 channels), both made smaller until there are at
// least 4 tasks per thread where the shape allows.
inline DenseBlocking dense_blocking(int64_t m, int64_t strips, int64_t kp, int64_t threads) {
  const int64_t mtiles = (m + kDenseRows - 1) / kDenseRows;
  const int64_t chunks = (kp + 255) / 256;
  const int64_t kc = chunks > 0 ? (kp + chunks - 1) / chunks : 1;
  int64_t tiles = 98304 / (kDenseRows * 4 * kc);
  tiles = tiles < 1 ? 1 : (tiles > mtiles ? mtiles : tiles);
  int64_t sb = strips < 4 ? strips : 4;
  if (sb < 1) sb = 1;
  auto count = [&](int64_t t, int64_t s) { return ((mtiles + t - 1) / t) * ((strips + s - 1) / s); };
  while (count(tiles, sb) < 4 * threads && (sb > 1 || tiles > 1)) {
    if (sb > 1) sb = (sb + 1) / 2;
    else tiles = (tiles + 1) / 2;
  }
  // even out the mblocks (e.g. 22 tiles in blocks of 10 -> 8 + 7 + 7, not 10 + 10 + 2)
  const int64_t mb = (mtiles + tiles - 1) / tiles;
  tiles = (mtiles + mb - 1) / mb;
  return {tiles, sb, (mtiles + tiles - 1) / tiles, (strips + sb - 1) / sb, kc};
}

// x_q rows [m0, m1) (int8, row stride ldx, K columns) -> a (int16, row stride lda = 2 kp).
void dense_widen_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int16_t* a, int64_t lda);
void dense_widen_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int16_t* a, int64_t lda);

// Tasks [t0, t1) of the product of m tokens (a: widened activations, row stride lda).
void dense_gemm_scalar(const DensePanel& w, const int16_t* a, int64_t lda, int64_t m, const DenseBlocking& b,
                       const DenseOut& o, int64_t t0, int64_t t1);
void dense_gemm_avx2(const DensePanel& w, const int16_t* a, int64_t lda, int64_t m, const DenseBlocking& b,
                     const DenseOut& o, int64_t t0, int64_t t1);

}  // namespace sparse_ofa_cpu
