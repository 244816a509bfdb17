// The attention kernels' register-blocked GEMM, shared by the fp32 kernel (attention_avx512.cpp) and
// the bf16 one (attention_bf16.cpp); include it inside the file's `#pragma GCC target` region and
// anonymous namespace, after defining the multiply policy `Mul`:
//   Mul::Elem  one A / B element: float (fp32), or a pair of bf16 in 32 bits (bf16)
//   Mul::Vec   16 lanes of B;  load(p), load_masked(mask, p), bcast(a), madd(acc, a, b) -> acc + a . b
//
//   c[r][0 : 16 NV] = row_scale[r] * sum_k a[r * lda + k * ka] . b[k * ldb + 0 : 16 NV]    (r < R)
// One A element is broadcast against NV 16-lane vectors of a B row: R x NV = 24 zmm accumulators, NV
// vector loads + R broadcasts per 24 multiply-adds, so it runs near the ports' rate while the
// operands sit in L1/L2. The last vector of every b row and c row is read / written under `last`.
#pragma once

constexpr int kGemmVecs = 4;  // 16-lane column vectors per bcast_gemm call

template <class Mul, int R, int NV>
void bcast_gemm(const typename Mul::Elem* a, int64_t lda, int64_t ka, const typename Mul::Elem* b, int64_t ldb,
                int64_t kdim, const float* row_scale, float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kdim; ++k) {
    const typename Mul::Elem* bk = b + k * ldb;
    typename Mul::Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV - 1; ++v) bv[v] = Mul::load(bk + 16 * v);
    bv[NV - 1] = Mul::load_masked(last, bk + 16 * (NV - 1));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename Mul::Vec av = Mul::bcast(a[r * lda + k * ka]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Mul::madd(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 s = _mm512_set1_ps(row_scale[r]);
    float* cr = c + r * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(cr + 16 * v, _mm512_mul_ps(acc[r][v], s));
    _mm512_mask_storeu_ps(cr + 16 * (NV - 1), last, _mm512_mul_ps(acc[r][NV - 1], s));
  }
}

template <class Mul>
using GemmFn = void (*)(const typename Mul::Elem*, int64_t, int64_t, const typename Mul::Elem*, int64_t, int64_t,
                        const float*, float*, int64_t, __mmask16);

template <class Mul, int R>
GemmFn<Mul> gemm_for_vecs(int64_t nv) {
  switch (nv) {
    case 1: return bcast_gemm<Mul, R, 1>;
    case 2: return bcast_gemm<Mul, R, 2>;
    case 3: return bcast_gemm<Mul, R, 3>;
    default: return bcast_gemm<Mul, R, kGemmVecs>;
  }
}

template <class Mul>
GemmFn<Mul> gemm_for(int64_t rows, int64_t nv) {
  switch (rows) {
    case 1: return gemm_for_vecs<Mul, 1>(nv);
    case 2: return gemm_for_vecs<Mul, 2>(nv);
    case 3: return gemm_for_vecs<Mul, 3>(nv);
    case 4: return gemm_for_vecs<Mul, 4>(nv);
    case 5: return gemm_for_vecs<Mul, 5>(nv);
    default: return gemm_for_vecs<Mul, 6>(nv);
  }
}

// bcast_gemm over `cols` output columns, kGemmVecs vectors at a time (rows <= 6)
template <class Mul>
void gemm_cols(int64_t rows, const typename Mul::Elem* a, int64_t lda, int64_t ka, const typename Mul::Elem* b,
               int64_t ldb, int64_t kdim, const float* row_scale, float* c, int64_t ldc, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16 * kGemmVecs) {
    const int64_t left = cols - c0, nv = std::min<int64_t>(kGemmVecs, (left + 15) / 16);
    gemm_for<Mul>(rows, nv)(a, lda, ka, b + c0, ldb, kdim, row_scale, c + c0, ldc, first_n(left - 16 * (nv - 1)));
  }
}
