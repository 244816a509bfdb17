// torch.ops.sparse_ofa.cpu_attention[_out]: argument checks, mask broadcasting, per-thread scratch and
// threading (one task per (batch, head)) around the kernels of csrc/cpu/attention*.cpp; and
// torch.ops.sparse_ofa.cpu_qkv_attention, the fused QKV projection + attention as one op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "check_format.h"
#include "cpu/attention.h"
#include "cpu/binding_util.h"
#include "cpu/linear_binding.h"
#include "cpu/sparse_cpu.h"

namespace sparse_ofa_cpu {

namespace {

using sparse_ofa::fmt_dims;
using sparse_ofa::fmt_num;

// qkv [B, S, 3 * heads * dim] -> dim
int64_t head_dim(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "sparse_ofa cpu_attention: qkv must be on the CPU, got ", qkv.device());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat, "sparse_ofa cpu_attention: qkv must be float32, got ",
              qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 3, "sparse_ofa cpu_attention: qkv must be 3-D [batch, seq, 3 * hidden], got ",
              fmt_dims(qkv));
  TORCH_CHECK(heads >= 1, "sparse_ofa cpu_attention: heads must be >= 1, got ", fmt_num(heads));
  TORCH_CHECK(qkv.size(2) % (3 * heads) == 0, "sparse_ofa cpu_attention: the last dimension of qkv (",
              fmt_num(qkv.size(2)), ") is not 3 x heads x head_dim for heads = ", fmt_num(heads));
  return qkv.size(2) / (3 * heads);
}

// The mask broadcast to [B, heads, S, S] with contiguous keys; kind from its dtype.
at::Tensor broadcast_mask(const at::Tensor& mask, int64_t b, int64_t heads, int64_t s, int* kind) {
  TORCH_CHECK(mask.device().is_cpu(), "sparse_ofa cpu_attention: mask must be on the CPU, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat,
              "sparse_ofa cpu_attention: mask must be bool (true = attend) or float32 (added to the scores), got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() <= 4, "sparse_ofa cpu_attention: mask must have at most 4 dimensions, got ", fmt_dims(mask));
  const int64_t want[4] = {b, heads, s, s};
  for (int64_t d = 0; d < mask.dim(); ++d) {
    const int64_t size = mask.size(d), target = want[4 - mask.dim() + d];
    TORCH_CHECK(size == target || size == 1, "sparse_ofa cpu_attention: mask of shape ", fmt_dims(mask),
                " does not broadcast to [batch, heads, seq, seq] = [", fmt_num(b), ", ", fmt_num(heads), ", ",
                fmt_num(s), ", ", fmt_num(s), "]");
  }
  *kind = mask.scalar_type() == at::kBool ? kMaskBool : kMaskAdd;
  at::Tensor m = mask.expand({b, heads, s, s});
  return m.stride(3) == 1 ? m : m.contiguous();
}

// p's qkv layout (qkv, sb, st, sc) is set; the rest from the arguments, then one task per (batch, head).
void run_attention(AttnProblem& p, int64_t b, int64_t s, int64_t heads, int64_t dim, double scale,
                   const c10::optional<at::Tensor>& mask_in, at::Tensor& out, int is, bool bf16) {
  p.k_off = heads * dim, p.v_off = 2 * heads * dim;
  p.batch = b, p.seq = s, p.heads = heads, p.dim = dim, p.scale = (float)scale;
  at::Tensor mask;
  p.mask_kind = kMaskNone;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = broadcast_mask(*mask_in, b, heads, s, &p.mask_kind);
    p.mask = mask.data_ptr();
    p.mb = mask.stride(0), p.mh = mask.stride(1), p.mi = mask.stride(2);
  }
  p.out = out.data_ptr<float>(), p.ob = out.stride(0), p.ot = out.stride(1);
  static const bool fma = fma_supported();
  const int64_t scratch_floats = bf16 ? attention_bf16_scratch_words(p) : attention_scratch_floats(p);
  at::parallel_for(0, b * heads, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<uint8_t> buf;
    float* work = reinterpret_cast<float*>(scratch(buf, (size_t)scratch_floats * sizeof(float)));
    if (bf16) attention_avx512_bf16(p, t0, t1, work);
    else if (is == kAvx512Vnni) attention_avx512(p, t0, t1, work);
    else if (is >= kAvx2 && fma) attention_avx2(p, t0, t1, work);
    else attention_scalar(p, t0, t1, work);
  });
}

// bf16 products need the AVX-512 path on a CPU with AVX-512 BF16: an error otherwise, not a silent fp32 run
void check_bf16(bool bf16, int is, const char* op) {
  TORCH_CHECK(!bf16 || (is == kAvx512Vnni && bf16_attention_supported()), "sparse_ofa ", op,
              ": bf16=True needs the avx512vnni path on a CPU with AVX-512 BF16 (this one: ",
              bf16_attention_supported() ? "has it, but another ISA was asked for)" : "has no AVX-512 BF16)");
}

void attention_out(const at::Tensor& qkv_in, const c10::optional<at::Tensor>& mask_in, int64_t heads, double scale,
                   at::Tensor& out, int64_t isa, bool bf16) {
  const int is = (int)resolve_isa(isa);
  check_bf16(bf16, is, "cpu_attention");
  const int64_t dim = head_dim(qkv_in, heads);
  const int64_t b = qkv_in.size(0), s = qkv_in.size(1), hidden = heads * dim;
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat,
              "sparse_ofa cpu_attention: out must be a float32 CPU tensor");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == b && out.size(1) == s && out.size(2) == hidden,
              "sparse_ofa cpu_attention: out must have shape [", fmt_num(b), ", ", fmt_num(s), ", ", fmt_num(hidden),
              "], got ", fmt_dims(out));
  TORCH_CHECK(out.stride(2) == 1, "sparse_ofa cpu_attention: out's last dimension must be contiguous");
  if (b == 0 || s == 0 || dim == 0) return;
  AttnProblem p{};
  p.qkv = qkv.data_ptr<float>();
  p.sb = qkv.stride(0), p.st = qkv.stride(1), p.sc = 1;
  run_attention(p, b, s, heads, dim, scale, mask_in, out, is, bf16);
}

at::Tensor attention(const at::Tensor& qkv, const c10::optional<at::Tensor>& mask, int64_t heads, double scale,
                     int64_t isa, bool bf16) {
  const int64_t dim = head_dim(qkv, heads);
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1), heads * dim}, qkv.options());
  attention_out(qkv, mask, heads, scale, out, isa, bf16);
  return out;
}

// The fused QKV projection (sparse INT8, cpu_linear's numerics) and the attention as one op, equal bit
// for bit to cpu_attention(cpu_linear(x, ...)). With a 64-token tile per thread (AVX-512, or AVX2 /
// AVX-VNNI with FMA: has_cols_route), the
// projection is written channel-major, as its accumulators come (no 16x16 output transposes), and
// the attention reads K^T from it in place (it transposes K from a row-major qkv; here V instead).
at::Tensor qkv_attention(const at::Tensor& x, const std::vector<at::Tensor>& w, const at::Tensor& w_scale,
                         const c10::optional<at::Tensor>& bias, double static_scale, double inv_scale,
                         int64_t zero_point, int64_t qmin, int64_t qmax, const c10::optional<at::Tensor>& mask_in,
                         int64_t heads, double scale, int64_t isa, bool bf16) {
  const int is = (int)resolve_isa(isa);
  check_bf16(bf16, is, "cpu_qkv_attention");
  const QuadWeight wq = layout_of(w, "cpu_qkv_attention", "w");
  TORCH_CHECK(x.dim() == 3, "sparse_ofa cpu_qkv_attention: x must be 3-D [batch, seq, hidden], got ", fmt_dims(x));
  TORCH_CHECK(heads >= 1 && wq.n % (3 * heads) == 0, "sparse_ofa cpu_qkv_attention: the weight's ",
              fmt_num(wq.n), " outputs are not 3 x heads x head_dim for heads = ", fmt_num(heads));
  check_vec(w_scale, "w_scale", at::kFloat, wq.n);
  const float* bp = bias_of(bias, "bias", wq.n);
  const QuantParams qp = quant_params(static_scale, inv_scale, zero_point, qmin, qmax);
  const int64_t b = x.size(0), s = x.size(1), m = b * s, hidden = wq.n / 3;
  const at::Tensor xf = float_input(x.reshape({m, x.size(2)}), wq.k);
  if (!has_cols_route(is) || m == 0 || hidden == 0 || !tiles_for_every_thread(m)) {
    at::Tensor qkv = at::empty({b, s, wq.n}, xf.options());
    at::Tensor qkv2 = qkv.view({m, wq.n});
    cpu_linear_out(xf, w[0], w[1], w[2], w[3], w[4], w_scale, bias, static_scale, inv_scale, zero_point, qmin, qmax,
                   qkv2, is, c10::nullopt, false, c10::nullopt, c10::nullopt, 1e-12);
    return attention(qkv, mask_in, heads, scale, is, bf16);
  }
  // 1. the projection, channel-major qkv_t [3 hidden][ld]: each thread its own 64-token tiles. The
  // attention reads K^T rows ld floats apart: a multiple of 1 KB would put a head's 64 rows in a few L1
  // sets (they evict each other), so such a row stride gets 16 floats more.
  const int64_t mp = (m + kTileTokens - 1) / kTileTokens * kTileTokens;
  const int64_t ld = mp % 256 == 0 ? mp + 16 : mp;
  at::Tensor qkv_t = at::empty({wq.n, ld}, xf.options());
  float* yt = qkv_t.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  const int64_t ldx = xf.stride(0), nq = (wq.k + 3) / 4;
  const float* ws = w_scale.data_ptr<float>();
  for_each_tile(m, [&](int64_t s0, int64_t mt) {
    thread_local std::vector<uint8_t> xt_buf;
    uint8_t* xt = scratch(xt_buf, one_tile(is, wq).bytes);
    alignas(64) float xs[kTileTokens];
    pack_tile(is, wq, xp, ldx, s0, mt, qp, xt, xs);
    spmm_cols(is, wq, PackedActs{xt, mt, kTileTokens, nq, flip_of(is), xs}, ws, bp, false, yt + s0, ld, nullptr,
              nullptr);
  });
  // 2. the attention, reading q, k, v from it
  at::Tensor out = at::empty({b, s, hidden}, xf.options());
  AttnProblem p{};
  p.qkv = yt;
  p.sb = s, p.st = 1, p.sc = ld;  // token (b, i) is column b * s + i
  run_attention(p, b, s, heads, hidden / heads, scale, mask_in, out, is, bf16);
  return out;
}

}  // namespace
}  // namespace sparse_ofa_cpu

TORCH_LIBRARY_FRAGMENT(sparse_ofa, m) {
  m.def("cpu_attention(Tensor qkv, Tensor? mask, int heads, float scale, int isa=-1, bool bf16=False) -> Tensor");
  m.def("cpu_attention_out(Tensor qkv, Tensor? mask, int heads, float scale, Tensor(a!) out, int isa=-1, "
        "bool bf16=False) -> ()");
  m.def("cpu_qkv_attention(Tensor x, Tensor[] w, Tensor w_scale, Tensor? bias, float static_scale, float inv_scale, "
        "int zero_point, int qmin, int qmax, Tensor? mask, int heads, float scale, int isa=-1, bool bf16=False) -> Tensor");
  m.def("cpu_bf16_attention_supported() -> bool", [] { return sparse_ofa_cpu::bf16_attention_supported(); });
}

TORCH_LIBRARY_IMPL(sparse_ofa, CPU, m) {
  m.impl("cpu_attention", &sparse_ofa_cpu::attention);
  m.impl("cpu_attention_out", &sparse_ofa_cpu::attention_out);
  m.impl("cpu_qkv_attention", &sparse_ofa_cpu::qkv_attention);
}
