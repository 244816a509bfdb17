// Shared declarations of the CPU sparse-INT8 kernels (no torch headers: the ISA files that include
// this are compiled under `#pragma GCC target(...)` and must not instantiate any torch code).
//
// The product, for x_q int8 [M, K] and the packed weight W_q int8 [N, K] (rows sparse):
//     acc[m, n] = sum_k x_q[m, k] * W_q[n, k]                           (exact, int32)
//     y[m, n]   = ((float)acc[m, n] * x_scale[m]) * w_scale[n] + bias[n]  (float32, no FMA)
//
// Weight layout "quads v2" (derived once from packed format v1 by sparse_ofa/backends/cpu/layouts.py):
// the input channels of row n are cut into aligned quads k = 4q .. 4q+3 (K padded with zeros to a
// multiple of 4); a row keeps only the quads holding a non-zero weight:
//     quad_w  int32 [nq]    the 4 int8 weights of a kept quad (byte j = W_q[n, 4q + j])
//     quad_k  uint16 [nq]   q, ascending within a row (stored as an int16 tensor; K <= 65536)
//     row_ptr int32 [N+1]   row n owns quad_w[row_ptr[n] : row_ptr[n+1]]
//     rowsum  int32 [N]     sum_k W_q[n, k] (undoes the +128 offset of the u8 x VNNI form)
// For "1x4" the kept quads are exactly the kept blocks; for "unstructured"/"2:4" a quad is kept when
// any of its 4 weights is, the others are zeros inside it (VNNI does 4 products per lane anyway).
//
// Activation layout "xt": token-vectors of quads, so that one weight quad broadcast against one
// vector load multiplies 16 (AVX-512) or 8 (AVX2) tokens at once:
//     xt[(q * mp + m) * 4 + j] = x_q[m, 4q + j] ^ flip         (mp = M rounded up to 16)
// flip = 0x80 turns s8 into u8 = s8 + 128 (vpdpbusd multiplies u8 x s8), and then
//     sum_k (x + 128) * w = acc + 128 * rowsum      =>  acc = dot_u8s8 - 128 * rowsum   (mod 2^32,
// exact because the true acc fits in int32: |acc| <= K * 128 * 127 < 2^31 for K <= 131072).
// The plain AVX2 path (flip 0) keeps these quads as int16 pairs, split the way vpmaddwd multiplies
// them, 8 tokens per 64 bytes (even then odd):
//     xt16[((q * mp / 8 + m / 8) * 2 + 0) * 16 + 2 (m % 8) + {0, 1}] = x_q[m, 4q + {0, 2}]   (even)
//     xt16[((q * mp / 8 + m / 8) * 2 + 1) * 16 + 2 (m % 8) + {0, 1}] = x_q[m, 4q + {1, 3}]   (odd)
// so the product is vpmaddwd(even, (w0, w2)) + vpmaddwd(odd, (w1, w3)) with no per-product shifts.
#pragma once

#include <cstdint>

namespace sparse_ofa_cpu {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };
enum OutKind : int { kOutInt32 = 0, kOutFloat = 1, kOutBFloat16 = 2 };

constexpr int kTokenPad = 16;     // mp is M rounded up to this (layout kind 0)
constexpr int kColPad = 64;       // and to this for layout kind 1
constexpr int kRowGroup = 64;     // output channels per task (4 transposes wide: the output rows
                                  // are then written 256 contiguous bytes at a time)
constexpr int kTokenBlock = 128;  // tokens per task (8 zmm accumulators)
constexpr int kTileTokens = 64;   // tokens per packed activation tile on the AVX-512 path

struct QuadWeight {
  const int32_t* quad_w;
  const uint16_t* quad_k;  // kind 0: q per quad; kind 1: 4 input channels per quad (16 bits: the
                           // weight stream is 6 / 12 bytes per quad instead of 8 / 20)
  const int32_t* row_ptr;
  const int32_t* rowsum;
  int64_t n, k;
  int gather;              // layout kind: 0 aligned quads, 1 gathered quads (see below)
};

// Layout kind 1, "gathered quads" (unstructured / 2:4 weights): the kept weights of row n, in
// ascending k, are cut into groups of 4 ANY input channels (the last group padded with weight 0 and
// a repeated channel): quad_w as above, quad_k[4p + j] = input channel of byte j. No zeros are
// multiplied except the padding, at the price of an in-register interleave of 4 activation rows
// (8 unpacks per 64 tokens) instead of one aligned load. Its activation layout is plain columns:
//     xk[k * mp + m] = x_q[m, k] ^ flip                          (mp = M rounded up to 64)
// except on the plain AVX2 path, whose columns are int16 (flip 0):
//     xk16[k * mp + m] = (int16) x_q[m, k]
// there the kernel interleaves two int16 rows into the pairs vpmaddwd multiplies, instead of
// splitting interleaved bytes into sign-extended halves with shifts (3 more ops per 8 tokens).

// Activation layouts, as the packing and quantize-pack steps take them: kind 0 quads of bytes or of
// int16 pairs (plain AVX2), kind 1 columns of bytes or of int16 (plain AVX2).
enum ActLayout : int { kActQuads = 0, kActCols8 = 1, kActCols16 = 2, kActQuads16 = 3 };
// The activation layout of ISA `isa` for a weight of layout kind `gather`.
inline int act_layout(int isa, int gather) {
  if (isa == kAvx2) return gather ? kActCols16 : kActQuads16;
  return gather ? kActCols8 : kActQuads;
}
// Bytes of one token in one row of the layout (a quad row of kind 0, a channel column of kind 1).
inline int64_t act_token_bytes(int layout) {
  switch (layout) {
    case kActQuads: return 4;
    case kActQuads16: return 8;
    case kActCols16: return 2;
    default: return 1;
  }
}

struct PackedActs {
  const uint8_t* xt;      // see layout above
  int64_t m, mp, nquads;  // tokens, padded tokens, ceil(K / 4)
  uint8_t flip;           // 0x80 when xt holds u8 = x_q + 128, 0 when it holds x_q
  const float* x_scale;   // [m]; unused for int32 output
};

struct Epilogue {
  int kind;               // OutKind
  const float* w_scale;   // [n]
  const float* bias;      // [n] or nullptr
  void* out;              // [m, ldo] of int32 / float / bf16
  int64_t ldo;            // elements between output rows
  bool gelu;              // float output: y = GELU(y) before the store (AVX-512 path only; the
                          // binding otherwise leaves it to the post-ops)
};

// Post-ops of the fused linear on finished float32 output rows, in this order, each optional:
//     y += residual[m, :]                       (the residual connection)
//     y  = 0.5 y (1 + erf(y / sqrt 2))          (GELU, erf form)
//     y  = (y - mean) / sqrt(var + eps) * ln_w + ln_b   (LayerNorm over the row; ln_b may be null)
// The binding runs them on the rows a thread has just produced, while they are in its cache.
struct PostOps {
  const float* residual;  // [m, ldr] or nullptr
  int64_t ldr;
  bool gelu;
  const float* ln_w;      // [n] or nullptr (no LayerNorm)
  const float* ln_b;      // [n] or nullptr
  float ln_eps;
  bool any() const { return residual != nullptr || gelu || ln_w != nullptr; }
};

// rows [m0, m1) of y [*, ldy] with n channels
void post_rows_scalar(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1);
void post_rows_avx512(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1);
void post_rows_avx2(const PostOps& p, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1);  // AVX2 + FMA

// The dequantizing epilogue on finished int32 rows [m0, m1) of a dense product (cpu_dense.cpp):
//   y[m, j] = (float(acc[m, j]) * x_scale[m]) * w_scale[j] + bias[j]   (bias may be null; no FMA)
// acc and y may be the same memory (int32 -> float32 in place, element by element).
void dequant_rows_scalar(const int32_t* acc, int64_t lda, const float* x_scale, const float* w_scale,
                         const float* bias, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1);
void dequant_rows_avx512(const int32_t* acc, int64_t lda, const float* x_scale, const float* w_scale,
                         const float* bias, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1);

// Activation quantization parameters (sparse_ofa/quant.py). static_scale == 0 means dynamic.
struct QuantParams {
  float static_scale, inv_scale;
  int zero_point, qmin, qmax;
};

// Tasks of the product: task = mblock * ngroups + group, mblock of kTokenBlock tokens, group of
// kRowGroup output channels (mblock-major so that a thread's tasks share activation blocks).
inline int64_t task_count(int64_t m, int64_t n) {
  return ((m + kTokenBlock - 1) / kTokenBlock) * ((n + kRowGroup - 1) / kRowGroup);
}

// ---- per-ISA entry points (each processes a sub-range, the caller parallelises) ----------------
// x_q rows [m0, m1) (row stride ldx, column stride 1) -> xt; token blocks of 16 from m0 up to mend
// (a multiple of 16, >= m1) are written, rows past m1 and channels past K as 0 ^ flip.
void pack_acts_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xt, int64_t mp);
void pack_acts_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                    uint8_t* xt, int64_t mp);  // AVX2 and AVX-VNNI
void pack_acts_avx512(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xt, int64_t mp);
// pack_acts_scalar for quads [q0, nq) only (the tails of the vector packs)
void pack_quads_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t q0, int64_t m0, int64_t m1, int64_t mend,
                       uint8_t flip, uint8_t* xt, int64_t mp);
// The int16 quads of the plain AVX2 path (layout kActQuads16), the same arguments without flip (m0,
// m1 and mend multiples of 8 but m1); the scalar form for quads [q0, nq) (the tails of the vector pack).
void pack_acts16_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, int16_t* xt,
                      int64_t mp);
void pack_quads16_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t q0, int64_t m0, int64_t m1, int64_t mend,
                         int16_t* xt, int64_t mp);
// Index in xt16 of x_q[m, kk] in layout kActQuads16.
inline int64_t quads16_index(int64_t kk, int64_t m, int64_t mp) {
  return (((kk / 4) * (mp / 8) + m / 8) * 2 + (kk & 1)) * 16 + 2 * (m % 8) + ((kk >> 1) & 1);
}

// x_q rows [m0, m1) -> xk columns (layout kind 1), padding tokens up to the next multiple of 16.
void pack_cols_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xk, int64_t mp);
void pack_cols_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                    uint8_t* xk, int64_t mp);  // AVX2 and AVX-VNNI
void pack_cols_avx512(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xk, int64_t mp);
// pack_cols_scalar for input channels [kk0, k) only (the tails of the vector packs)
void pack_cols_range_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t kk0, int64_t m0, int64_t m1,
                            int64_t mend, uint8_t flip, uint8_t* xk, int64_t mp);
// The int16 columns of the plain AVX2 path (layout kActCols16), the same arguments without flip; the
// scalar form for input channels [kk0, k) (the tails of the vector pack).
void pack_cols16_avx2(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, int16_t* xk,
                      int64_t mp);
void pack_cols16_range_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t kk0, int64_t m0, int64_t m1,
                              int64_t mend, int16_t* xk, int64_t mp);

// Quantize float rows [m0, m1) of x (row stride ldx) into xq [M, ldq] int8 and x_scale [M].
void quantize_rows_scalar(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                          const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale);
void quantize_rows_avx512(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                          const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale);
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                        const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale);

// The product + epilogue for tasks [t0, t1).
void spmm_scalar(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1);
void spmm_avx2(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1);
void spmm_avxvnni(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1);
void spmm_avx512(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1);

// The channel-major steps of the fused FFN and QKV-attention ops (ffn_avx512.cpp; x86 only), on one
// tile of kTileTokens tokens (a.m <= kTileTokens live, a.mp == kTileTokens): row n of yt (ldy floats
// apart, kTileTokens written) gets the float epilogue (+ GELU) of output channel n; if amax is given,
// amax [kTileTokens] the per-token max |y| and *nonfinite bit m whether token m has a NaN/Inf. Then
// quant_pack_cols: yt [k][kTileTokens] -> xt of the next product (activation layout `layout`, an
// ActLayout; mp = kTileTokens) quantized per token, x_scale [m] its scales.
void spmm_cols_avx512(const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias, bool gelu,
                      float* yt, int64_t ldy, float* amax, uint64_t* nonfinite);
void quant_pack_cols_avx512(const float* yt, int64_t k, int64_t m, const float* amax, uint64_t nonfinite,
                            const QuantParams& qp, int layout, uint8_t flip, uint8_t* xt, float* x_scale);
// The same on the 256-bit paths (fused_avx2.cpp, fused_avxvnni.cpp; AVX2 + FMA): spmm_cols_avx2 (flip 0)
// and spmm_cols_avxvnni (flip 0x80) share quant_pack_cols_avx2 (flip passed).
void spmm_cols_avx2(const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias, bool gelu,
                    float* yt, int64_t ldy, float* amax, uint64_t* nonfinite);
void spmm_cols_avxvnni(const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias, bool gelu,
                       float* yt, int64_t ldy, float* amax, uint64_t* nonfinite);
void quant_pack_cols_avx2(const float* yt, int64_t k, int64_t m, const float* amax, uint64_t nonfinite,
                          const QuantParams& qp, int layout, uint8_t flip, uint8_t* xt, float* x_scale);
// Token m of a channel-major yt [k][kTileTokens] with a NaN/Inf: quantize_row_exact on the gathered
// column, written into xt (activation layout `layout`, mp = kTileTokens) and x_scale[m].
void quantize_token_exact(const float* yt, int64_t k, int64_t m, const QuantParams& qp, int layout, uint8_t flip,
                          uint8_t* xt, float* x_scale);

// Scalar helpers shared by every ISA (quantize_scalar.cpp / epilogue_scalar.cpp).
void quantize_row_exact(const float* x, int64_t k, const QuantParams& qp, int8_t* q, float* x_scale);
uint16_t float_to_bf16(float f);
void store_epilogue_scalar(const Epilogue& e, const float* x_scale, int64_t m, int64_t n, uint32_t acc);

// Best ISA this CPU runs (cpuid), and whether it runs a given one.
int best_isa();
bool isa_supported(int isa);
// AVX2 and FMA (the AVX2 post-ops use FMA; the AVX2 ISA code is granted on the avx2 bit alone)
bool fma_supported();
const char* isa_name(int isa);

}  // namespace sparse_ofa_cpu
