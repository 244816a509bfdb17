// Portable scalar path: the same layouts and tasks as the vector paths, plain C++ loops.
// Also the exact scalar helpers every ISA falls back on (non-finite rows, tails, bf16 rounding).
#include <cmath>
#include <cstring>
#include <vector>

#include "sparse_cpu.h"

namespace sparse_ofa_cpu {

// quant.py, one row: dynamic  q = clamp(rne(x * ((1 / amax) * 127)), -127, 127), x_scale = amax / 127
//                    (torch evaluates `127.0 / amax` as amax.reciprocal() * 127: same rounding here);
//                    static   q = clamp(rne(x * inv_scale) + zp, qmin, qmax), x_scale = s (NaN if the
//                    row has a NaN/Inf). NaN products become 0, as torch.nan_to_num does.
void quantize_row_exact(const float* x, int64_t k, const QuantParams& qp, int8_t* q, float* x_scale) {
  float inv, lo, hi, zp;
  if (qp.static_scale == 0.0f) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < k; ++i) {
      float a = std::fabs(x[i]);
      if (a != a) nan = true;
      else if (a > amax) amax = a;
    }
    if (nan) amax = NAN;  // torch.amax propagates NaN
    bool nonzero = amax != 0.0f;  // true for NaN, as in torch
    inv = nonzero ? (1.0f / amax) * 127.0f : 0.0f;  // torch: 127.0 / t is t.reciprocal() * 127
    *x_scale = nonzero ? amax / 127.0f : 0.0f;
    lo = -127.0f, hi = 127.0f, zp = 0.0f;
  } else {
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) finite = finite && std::isfinite(x[i]);
    *x_scale = finite ? qp.static_scale : NAN;
    inv = qp.inv_scale;
    lo = (float)qp.qmin, hi = (float)qp.qmax, zp = (float)qp.zero_point;
  }
  for (int64_t i = 0; i < k; ++i) {
    float r = std::nearbyint(x[i] * inv) + zp;  // default rounding mode: half to even
    if (r != r) r = 0.0f;
    else r = r < lo ? lo : (r > hi ? hi : r);
    q[i] = (int8_t)(int)r;
  }
}

void quantize_token_exact(const float* yt, int64_t k, int64_t m, const QuantParams& qp, int layout, uint8_t flip,
                          uint8_t* xt, float* x_scale) {
  thread_local std::vector<float> col;
  thread_local std::vector<int8_t> q;
  col.resize(k);
  q.resize(k);
  for (int64_t kk = 0; kk < k; ++kk) col[kk] = yt[kk * kTileTokens + m];
  quantize_row_exact(col.data(), k, qp, q.data(), x_scale + m);
  for (int64_t kk = 0; kk < k; ++kk) {
    if (layout == kActCols16 || layout == kActQuads16) {
      ((int16_t*)xt)[layout == kActCols16 ? kk * kTileTokens + m : quads16_index(kk, m, kTileTokens)] = q[kk];
      continue;
    }
    const int64_t at = layout == kActCols8 ? kk * kTileTokens + m : ((kk / 4) * kTileTokens + m) * 4 + kk % 4;
    xt[at] = (uint8_t)q[kk] ^ flip;
  }
}

// float32 -> bfloat16, round to nearest even, NaN kept quiet (c10::BFloat16 does the same).
uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (f != f) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// y[m, n] from the exact int32 acc (passed as its two's complement bits).
void store_epilogue_scalar(const Epilogue& e, const float* x_scale, int64_t m, int64_t n, uint32_t acc) {
  int32_t a = (int32_t)acc;
  if (e.kind == kOutInt32) {
    ((int32_t*)e.out)[m * e.ldo + n] = a;
    return;
  }
  float y = ((float)a * x_scale[m]) * e.w_scale[n];
  if (e.bias) y = y + e.bias[n];
  if (e.kind == kOutFloat) ((float*)e.out)[m * e.ldo + n] = y;
  else ((uint16_t*)e.out)[m * e.ldo + n] = float_to_bf16(y);
}

void quantize_rows_scalar(const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                          const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale) {
  for (int64_t m = m0; m < m1; ++m) quantize_row_exact(x + m * ldx, k, qp, xq + m * ldq, x_scale + m);
}

// xt[(q * mp + m) * 4 + j] = x_q[m, 4q + j] ^ flip for tokens [m0, m1) (m0 a multiple of 16); the
// padding tokens up to the next multiple of 16 and the channels past K get 0 ^ flip.
void pack_quads_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t q0, int64_t m0, int64_t m1, int64_t mend,
                       uint8_t flip, uint8_t* xt, int64_t mp) {
  // one 4-byte quad per copy; the quad past K is assembled bytewise
  const int64_t nq = (k + 3) / 4, full = k / 4;
  const uint32_t flip4 = 0x01010101u * flip;
  for (int64_t m = m0; m < mend; ++m) {
    const int8_t* row = xq + m * ldx;
    for (int64_t q = q0; q < nq; ++q) {
      uint32_t v = 0;
      if (m < m1) {
        if (q < full) {
          std::memcpy(&v, row + 4 * q, 4);
        } else {
          uint8_t b[4] = {0, 0, 0, 0};
          for (int64_t kk = 4 * q; kk < k; ++kk) b[kk - 4 * q] = (uint8_t)row[kk];
          std::memcpy(&v, b, 4);
        }
      }
      v ^= flip4;
      std::memcpy(xt + (q * mp + m) * 4, &v, 4);
    }
  }
}

void pack_acts_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xt, int64_t mp) {
  pack_quads_scalar(xq, ldx, k, 0, m0, m1, mend, flip, xt, mp);
}

void pack_quads16_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t q0, int64_t m0, int64_t m1, int64_t mend,
                         int16_t* xt, int64_t mp) {
  for (int64_t m = m0; m < mend; ++m)
    for (int64_t kk = 4 * q0; kk < (k + 3) / 4 * 4; ++kk)
      xt[quads16_index(kk, m, mp)] = m < m1 && kk < k ? xq[m * ldx + kk] : 0;
}

void pack_cols_range_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t kk0, int64_t m0, int64_t m1,
                            int64_t mend, uint8_t flip, uint8_t* xk, int64_t mp) {
  for (int64_t kk = kk0; kk < k; ++kk)
    for (int64_t m = m0; m < mend; ++m) xk[kk * mp + m] = (m < m1 ? (uint8_t)xq[m * ldx + kk] : 0) ^ flip;
}

void pack_cols16_range_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t kk0, int64_t m0, int64_t m1,
                              int64_t mend, int16_t* xk, int64_t mp) {
  for (int64_t kk = kk0; kk < k; ++kk)
    for (int64_t m = m0; m < mend; ++m) xk[kk * mp + m] = m < m1 ? xq[m * ldx + kk] : 0;
}

void pack_cols_scalar(const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1, int64_t mend, uint8_t flip,
                      uint8_t* xk, int64_t mp) {
  pack_cols_range_scalar(xq, ldx, k, 0, m0, m1, mend, flip, xk, mp);
}

// byte j of quad p for token m, in either layout kind
static inline int32_t act_byte(const QuadWeight& w, const PackedActs& a, int32_t p, int j, int64_t m) {
  int64_t idx = w.gather ? (int64_t)w.quad_k[4 * (int64_t)p + j] * a.mp + m
                         : ((int64_t)w.quad_k[p] * a.mp + m) * 4 + j;
  return (int32_t)(int8_t)(a.xt[idx] ^ a.flip);
}

void spmm_scalar(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  const int64_t ngroups = (w.n + kRowGroup - 1) / kRowGroup;
  int32_t acc[kTokenBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = (t / ngroups) * kTokenBlock, g = t % ngroups;
    const int64_t mt = a.m - m0 < kTokenBlock ? a.m - m0 : kTokenBlock;
    for (int64_t n = g * kRowGroup; n < w.n && n < (g + 1) * kRowGroup; ++n) {
      for (int64_t i = 0; i < mt; ++i) acc[i] = 0;
      for (int32_t p = w.row_ptr[n]; p < w.row_ptr[n + 1]; ++p) {
        int8_t wb[4];
        std::memcpy(wb, &w.quad_w[p], 4);
        for (int64_t i = 0; i < mt; ++i) {
          int32_t s = 0;
          for (int j = 0; j < 4; ++j) s += act_byte(w, a, p, j, m0 + i) * wb[j];
          acc[i] += s;  // |acc| <= K * 128 * 127 < 2^31: no overflow
        }
      }
      for (int64_t i = 0; i < mt; ++i) store_epilogue_scalar(e, a.x_scale, m0 + i, n, (uint32_t)acc[i]);
    }
  }
}

}  // namespace sparse_ofa_cpu
