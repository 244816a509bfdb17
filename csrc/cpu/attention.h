// Fused scaled-dot-product attention for the fast path (no torch headers: see sparse_cpu.h).
//
// Reads q, k, v straight from the fused QKV projection's output and writes the heads merged:
//     qkv[b, i, :] = [ q (heads x dim) | k (heads x dim) | v (heads x dim) ]     fp32
//     s[j]   = scale * sum_c q[b, i, h, c] * k[b, j, h, c]  (+ additive mask, or -inf where a bool
//                                                               mask is false)
//     p[j]   = exp(s[j] - max_j s) / sum_j exp(s[j] - max_j s)   (a row with every key masked: p = 0)
//     out[b, i, h * dim + c] = sum_j p[j] * v[b, j, h, c]
// One task per (batch, head). fp32 throughout; only the summation order and exp's last bit differ
// from torch's scaled_dot_product_attention.
#pragma once

#include <cstdint>

namespace sparse_ofa_cpu {

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskAdd = 2 };

struct AttnProblem {
  const float* qkv;          // q of (b, i, h, c) at qkv[b * sb + i * st + (h * dim + c) * sc]
  int64_t sb, st, sc;        // element strides between batches, tokens and channels: sc = 1 for the
                             // row-major [B, S, 3H] output of a linear, st = 1 for a channel-major
                             // [3H][tokens] one (cpu_qkv_attention: K^T is then read in place)
  int64_t k_off, v_off;      // channels where k and v start (q starts at 0)
  int64_t batch, seq, heads, dim;
  float scale;
  int mask_kind;             // MaskKind
  const void* mask;          // bool (1 byte) or float: element (b, h, i, j) at mb*b + mh*h + mi*i + j
  int64_t mb, mh, mi;        // element strides, 0 where the mask broadcasts
  float* out;                // out(b, i, h, c) at out[b * ob + i * ot + h * dim + c]
  int64_t ob, ot;
};

// the mask row of query i in (batch b, head h), nullptr without a mask
inline const void* mask_row(const AttnProblem& p, int64_t b, int64_t h, int64_t i) {
  if (p.mask == nullptr) return nullptr;
  const int64_t bytes = p.mask_kind == kMaskBool ? 1 : 4;
  return static_cast<const char*>(p.mask) + (b * p.mb + h * p.mh + i * p.mi) * bytes;
}

// floats of per-thread scratch a task needs
int64_t attention_scratch_floats(const AttnProblem& p);

// tasks [t0, t1) of batch * heads, task = b * heads + h
void attention_scalar(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch);
void attention_avx512(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch);
void attention_avx2(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch);  // AVX2 + FMA

// bf16 products (vdpbf16ps; attention_bf16.cpp), fp32 softmax: on CPUs where
// bf16_attention_supported(); its scratch in 4-byte words
void attention_avx512_bf16(const AttnProblem& p, int64_t t0, int64_t t1, float* scratch);
int64_t attention_bf16_scratch_words(const AttnProblem& p);
bool bf16_attention_supported();

// the AVX-512 kernels' masked row softmax (attention_avx512.cpp): s = exp(x - max) in place, 1 / sum
float softmax_row_avx512(float* s, int64_t seq, int mask_kind, const void* mask);
// ... and how many keys a block of query rows needs (the rest are masked for all of them)
int64_t keys_needed(const AttnProblem& p, int64_t b, int64_t h, int64_t i0, int64_t rows);

}  // namespace sparse_ofa_cpu
