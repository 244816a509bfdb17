// torch.ops.sparse_ofa.cpu_ffn: a transformer feed-forward block as ONE op,
//     out = LayerNorm(W2 act(W1 x + b1) + b2 + residual)       (act = GELU (erf) or none; each
//                                                               of residual / LayerNorm optional)
// with both linears sparse INT8 (prepared CPU layouts, per-token activation quantization before
// each), equal to cpu_linear(cpu_linear(x, gelu), residual, LayerNorm) bit for bit.
//
// Why one op: the intermediate (M x 3072 for BERT-base) is the largest activation of a layer. Apart,
// W1 writes it row-major through 16x16 transposes, and W2 reads it twice (max per token, then
// quantize) and packs it back through transposes. Here each thread takes 64-token tiles and keeps
// the tile's intermediate channel-major, as W1's accumulators produce it, in its own cache
// (cpu/ffn_avx512.cpp; the 256-bit paths: cpu/fused_avx2.cpp): no transposes either way, one parallel
// region. AVX-512, and AVX2 / AVX-VNNI with FMA; elsewhere, or with too few tokens for one tile per
// thread, it runs the two cpu_linear calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "check_format.h"
#include "cpu/binding_util.h"
#include "cpu/linear_binding.h"
#include "cpu/sparse_cpu.h"

namespace sparse_ofa_cpu {

namespace {

using sparse_ofa::fmt_dims;
using sparse_ofa::fmt_num;

struct FfnArgs {
  QuadWeight w1, w2;
  const float *w1_scale, *b1, *w2_scale, *b2;
  QuantParams q1, q2;
  bool gelu;
  PostOps post;
};

// Tokens [s, s + mt) (mt <= kTileTokens) of x [*, ldx] -> out [*, ldo], one thread, ISA `is`
// (has_cols_route(is)).
void ffn_tile(int is, const FfnArgs& f, const float* x, int64_t ldx, float* out, int64_t ldo, int64_t s, int64_t mt) {
  thread_local std::vector<uint8_t> xt1_buf, yt_buf, xt2_buf;
  uint8_t* xt1 = scratch(xt1_buf, one_tile(is, f.w1).bytes);
  float* yt = (float*)scratch(yt_buf, (size_t)(f.w1.n * kTileTokens * sizeof(float)));
  const Tiles tile2 = one_tile(is, f.w2);
  uint8_t* xt2 = scratch(xt2_buf, tile2.bytes);
  alignas(64) float xs1[kTileTokens], xs2[kTileTokens], amax[kTileTokens];
  const uint8_t flip = flip_of(is);
  pack_tile(is, f.w1, x, ldx, s, mt, f.q1, xt1, xs1);
  uint64_t nonfinite = 0;
  spmm_cols(is, f.w1, PackedActs{xt1, mt, kTileTokens, (f.w1.k + 3) / 4, flip, xs1}, f.w1_scale, f.b1, f.gelu, yt,
            kTileTokens, amax, &nonfinite);
  quant_pack_cols(is, yt, f.w1.n, mt, amax, nonfinite, f.q2, tile2.layout, xt2, xs2);
  const Epilogue e{kOutFloat, f.w2_scale, f.b2, out + s * ldo, ldo, false};
  spmm_tasks(is, f.w2, PackedActs{xt2, mt, kTileTokens, (f.w2.k + 3) / 4, flip, xs2}, e, 0, task_count(mt, f.w2.n));
  if (f.post.any()) post_rows_raw(is, f.post, out, ldo, f.w2.n, s, s + mt);
}

at::Tensor cpu_ffn(const at::Tensor& x, const std::vector<at::Tensor>& w1, const at::Tensor& w1_scale,
                   const c10::optional<at::Tensor>& b1, double static_scale1, double inv_scale1, int64_t zero_point1,
                   int64_t qmin1, int64_t qmax1, const std::vector<at::Tensor>& w2, const at::Tensor& w2_scale,
                   const c10::optional<at::Tensor>& b2, double static_scale2, double inv_scale2, int64_t zero_point2,
                   int64_t qmin2, int64_t qmax2, bool gelu, const c10::optional<at::Tensor>& residual,
                   const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias, double ln_eps,
                   int64_t isa) {
  const int is = (int)resolve_isa(isa);
  const QuadWeight wa = layout_of(w1, "cpu_ffn", "w1"), wb = layout_of(w2, "cpu_ffn", "w2");
  TORCH_CHECK(wa.n == wb.k, "sparse_ofa cpu_ffn: w1 has ", fmt_num(wa.n), " outputs but w2 takes ", fmt_num(wb.k),
              " inputs");
  TORCH_CHECK(x.dim() >= 1, "sparse_ofa cpu_ffn: x must be [..., K], got a 0-d tensor");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = wb.n;
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < shape.size(); ++d) rows *= shape[d];
  const at::Tensor xf = float_input(x.reshape({rows, x.size(-1)}), wa.k);
  c10::optional<at::Tensor> res2;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "sparse_ofa cpu_ffn: residual must have the output's "
                "shape (x's leading dimensions, then ", fmt_num(wb.n), "), got ", fmt_dims(*residual), " for x ",
                fmt_dims(x));
    res2 = residual->reshape({rows, wb.n});
  }
  at::Tensor out = at::empty(shape, xf.options().dtype(at::kFloat));
  at::Tensor out2 = out.view({rows, wb.n});
  check_vec(w1_scale, "w1_scale", at::kFloat, wa.n);  // named as this op's arguments on either path
  check_vec(w2_scale, "w2_scale", at::kFloat, wb.n);
  const float* b1p = bias_of(b1, "b1", wa.n);
  const float* b2p = bias_of(b2, "b2", wb.n);
  // (the 256-bit paths: from 32 tokens on; below, the 64-token tile of the 3072-wide intermediate
  // no longer fits the L1 that the row-major route's 16-token one does, and the op lost 7-12 % at 4-12
  // tokens: bench/NOTES.md)
  if (has_cols_route(is) && rows > 0 && tiles_for_every_thread(rows) && (is == kAvx512Vnni || rows >= 32)) {
    const FfnArgs f{wa, wb, w1_scale.data_ptr<float>(), b1p, w2_scale.data_ptr<float>(), b2p, quant_params(static_scale1, inv_scale1, zero_point1, qmin1, qmax1),
                    quant_params(static_scale2, inv_scale2, zero_point2, qmin2, qmax2), gelu,
                    post_ops(res2, false, ln_weight, ln_bias, ln_eps, out2, rows, wb.n)};
    const float* xp = xf.data_ptr<float>();
    float* op = out2.data_ptr<float>();
    const int64_t ldx = xf.stride(0), ldo = out2.stride(0);
    for_each_tile(rows, [&](int64_t s, int64_t mt) { ffn_tile(is, f, xp, ldx, op, ldo, s, mt); });
    return out;
  }
  at::Tensor mid = at::empty({rows, wa.n}, xf.options());
  cpu_linear_out(xf, w1[0], w1[1], w1[2], w1[3], w1[4], w1_scale, b1, static_scale1, inv_scale1, zero_point1, qmin1,
                 qmax1, mid, is, c10::nullopt, gelu, c10::nullopt, c10::nullopt, 1e-12);
  cpu_linear_out(mid, w2[0], w2[1], w2[2], w2[3], w2[4], w2_scale, b2, static_scale2, inv_scale2, zero_point2, qmin2,
                 qmax2, out2, is, res2, false, ln_weight, ln_bias, ln_eps);
  return out;
}

}  // namespace
}  // namespace sparse_ofa_cpu

TORCH_LIBRARY_FRAGMENT(sparse_ofa, m) {
  m.def("cpu_ffn(Tensor x, Tensor[] w1, Tensor w1_scale, Tensor? b1, float static_scale1, float inv_scale1, "
        "int zero_point1, int qmin1, int qmax1, Tensor[] w2, Tensor w2_scale, Tensor? b2, float static_scale2, "
        "float inv_scale2, int zero_point2, int qmin2, int qmax2, bool gelu=True, Tensor? residual=None, "
        "Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=1e-12, int isa=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_ofa, CPU, m) { m.impl("cpu_ffn", &sparse_ofa_cpu::cpu_ffn); }
