// torch.ops.sparse_ofa.cpu_dense_linear: the dense INT8 fallback of backend="auto" on the CPU as ONE op,
//     out = post(dequant(x_q @ W_q^T)),   x_q = quantize(x)        (numerics: sparse_ofa/quant.py)
// for the layers where the sparse kernels would be slower (low sparsity, some token counts).
//
// Why one op: as torch ops the epilogue alone was four passes over the M x N output (int32 -> float,
// * x_scale, * w_scale, + bias), each reading and writing a fresh tensor, and the post-ops three more;
// at 12k tokens that made dense layers ~2x slower than torch's quantize_dynamic Linear
// (bench/NOTES.md, "Dense INT8 fallback"). Here: the C++ per-token quantizer, torch's own _int_mm
// (oneDNN) for the product, then ONE pass per row: the dequantizing epilogue written over the int32
// accumulators in place (4-byte int -> 4-byte float: no second M x N buffer) and the optional
// post-ops (+ residual, GELU, LayerNorm) while the row is in cache, as cpu_linear does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "check_format.h"
#include "cpu/binding_util.h"
#include "cpu/dense_gemm.h"
#include "cpu/linear_binding.h"
#include "cpu/sparse_cpu.h"

namespace sparse_ofa_cpu {

namespace {

using sparse_ofa::fmt_dims;
using sparse_ofa::fmt_num;

at::Tensor cpu_dense_linear(const at::Tensor& x, const at::Tensor& w_t, const at::Tensor& w_scale,
                            const c10::optional<at::Tensor>& bias, double static_scale, double inv_scale,
                            int64_t zero_point, int64_t qmin, int64_t qmax, at::ScalarType out_dtype, int64_t isa,
                            const c10::optional<at::Tensor>& residual, bool gelu,
                            const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                            double ln_eps) {
  const int is = (int)resolve_isa(isa);
  TORCH_CHECK(w_t.device().is_cpu(), "sparse_ofa cpu_dense_linear: w_t must be on the CPU, got ", w_t.device());
  TORCH_CHECK(w_t.scalar_type() == at::kChar && w_t.dim() == 2,
              "sparse_ofa cpu_dense_linear: w_t must be int8 [K, N], got ", w_t.scalar_type(), " ", fmt_dims(w_t));
  TORCH_CHECK(x.dim() >= 1, "sparse_ofa cpu_dense_linear: x must be [..., K], got a 0-d tensor");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "sparse_ofa cpu_dense_linear: out_dtype must be float32/bfloat16/float16, got ", out_dtype);
  const bool any_post = (residual.has_value() && residual->defined()) || gelu ||
                        (ln_weight.has_value() && ln_weight->defined());
  TORCH_CHECK(!any_post || out_dtype == at::kFloat,
              "sparse_ofa cpu_dense_linear: residual / gelu / LayerNorm post-ops need out_dtype float32, got ", out_dtype);
  const int64_t k = w_t.size(0), n = w_t.size(1);
  quant_params(static_scale, inv_scale, zero_point, qmin, qmax);  // validates before any work
  check_vec(w_scale, "w_scale", at::kFloat, n);
  const float* bp = bias_of(bias, "bias", n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  const at::Tensor xf = float_input(x.reshape({-1, x.size(-1)}), k);
  const int64_t m = xf.size(0);
  c10::optional<at::Tensor> residual2;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "sparse_ofa cpu_dense_linear: residual must have the "
                "output's shape (x's leading dimensions, then ", fmt_num(n), "), got ", fmt_dims(*residual),
                " for x ", fmt_dims(x));
    residual2 = residual->reshape({m, n});
  }

  // quantize (per token or static) into int8 rows: the cpu_quantize op's own body
  const auto [xq, xs] = cpu_quantize(xf, static_scale, inv_scale, zero_point, qmin, qmax, is);
  const float* sptr = xs.data_ptr<float>();

  // exact int32 product, then the epilogue over the accumulators in place
  // (torch 2.13's CPU _int_mm returns garbage for K = 1 and N >= 2: that product is an outer product)
  at::Tensor acc = !(m && n) ? at::zeros({m, n}, xf.options().dtype(at::kInt))
                   : k == 1  ? xq.to(at::kInt).mul(w_t.to(at::kInt)).contiguous()
                             : at::_int_mm(xq, w_t);
  TORCH_CHECK(acc.is_contiguous(), "sparse_ofa cpu_dense_linear: _int_mm returned a strided result");
  at::Tensor out = acc.view(at::kFloat);
  const PostOps po = post_ops(residual2, gelu, ln_weight, ln_bias, ln_eps, out, m, n);
  const int32_t* ap = acc.data_ptr<int32_t>();
  float* yp = out.data_ptr<float>();
  const float* wsp = w_scale.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t m0, int64_t m1) {
    if (is == kAvx512Vnni) dequant_rows_avx512(ap, n, sptr, wsp, bp, yp, n, n, m0, m1);
    else dequant_rows_scalar(ap, n, sptr, wsp, bp, yp, n, n, m0, m1);
    if (po.any()) post_rows(is, po, out, n, m0, m1);
  });
  out = out.view(shape);
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

// ---- the panel route: the exact int16-pair GEMM of cpu/dense_gemm.h, for CPUs without VNNI ------
// (sparse_ofa/backends/dense.py picks it where it measures faster than _int_mm). Same numerics and
// post-ops as cpu_dense_linear; the weight comes as the int16 panel and its layout [1, N, K].
constexpr int32_t kPanelVersion = 1;

DensePanel panel_of(const at::Tensor& w_panel, const at::Tensor& w_layout) {
  TORCH_CHECK(w_layout.device().is_cpu() && w_layout.scalar_type() == at::kInt && w_layout.dim() == 1 &&
                  w_layout.numel() == 3,
              "sparse_ofa cpu_dense_panel: w_layout must be an int32 CPU tensor [version, N, K], got ",
              w_layout.scalar_type(), " ", fmt_dims(w_layout));
  const at::Tensor layout = w_layout.contiguous();  // (kept alive while l is read)
  const int32_t* l = layout.data_ptr<int32_t>();
  TORCH_CHECK(l[0] == kPanelVersion, "sparse_ofa cpu_dense_panel: weight panel version ", fmt_num(l[0]),
              ", this build reads version ", fmt_num(kPanelVersion), ": prepare() the module again");
  const int64_t n = l[1], k = l[2];
  TORCH_CHECK(n >= 0 && k >= 1, "sparse_ofa cpu_dense_panel: bad panel layout N = ", fmt_num(n), ", K = ", fmt_num(k));
  const int64_t strips = (n + kDenseCols - 1) / kDenseCols, kp = (k + 1) / 2;
  TORCH_CHECK(w_panel.device().is_cpu() && w_panel.scalar_type() == at::kShort && w_panel.is_contiguous() &&
                  w_panel.dim() == 4 && w_panel.size(0) == strips && w_panel.size(1) == kp &&
                  w_panel.size(2) == kDenseCols && w_panel.size(3) == 2,
              "sparse_ofa cpu_dense_panel: w_panel must be a contiguous int16 CPU tensor [", fmt_num(strips), ", ",
              fmt_num(kp), ", 16, 2] for N = ", fmt_num(n), ", K = ", fmt_num(k), ", got ", w_panel.scalar_type(), " ",
              fmt_dims(w_panel));
  return {w_panel.data_ptr<int16_t>(), n, k, kp, strips};
}

// The product of m tokens into o: rows quantized (when xf is given; else the int8 rows xq8 are
// read) and widened to int16, the panel GEMM with its epilogue, then post(m0, m1) on finished rows.
// Work split:
// - token split, when every thread gets >= 8 micro-tiles (48 tokens): each thread quantizes, widens,
//   multiplies and post-processes its own run of rows in ONE parallel region, with no barrier between
//   the steps (on a shared machine each barrier costs a scheduler time slice whenever one thread is
//   descheduled: 16 ms steps were seen at 2 threads with other jobs running);
// - else (few tokens, many threads) the rows are prepared first, then the mblock x nblock tasks of
//   dense_blocking split the output channels too, then the post-ops: three regions.
template <class Post>
void panel_product(int is, const DensePanel& w, const at::Tensor* xf, const QuantParams* qp, const int8_t* xq8,
                   int64_t ldx8, int64_t m, float* x_scale, const DenseOut& o, const Post& post) {
  const int64_t lda = 2 * w.kp;
  thread_local std::vector<uint8_t> buf;
  uint8_t* base = scratch(buf, (size_t)(m * lda * 2 + (xf ? m * w.k : 0) + 64));
  int16_t* a = reinterpret_cast<int16_t*>(base);
  int8_t* q = reinterpret_cast<int8_t*>(base + m * lda * 2);
  const bool vec = is >= kAvx2;
  auto prepare_rows = [&](int64_t m0, int64_t m1) {
    const int8_t* src = xq8;
    int64_t ld = ldx8;
    if (xf) {
      quantize_rows(is, xf->data_ptr<float>(), xf->stride(0), w.k, m0, m1, *qp, q, w.k, x_scale);
      src = q, ld = w.k;
    }
    if (vec) dense_widen_avx2(src, ld, w.k, m0, m1, a, lda);
    else dense_widen_scalar(src, ld, w.k, m0, m1, a, lda);
  };
  auto gemm = [&](const int16_t* ar, int64_t rows, const DenseBlocking& b, const DenseOut& out, int64_t t0,
                  int64_t t1) {
    if (vec) dense_gemm_avx2(w, ar, lda, rows, b, out, t0, t1);
    else dense_gemm_scalar(w, ar, lda, rows, b, out, t0, t1);
  };
  const int64_t threads = at::get_num_threads();
  const int64_t mtiles = (m + kDenseRows - 1) / kDenseRows;
  if (threads == 1 || mtiles >= 8 * threads) {
    const int64_t chunk = (mtiles + threads - 1) / threads * kDenseRows;
    at::parallel_for(0, (m + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * chunk, r1 = std::min(m, r0 + chunk);
        prepare_rows(r0, r1);
        DenseOut oc = o;
        if (oc.x_scale) {
          oc.x_scale += r0;
          oc.out = static_cast<float*>(oc.out) + r0 * o.ldo;
        } else {
          oc.out = static_cast<int32_t*>(oc.out) + r0 * o.ldo;
        }
        const DenseBlocking b = dense_blocking(r1 - r0, w.strips, w.kp, 1);
        gemm(a + r0 * lda, r1 - r0, b, oc, 0, b.tasks());
        post(r0, r1);
      }
    });
    return;
  }
  at::parallel_for(0, m, 16, prepare_rows);
  const DenseBlocking b = dense_blocking(m, w.strips, w.kp, threads);
  at::parallel_for(0, b.tasks(), 1, [&](int64_t t0, int64_t t1) { gemm(a, m, b, o, t0, t1); });
  at::parallel_for(0, m, 16, post);
}

at::Tensor cpu_dense_panel_linear(const at::Tensor& x, const at::Tensor& w_panel, const at::Tensor& w_layout,
                                  const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                                  double static_scale, double inv_scale, int64_t zero_point, int64_t qmin,
                                  int64_t qmax, at::ScalarType out_dtype, int64_t isa,
                                  const c10::optional<at::Tensor>& residual, bool gelu,
                                  const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                                  double ln_eps) {
  const int is = (int)resolve_isa(isa);
  const DensePanel w = panel_of(w_panel, w_layout);
  TORCH_CHECK(x.dim() >= 1, "sparse_ofa cpu_dense_panel_linear: x must be [..., K], got a 0-d tensor");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "sparse_ofa cpu_dense_panel_linear: out_dtype must be float32/bfloat16/float16, got ", out_dtype);
  const bool any_post = (residual.has_value() && residual->defined()) || gelu ||
                        (ln_weight.has_value() && ln_weight->defined());
  TORCH_CHECK(!any_post || out_dtype == at::kFloat, "sparse_ofa cpu_dense_panel_linear: residual / gelu / "
              "LayerNorm post-ops need out_dtype float32, got ", out_dtype);
  const int64_t n = w.n;
  const QuantParams qp = quant_params(static_scale, inv_scale, zero_point, qmin, qmax);
  check_vec(w_scale, "w_scale", at::kFloat, n);
  const float* bp = bias_of(bias, "bias", n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  const at::Tensor xf = float_input(x.reshape({-1, x.size(-1)}), w.k);
  const int64_t m = xf.size(0);
  c10::optional<at::Tensor> residual2;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "sparse_ofa cpu_dense_panel_linear: residual must "
                "have the output's shape (x's leading dimensions, then ", fmt_num(n), "), got ",
                fmt_dims(*residual), " for x ", fmt_dims(x));
    residual2 = residual->reshape({m, n});
  }
  at::Tensor out = at::empty({m, n}, xf.options());
  at::Tensor xs = at::empty({m}, xf.options());
  if (m && n) {
    const PostOps po = post_ops(residual2, gelu, ln_weight, ln_bias, ln_eps, out, m, n);
    panel_product(is, w, &xf, &qp, nullptr, 0, m, xs.data_ptr<float>(),
                  DenseOut{xs.data_ptr<float>(), w_scale.data_ptr<float>(), bp, out.data_ptr<float>(), n},
                  [&](int64_t m0, int64_t m1) {
                    if (po.any()) post_rows(is, po, out, n, m0, m1);
                  });
  }
  out = out.view(shape);
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

// Exact int32 [M, N] = x_q [M, K] int8 @ W_q^T through the panel (the backend's int_mm).
at::Tensor cpu_dense_panel_int_mm(const at::Tensor& x_q, const at::Tensor& w_panel, const at::Tensor& w_layout,
                                  int64_t isa) {
  const int is = (int)resolve_isa(isa);
  const DensePanel w = panel_of(w_panel, w_layout);
  TORCH_CHECK(x_q.scalar_type() == at::kChar && x_q.dim() == 2,
              "sparse_ofa cpu_dense_panel_int_mm: x_q must be int8 [M, K], got ", x_q.scalar_type(), " ",
              fmt_dims(x_q));
  TORCH_CHECK(x_q.size(1) == w.k, "sparse_ofa cpu_dense_panel_int_mm: x_q has ", fmt_num(x_q.size(1)),
              " input features, the weight has ", fmt_num(w.k));
  const at::Tensor xq = x_q.stride(1) == 1 ? x_q : x_q.contiguous();
  const int64_t m = xq.size(0);
  at::Tensor out = at::empty({m, w.n}, xq.options().dtype(at::kInt));
  if (m && w.n)
    panel_product(is, w, nullptr, nullptr, xq.data_ptr<int8_t>(), xq.stride(0), m, nullptr,
                  DenseOut{nullptr, nullptr, nullptr, out.data_ptr<int32_t>(), w.n}, [](int64_t, int64_t) {});
  return out;
}

}  // namespace

}  // namespace sparse_ofa_cpu

TORCH_LIBRARY_FRAGMENT(sparse_ofa, m) {
  m.def("cpu_dense_linear(Tensor x, Tensor w_t, Tensor w_scale, Tensor? bias, float static_scale, float inv_scale, "
        "int zero_point, int qmin, int qmax, ScalarType out_dtype, int isa=-1, Tensor? residual=None, "
        "bool gelu=False, Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=1e-12) -> Tensor");
  m.def("cpu_dense_panel_linear(Tensor x, Tensor w_panel, Tensor w_layout, Tensor w_scale, Tensor? bias, "
        "float static_scale, float inv_scale, int zero_point, int qmin, int qmax, ScalarType out_dtype, int isa=-1, "
        "Tensor? residual=None, bool gelu=False, Tensor? ln_weight=None, Tensor? ln_bias=None, float ln_eps=1e-12) "
        "-> Tensor");
  m.def("cpu_dense_panel_int_mm(Tensor x_q, Tensor w_panel, Tensor w_layout, int isa=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_ofa, CPU, m) {
  m.impl("cpu_dense_linear", &sparse_ofa_cpu::cpu_dense_linear);
  m.impl("cpu_dense_panel_linear", &sparse_ofa_cpu::cpu_dense_panel_linear);
  m.impl("cpu_dense_panel_int_mm", &sparse_ofa_cpu::cpu_dense_panel_int_mm);
}
