// torch.ops.sparse_ofa.cpu_isa, cpu_quantize, cpu_int_mm(_out), cpu_linear(_out): argument checks, workspaces,
// threading (at::parallel_for) and ISA dispatch around the sparse kernels of csrc/cpu/. Registered with TORCH_LIBRARY_FRAGMENT because the
// CUDA extension and sparse_ofa/backends/reference.py add ops to the same namespace.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "check_format.h"  // numbers in messages: never streamed (see there why)
#include "cpu/binding_util.h"
#include "cpu/linear_binding.h"
#include "cpu/sparse_cpu.h"

namespace sparse_ofa_cpu {

int64_t resolve_isa(int64_t isa) {
  if (isa < 0) return best_isa();
  TORCH_CHECK(isa <= kAvx512Vnni, "sparse_ofa cpu: unknown ISA code ", sparse_ofa::fmt_num(isa));
  TORCH_CHECK(isa_supported((int)isa), "sparse_ofa cpu: this CPU does not run the ", isa_name((int)isa),
              " kernels");
  return isa;
}

// (no anonymous namespace: cpu_ffn.cpp reuses the checks and steps declared in cpu/linear_binding.h)
using sparse_ofa::fmt_dims;
using sparse_ofa::fmt_float;
using sparse_ofa::fmt_num;

constexpr int64_t kLayoutVersion = 2;  // "quads v2" (16-bit quad_k), see cpu/sparse_cpu.h
constexpr int64_t kMaxK = 65536;       // channels a 16-bit index reaches

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sparse_ofa cpu: ", name, " must be on the CPU, got ", t.device());
}

void check_vec(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, "sparse_ofa cpu: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == numel, "sparse_ofa cpu: ", name, " must have shape (",
              fmt_num(numel), "), got ", fmt_dims(t));
  TORCH_CHECK(t.is_contiguous(), "sparse_ofa cpu: ", name, " must be contiguous");
}

// The kernels index the activations with every quad_k entry and walk quad_w / quad_k from
// row_ptr[n] to row_ptr[n + 1]: a layout that breaks either bound would read outside the buffers.
// Checked on every call (these ops are public and take the layout as plain tensors): row_ptr must
// not decrease (with row_ptr[0] == 0 and row_ptr[N] == nq checked by the caller, every row then lies
// inside [0, nq)), and every channel index must lie in the layout's input range: a quad index
// q < ceil(K / 4) for kind 0, an input channel < K for kind 1 (quad_k is read as uint16, so a
// negative int16 is a large index). One pass over N + 1 and nq (or 4 nq) integers; measured cost
// in bench/NOTES.md ("Layout checks").
void check_indices(const int32_t* rp, const uint16_t* qk, int64_t n, int64_t k, int64_t nq, int kind) {
  // Both scans are branch-free so that they vectorize with the baseline SSE2 this file is built for
  // (a uint32 max does not: 6x slower); the offending entry is searched for only on failure.
  int decreasing = 0;
  for (int64_t r = 0; r < n; ++r) decreasing |= rp[r + 1] < rp[r];
  if (decreasing) {
    int64_t r = 0;
    while (rp[r + 1] >= rp[r]) ++r;
    TORCH_CHECK(false, "sparse_ofa cpu: row_ptr must not decrease, but row_ptr[", fmt_num(r + 1), "] = ",
                fmt_num(rp[r + 1]), " < row_ptr[", fmt_num(r), "] = ", fmt_num(rp[r]));
  }
  const int64_t count = kind ? 4 * nq : nq;
  const uint32_t bound = (uint32_t)(kind ? k : (k + 3) / 4);
  // max of the uint16 indices, as signed int16 biased by 0x8000 (pmaxsw); chunks of 64k entries on
  // the op's threads (a layout of up to 64k entries is scanned inline, without a parallel region)
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  std::vector<int16_t> tops(std::max<int64_t>(chunks, 1), INT16_MIN);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int16_t top = INT16_MIN;
      for (int64_t i = c * kChunk, e = std::min(count, i + kChunk); i < e; ++i)
        top = std::max<int16_t>(top, (int16_t)(qk[i] ^ 0x8000));
      tops[c] = top;
    }
  });
  const int16_t top = *std::max_element(tops.begin(), tops.end());
  if (count > 0 && (uint32_t)(uint16_t)(top ^ 0x8000) >= bound) {
    int64_t i = 0;
    while (qk[i] < bound) ++i;
    TORCH_CHECK(false, "sparse_ofa cpu: quad_k[", fmt_num(i), "] = ", fmt_num((int16_t)qk[i]),
                kind ? " is not an input channel of the layout (0 <= channel < K = "
                     : " is not a quad of the layout (0 <= quad < ceil(K / 4) = ",
                fmt_num(bound), "; read as uint16: ", fmt_num(qk[i]), ")");
  }
}

// Validates the derived layout tensors and returns the view the kernels read.
QuadWeight weight_of(const at::Tensor& quad_w, const at::Tensor& quad_k, const at::Tensor& row_ptr,
                     const at::Tensor& rowsum, const at::Tensor& layout) {
  check_cpu(layout, "layout");
  TORCH_CHECK(layout.scalar_type() == at::kInt && layout.dim() == 1 && layout.numel() == 5,
              "sparse_ofa cpu: layout must be int32 [5] (version, N, K, quads, kind), got ",
              layout.scalar_type(), " ", fmt_dims(layout));
  const int32_t* l = layout.contiguous().data_ptr<int32_t>();
  TORCH_CHECK(l[0] == kLayoutVersion, "sparse_ofa cpu: prepared weight has layout version ", fmt_num(l[0]),
              ", these kernels read version ", fmt_num(kLayoutVersion), " (prepare it again from the packed weight)");
  const int64_t n = l[1], k = l[2], nq = l[3], kind = l[4];
  TORCH_CHECK(n >= 0 && k >= 0 && nq >= 0, "sparse_ofa cpu: layout has negative sizes");
  TORCH_CHECK(kind == 0 || kind == 1, "sparse_ofa cpu: unknown layout kind ", fmt_num(kind));
  check_vec(quad_w, "quad_w", at::kInt, nq);
  TORCH_CHECK(k <= kMaxK, "sparse_ofa cpu: the prepared layouts index at most ", fmt_num(kMaxK),
              " input features, got ", fmt_num(k));
  check_vec(quad_k, "quad_k", at::kShort, kind ? 4 * nq : nq);
  check_vec(row_ptr, "row_ptr", at::kInt, n + 1);
  check_vec(rowsum, "rowsum", at::kInt, n);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n] == nq, "sparse_ofa cpu: row_ptr must run from 0 to ", fmt_num(nq));
  check_indices(rp, reinterpret_cast<const uint16_t*>(quad_k.data_ptr<int16_t>()), n, k, nq, (int)kind);
  return QuadWeight{quad_w.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(quad_k.data_ptr<int16_t>()), rp, rowsum.data_ptr<int32_t>(),
                    n, k, (int)kind};
}

at::Tensor check_x(const at::Tensor& x, int64_t k, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(x.dim() == 2, "sparse_ofa cpu: ", name, " must be 2-D [M, K], got ", fmt_dims(x));
  TORCH_CHECK(x.size(1) == k, "sparse_ofa cpu: ", name, " has ", fmt_num(x.size(1)), " input features, the weight has ", fmt_num(k));
  // rows may be strided; channels must be contiguous
  return x.stride(1) == 1 ? x : x.contiguous();
}

void check_out(const at::Tensor& out, int64_t m, int64_t n) {
  check_cpu(out, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n, "sparse_ofa cpu: out must have shape [",
              fmt_num(m), ", ", fmt_num(n), "], got ", fmt_dims(out));
  TORCH_CHECK(out.stride(1) == 1 || n <= 1, "sparse_ofa cpu: out rows must be contiguous");
}

QuadWeight layout_of(const std::vector<at::Tensor>& w, const char* op, const char* name) {
  TORCH_CHECK(w.size() == 5, "sparse_ofa ", op, ": ", name, " must be the 5 layout tensors (quad_w, quad_k, "
              "row_ptr, rowsum, layout), got ", fmt_num((int64_t)w.size()));
  return weight_of(w[0], w[1], w[2], w[3], w[4]);
}

const float* bias_of(const c10::optional<at::Tensor>& bias, const char* name, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_vec(*bias, name, at::kFloat, n);
  return bias->data_ptr<float>();
}

void pack_acts(int isa, int layout, const int8_t* xq, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
               int64_t mend, uint8_t flip, uint8_t* xt, int64_t mp) {
  if (layout == kActCols16) {
    pack_cols16_avx2(xq, ldx, k, m0, m1, mend, (int16_t*)xt, mp);
  } else if (layout == kActQuads16) {
    pack_acts16_avx2(xq, ldx, k, m0, m1, mend, (int16_t*)xt, mp);
  } else if (layout == kActCols8) {
    if (isa == kAvx512Vnni) pack_cols_avx512(xq, ldx, k, m0, m1, mend, flip, xt, mp);
    else if (isa >= kAvx2) pack_cols_avx2(xq, ldx, k, m0, m1, mend, flip, xt, mp);
    else pack_cols_scalar(xq, ldx, k, m0, m1, mend, flip, xt, mp);
  } else if (isa == kAvx512Vnni) {
    pack_acts_avx512(xq, ldx, k, m0, m1, mend, flip, xt, mp);
  } else if (isa >= kAvx2) {
    pack_acts_avx2(xq, ldx, k, m0, m1, mend, flip, xt, mp);
  } else {
    pack_acts_scalar(xq, ldx, k, m0, m1, mend, flip, xt, mp);
  }
}

// Bytes of one tile of mp tokens in activation layout `layout` for w (rows: input channels of kind 1,
// quads of kind 0), rounded up to a cache line.
static int64_t tile_bytes(const QuadWeight& w, int layout, int64_t mp) {
  const int64_t bytes = (w.gather ? w.k : (w.k + 3) / 4) * mp * act_token_bytes(layout);
  return (bytes + 63) / 64 * 64;
}

Tiles tiles_of(int isa, const QuadWeight& w, int64_t m) {
  const int64_t pad = w.gather ? kColPad : kTokenPad;
  Tiles t;
  t.layout = act_layout(isa, w.gather);
  if (isa == kAvx512Vnni && m > kTileTokens) {
    t.tok = t.mp = kTileTokens;
    t.count = (m + kTileTokens - 1) / kTileTokens;
  } else {
    t.tok = t.mp = (m + pad - 1) / pad * pad;
    t.count = 1;
  }
  t.bytes = tile_bytes(w, t.layout, t.mp);
  return t;
}

size_t act_bytes(const Tiles& t) { return (size_t)(t.bytes * t.count) + 64; }

void quantize_rows(int isa, const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                   const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale) {
  if (isa == kAvx512Vnni) quantize_rows_avx512(x, ldx, k, m0, m1, qp, xq, ldq, x_scale);
  else if (isa >= kAvx2) quantize_rows_avx2(x, ldx, k, m0, m1, qp, xq, ldq, x_scale);
  else quantize_rows_scalar(x, ldx, k, m0, m1, qp, xq, ldq, x_scale);
}

void spmm_tasks(int isa, const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  switch (isa) {
    case kAvx512Vnni: return spmm_avx512(w, a, e, t0, t1);
    case kAvxVnni: return spmm_avxvnni(w, a, e, t0, t1);
    case kAvx2: return spmm_avx2(w, a, e, t0, t1);
    default: return spmm_scalar(w, a, e, t0, t1);
  }
}

// The activations of tokens [ms, me), inside one tile (or anywhere in a single-tile layout), and the
// matching output rows.
PackedActs acts_of(const PackedActs& a, const Tiles& t, int64_t ms, int64_t me) {
  PackedActs sub = a;
  const int64_t tile = ms / t.tok, local = ms % t.tok;
  // kActQuads16 groups 8 tokens: offsets by token are linear only at multiples of 8 (tile starts and
  // token chunks are multiples of 64)
  TORCH_INTERNAL_ASSERT(local % 8 == 0, "sparse_ofa cpu: token offset ", local, " inside a tile");
  sub.xt = a.xt + tile * t.bytes + local * act_token_bytes(t.layout);
  sub.m = me - ms;
  sub.mp = t.mp;
  sub.x_scale = a.x_scale ? a.x_scale + ms : nullptr;
  return sub;
}

Epilogue epilogue_of(const Epilogue& e, int64_t ms) {
  Epilogue sub = e;
  sub.out = (char*)e.out + ms * e.ldo * (e.kind == kOutBFloat16 ? 2 : 4);
  return sub;
}

// Pack the activations (pack_blocks(b0, b1) writes 16-token blocks [b0, b1) of the tiles, padding
// included) and run the product, tile by tile (all output rows against one resident tile). With
// enough tokens each thread takes its own token range (a multiple of 64) and packs and multiplies it
// in ONE parallel region: no barrier between packing and the product (OpenMP barriers are costly on
// a loaded machine). Otherwise: pack in parallel, then split the product by (tile, output channels).
// post(ms, me), if given, finishes output rows [ms, me) (PostOps): in the token-range case right after
// the thread's own product (its rows are still in its cache), otherwise in a pass of its own.
using PostFn = std::function<void(int64_t, int64_t)>;

template <class PackBlocks>
void pack_and_multiply(int isa, const QuadWeight& w, const PackedActs& a, const Tiles& t, const Epilogue& e,
                       const PackBlocks& pack_blocks, const PostFn& post = nullptr) {
  const int64_t nblocks = t.count * t.tok / kTokenPad;
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && a.m >= kTileTokens * threads) {
    const int64_t chunk = token_chunk(a.m, threads);
    const int64_t nchunks = (a.m + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t ms = c * chunk, me = std::min(a.m, ms + chunk);
        pack_blocks(ms / kTokenPad, c == nchunks - 1 ? nblocks : me / kTokenPad);
        for (int64_t s = ms; s < me;) {
          const int64_t next = std::min(me, (s / t.tok + 1) * t.tok);
          const PackedActs sub = acts_of(a, t, s, next);
          spmm_tasks(isa, w, sub, epilogue_of(e, s), 0, task_count(sub.m, w.n));
          s = next;
        }
        if (post) post(ms, me);
      }
    });
    return;
  }
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) { pack_blocks(b0, b1); });
  const int64_t per_tile = task_count(std::min(t.tok, a.m), w.n);
  at::parallel_for(0, t.count * per_tile, 1, [&](int64_t t0, int64_t t1) {
    while (t0 < t1) {
      const int64_t tile = t0 / per_tile, end = std::min(t1, (tile + 1) * per_tile);
      const int64_t ms = tile * t.tok, me = std::min(a.m, ms + t.tok);
      spmm_tasks(isa, w, acts_of(a, t, ms, me), epilogue_of(e, ms), t0 - tile * per_tile,
                 end - tile * per_tile);
      t0 = end;
    }
  });
  if (post) at::parallel_for(0, a.m, 16, [&](int64_t m0, int64_t m1) { post(m0, m1); });
}

// Packs 16-token block b (tokens [16b, 16b + 16), rows past M as padding); xb = x_q row 16b
// (row stride ldx; not read when the block is all padding).
void pack_block(int isa, const QuadWeight& w, const Tiles& t, const int8_t* xb, int64_t ldx, int64_t m, int64_t b,
                uint8_t flip, uint8_t* xt) {
  const int64_t g = b * kTokenPad, tile = g / t.tok, local = g % t.tok;
  const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kTokenPad, m - g));
  pack_acts(isa, t.layout, xb, ldx, w.k, 0, rows, kTokenPad, flip,
            xt + tile * t.bytes + local * act_token_bytes(t.layout), t.mp);
}

uint8_t flip_of(int isa) { return (isa == kAvx512Vnni || isa == kAvxVnni) ? 0x80 : 0; }

QuantParams quant_params(double static_scale, double inv_scale, int64_t zero_point, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(static_scale >= 0, "sparse_ofa cpu: static_scale must be >= 0 (0 = dynamic), got ", fmt_float(static_scale));
  TORCH_CHECK(-128 <= qmin && qmin <= zero_point && zero_point <= qmax && qmax <= 127,
              "sparse_ofa cpu: need -128 <= qmin <= zero_point <= qmax <= 127");
  return QuantParams{(float)static_scale, (float)inv_scale, (int)zero_point, (int)qmin, (int)qmax};
}

Tiles one_tile(int isa, const QuadWeight& w) {
  const int layout = act_layout(isa, w.gather);
  return Tiles{kTileTokens, kTileTokens, tile_bytes(w, layout, kTileTokens), 1, layout};
}

void pack_tile(int isa, const QuadWeight& w, const float* x, int64_t ldx, int64_t s, int64_t mt, const QuantParams& q,
               uint8_t* xt, float* x_scale) {
  thread_local std::vector<uint8_t> block_buf;
  int8_t* block = (int8_t*)scratch(block_buf, (size_t)(kTokenPad * w.k));
  const Tiles tile = one_tile(isa, w);
  for (int64_t b = 0; b < kTileTokens / kTokenPad; ++b) {  // 16 tokens at a time, via an L1-sized block
    const int64_t m0 = b * kTokenPad, m1 = std::min(mt, m0 + kTokenPad);
    if (m1 > m0) quantize_rows(isa, x + (s + m0) * ldx, ldx, w.k, 0, m1 - m0, q, block, w.k, x_scale + m0);
    pack_block(isa, w, tile, block, w.k, mt, b, flip_of(isa), xt);  // (past mt: padding)
  }
}

bool has_cols_route(int isa) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool fma = fma_supported();
  return isa == kAvx512Vnni || ((isa == kAvx2 || isa == kAvxVnni) && fma);
#else
  (void)isa;
  return false;
#endif
}

#if defined(__x86_64__) || defined(__i386__)
void spmm_cols(int isa, const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias, bool gelu,
               float* yt, int64_t ldy, float* amax, uint64_t* nonfinite) {
  if (isa == kAvx512Vnni) spmm_cols_avx512(w, a, w_scale, bias, gelu, yt, ldy, amax, nonfinite);
  else if (isa == kAvxVnni) spmm_cols_avxvnni(w, a, w_scale, bias, gelu, yt, ldy, amax, nonfinite);
  else spmm_cols_avx2(w, a, w_scale, bias, gelu, yt, ldy, amax, nonfinite);
}

void quant_pack_cols(int isa, const float* yt, int64_t k, int64_t m, const float* amax, uint64_t nonfinite,
                     const QuantParams& qp, int layout, uint8_t* xt, float* x_scale) {
  if (isa == kAvx512Vnni) quant_pack_cols_avx512(yt, k, m, amax, nonfinite, qp, layout, flip_of(isa), xt, x_scale);
  else quant_pack_cols_avx2(yt, k, m, amax, nonfinite, qp, layout, flip_of(isa), xt, x_scale);
}
#else  // never called (has_cols_route is false), defined so that the bindings link
void spmm_cols(int, const QuadWeight&, const PackedActs&, const float*, const float*, bool, float*, int64_t, float*,
               uint64_t*) {}
void quant_pack_cols(int, const float*, int64_t, int64_t, const float*, uint64_t, const QuantParams&, int, uint8_t*,
                     float*) {}
#endif

at::Tensor float_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "sparse_ofa cpu: x must be float32/bfloat16/float16, got ", x.scalar_type());
  at::Tensor xf = check_x(x, k, "x");
  return xf.scalar_type() == at::kFloat ? xf : xf.to(at::kFloat);  // exact widening
}

// The fused linear's optional post-ops (cpu/sparse_cpu.h), checked against the output.
PostOps post_ops(const c10::optional<at::Tensor>& residual, bool gelu, const c10::optional<at::Tensor>& ln_weight,
                 const c10::optional<at::Tensor>& ln_bias, double ln_eps, const at::Tensor& out, int64_t m, int64_t n) {
  PostOps po{nullptr, 0, gelu, nullptr, nullptr, (float)ln_eps};
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_ln = ln_weight.has_value() && ln_weight->defined();
  if (has_res) {
    check_cpu(*residual, "residual");
    TORCH_CHECK(residual->scalar_type() == at::kFloat, "sparse_ofa cpu: residual must be float32, got ",
                residual->scalar_type());
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n,
                "sparse_ofa cpu: residual must have shape [", fmt_num(m), ", ", fmt_num(n), "], got ", fmt_dims(*residual));
    TORCH_CHECK(residual->stride(1) == 1 || n <= 1, "sparse_ofa cpu: residual rows must be contiguous");
    po.residual = residual->data_ptr<float>();
    po.ldr = residual->stride(0);
  }
  if (has_ln) {
    check_vec(*ln_weight, "ln_weight", at::kFloat, n);
    po.ln_w = ln_weight->data_ptr<float>();
    if (ln_bias.has_value() && ln_bias->defined()) {
      check_vec(*ln_bias, "ln_bias", at::kFloat, n);
      po.ln_b = ln_bias->data_ptr<float>();
    }
    TORCH_CHECK(ln_eps > 0, "sparse_ofa cpu: ln_eps must be > 0, got ", fmt_float(ln_eps));
  } else {
    TORCH_CHECK(!(ln_bias.has_value() && ln_bias->defined()), "sparse_ofa cpu: ln_bias given without ln_weight");
  }
  TORCH_CHECK(!po.any() || out.scalar_type() == at::kFloat,
              "sparse_ofa cpu: residual / gelu / LayerNorm post-ops need a float32 output, got ", out.scalar_type());
  return po;
}

void post_rows_raw(int isa, const PostOps& po, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1) {
  static const bool fma = fma_supported();
  if (isa == kAvx512Vnni) post_rows_avx512(po, y, ldy, n, m0, m1);
  else if (isa >= kAvx2 && fma) post_rows_avx2(po, y, ldy, n, m0, m1);
  else post_rows_scalar(po, y, ldy, n, m0, m1);
}

void post_rows(int isa, const PostOps& po, at::Tensor& out, int64_t n, int64_t m0, int64_t m1) {
  post_rows_raw(isa, po, out.data_ptr<float>(), out.stride(0), n, m0, m1);
}

// ---------------------------------------------------------------------------------------- ops
int64_t cpu_isa() { return best_isa(); }

std::tuple<at::Tensor, at::Tensor> cpu_quantize(const at::Tensor& x, double static_scale, double inv_scale,
                                                int64_t zero_point, int64_t qmin, int64_t qmax, int64_t isa) {
  const int is = (int)resolve_isa(isa);
  const QuantParams qp = quant_params(static_scale, inv_scale, zero_point, qmin, qmax);
  TORCH_CHECK(x.dim() == 2, "sparse_ofa cpu: x must be 2-D [M, K], got ", fmt_dims(x));
  const at::Tensor xf = float_input(x, x.size(1));
  const int64_t m = xf.size(0), k = xf.size(1);
  at::Tensor xq = at::empty({m, k}, xf.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, xf.options());
  const float* xp = xf.data_ptr<float>();
  int8_t* qp_out = xq.data_ptr<int8_t>();
  float* sp = xs.data_ptr<float>();
  const int64_t ldx = xf.stride(0);
  at::parallel_for(0, m, 16, [&](int64_t m0, int64_t m1) {
    quantize_rows(is, xp, ldx, k, m0, m1, qp, qp_out, k, sp);
  });
  return {xq, xs};
}

void cpu_int_mm_out(const at::Tensor& x_q, const at::Tensor& quad_w, const at::Tensor& quad_k,
                    const at::Tensor& row_ptr, const at::Tensor& rowsum, const at::Tensor& layout,
                    at::Tensor& out, int64_t isa) {
  const int is = (int)resolve_isa(isa);
  const QuadWeight w = weight_of(quad_w, quad_k, row_ptr, rowsum, layout);
  TORCH_CHECK(x_q.scalar_type() == at::kChar, "sparse_ofa cpu: x_q must be int8, got ", x_q.scalar_type());
  const at::Tensor xq = check_x(x_q, w.k, "x_q");
  TORCH_CHECK(out.scalar_type() == at::kInt, "sparse_ofa cpu: out must be int32, got ", out.scalar_type());
  const int64_t m = xq.size(0);
  check_out(out, m, w.n);
  if (m == 0 || w.n == 0) return;
  const Tiles t = tiles_of(is, w, m);
  const int64_t nq = (w.k + 3) / 4;
  thread_local std::vector<uint8_t> xt_buf;
  uint8_t* xt = scratch(xt_buf, act_bytes(t));
  const uint8_t flip = flip_of(is);
  const int8_t* xp = xq.data_ptr<int8_t>();
  const int64_t ldx = xq.stride(0);
  const PackedActs a{xt, m, t.mp, nq, flip, nullptr};
  const Epilogue e{kOutInt32, nullptr, nullptr, out.data_ptr(), out.stride(0), false};
  pack_and_multiply(is, w, a, t, e, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      pack_block(is, w, t, b * kTokenPad < m ? xp + b * kTokenPad * ldx : xp, ldx, m, b, flip, xt);
  });
}

at::Tensor cpu_int_mm(const at::Tensor& x_q, const at::Tensor& quad_w, const at::Tensor& quad_k,
                      const at::Tensor& row_ptr, const at::Tensor& rowsum, const at::Tensor& layout, int64_t isa) {
  TORCH_CHECK(x_q.dim() == 2, "sparse_ofa cpu: x_q must be 2-D [M, K], got ", fmt_dims(x_q));
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "sparse_ofa cpu: row_ptr must be 1-D [N + 1]");
  at::Tensor out = at::empty({x_q.size(0), row_ptr.numel() - 1}, x_q.options().dtype(at::kInt));
  cpu_int_mm_out(x_q, quad_w, quad_k, row_ptr, rowsum, layout, out, isa);
  return out;
}

void cpu_linear_out(const at::Tensor& x, const at::Tensor& quad_w, const at::Tensor& quad_k,
                    const at::Tensor& row_ptr, const at::Tensor& rowsum, const at::Tensor& layout,
                    const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, double static_scale,
                    double inv_scale, int64_t zero_point, int64_t qmin, int64_t qmax, at::Tensor& out,
                    int64_t isa, const c10::optional<at::Tensor>& residual, bool gelu,
                    const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                    double ln_eps) {
  const int is = (int)resolve_isa(isa);
  const QuadWeight w = weight_of(quad_w, quad_k, row_ptr, rowsum, layout);
  const QuantParams qp = quant_params(static_scale, inv_scale, zero_point, qmin, qmax);
  const at::Tensor xf = float_input(x, w.k);
  check_vec(w_scale, "w_scale", at::kFloat, w.n);
  const float* bp = bias_of(bias, "bias", w.n);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "sparse_ofa cpu: out must be float32 or bfloat16, got ", out.scalar_type());
  const int64_t m = xf.size(0), k = w.k;
  check_out(out, m, w.n);
  PostOps po = post_ops(residual, gelu, ln_weight, ln_bias, ln_eps, out, m, w.n);
  // GELU with nothing before it: in the AVX-512 epilogue, in registers (no second pass over y)
  const bool gelu_in_epilogue = po.gelu && po.residual == nullptr && is == kAvx512Vnni;
  if (gelu_in_epilogue) po.gelu = false;
  if (m == 0 || w.n == 0) return;
  const Tiles t = tiles_of(is, w, m);
  const int64_t nq = (k + 3) / 4;
  thread_local std::vector<uint8_t> xt_buf, xs_buf;
  uint8_t* xt = scratch(xt_buf, act_bytes(t));
  float* xs = (float*)scratch(xs_buf, (size_t)(m * sizeof(float)));
  const uint8_t flip = flip_of(is);
  const float* xp = xf.data_ptr<float>();
  const int64_t ldx = xf.stride(0);
  const PackedActs a{xt, m, t.mp, nq, flip, xs};
  const Epilogue e{out.scalar_type() == at::kFloat ? kOutFloat : kOutBFloat16, w_scale.data_ptr<float>(), bp,
                   out.data_ptr(), out.stride(0), gelu_in_epilogue};
  // fused per-token quantization: 16 tokens at a time into an L1-sized block, then into xt
  pack_and_multiply(is, w, a, t, e, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<uint8_t> block_buf;
    int8_t* block = (int8_t*)scratch(block_buf, (size_t)(kTokenPad * k + 64));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * kTokenPad, m1 = std::min(m, m0 + kTokenPad);
      if (m1 > m0) quantize_rows(is, xp + m0 * ldx, ldx, k, 0, m1 - m0, qp, block, k, xs + m0);
      // (a block past M only writes padding)
      pack_block(is, w, t, block, k, m, b, flip, xt);
    }
  }, po.any() ? PostFn([&](int64_t m0, int64_t m1) { post_rows(is, po, out, w.n, m0, m1); }) : PostFn());
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& quad_w, const at::Tensor& quad_k,
                      const at::Tensor& row_ptr, const at::Tensor& rowsum, const at::Tensor& layout,
                      const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, double static_scale,
                      double inv_scale, int64_t zero_point, int64_t qmin, int64_t qmax,
                      at::ScalarType out_dtype, int64_t isa, const c10::optional<at::Tensor>& residual,
                      bool gelu, const c10::optional<at::Tensor>& ln_weight,
                      const c10::optional<at::Tensor>& ln_bias, double ln_eps) {
  // x [..., K] -> out [..., N]: the leading dimensions are flattened here, not by the caller (each
  // reshape/view from Python costs ~0.8 us of dispatch; the fast path calls this 48 times a forward)
  TORCH_CHECK(x.dim() >= 1, "sparse_ofa cpu: x must be [..., K], got a 0-d tensor");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "sparse_ofa cpu: out_dtype must be float32/bfloat16/float16, got ", out_dtype);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "sparse_ofa cpu: row_ptr must be 1-D [N + 1]");
  const int64_t n = row_ptr.numel() - 1;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < shape.size(); ++d) rows *= shape[d];
  c10::optional<at::Tensor> residual2;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "sparse_ofa cpu: residual must have the output's "
                "shape (x's leading dimensions, then ", fmt_num(n), "), got ", fmt_dims(*residual), " for x ", fmt_dims(x));
    residual2 = residual->reshape({rows, n});
  }
  const auto kernel_dtype = out_dtype == at::kHalf ? at::kFloat : out_dtype;
  at::Tensor out = at::empty(shape, x.options().dtype(kernel_dtype));
  at::Tensor out2 = out.view({rows, n});
  cpu_linear_out(x.reshape({rows, x.size(-1)}), quad_w, quad_k, row_ptr, rowsum, layout, w_scale, bias, static_scale,
                 inv_scale, zero_point, qmin, qmax, out2, isa, residual2, gelu, ln_weight, ln_bias, ln_eps);
  return out_dtype == at::kHalf ? out.to(at::kHalf) : out;
}

}  // namespace sparse_ofa_cpu

TORCH_LIBRARY_FRAGMENT(sparse_ofa, m) {
  m.def("cpu_isa() -> int", &sparse_ofa_cpu::cpu_isa);
  m.def("cpu_quantize(Tensor x, float static_scale, float inv_scale, int zero_point, int qmin, int qmax, "
        "int isa=-1) -> (Tensor, Tensor)");
  m.def("cpu_int_mm(Tensor x_q, Tensor quad_w, Tensor quad_k, Tensor row_ptr, Tensor rowsum, Tensor layout, "
        "int isa=-1) -> Tensor");
  m.def("cpu_int_mm_out(Tensor x_q, Tensor quad_w, Tensor quad_k, Tensor row_ptr, Tensor rowsum, "
        "Tensor layout, Tensor(a!) out, int isa=-1) -> ()");
  m.def("cpu_linear(Tensor x, Tensor quad_w, Tensor quad_k, Tensor row_ptr, Tensor rowsum, Tensor layout, "
        "Tensor w_scale, Tensor? bias, float static_scale, float inv_scale, int zero_point, int qmin, "
        "int qmax, ScalarType out_dtype, int isa=-1, Tensor? residual=None, bool gelu=False, "
        "Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=1e-12) -> Tensor");
  m.def("cpu_linear_out(Tensor x, Tensor quad_w, Tensor quad_k, Tensor row_ptr, Tensor rowsum, "
        "Tensor layout, Tensor w_scale, Tensor? bias, float static_scale, float inv_scale, int zero_point, "
        "int qmin, int qmax, Tensor(a!) out, int isa=-1, Tensor? residual=None, bool gelu=False, "
        "Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=1e-12) -> ()");
}

TORCH_LIBRARY_IMPL(sparse_ofa, CPU, m) {
  m.impl("cpu_quantize", &sparse_ofa_cpu::cpu_quantize);
  m.impl("cpu_int_mm", &sparse_ofa_cpu::cpu_int_mm);
  m.impl("cpu_int_mm_out", &sparse_ofa_cpu::cpu_int_mm_out);
  m.impl("cpu_linear", &sparse_ofa_cpu::cpu_linear);
  m.impl("cpu_linear_out", &sparse_ofa_cpu::cpu_linear_out);
}
