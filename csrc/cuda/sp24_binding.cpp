// torch.ops.sparse_ofa.cuda_sp24_int_mm / cuda_sp24_linear: checks, then the launcher in sp24_int8.cu.
// Registered as a FRAGMENT of the sparse_ofa namespace (the CPU extension registers its ops there
// too); fake implementations for torch.compile live in sparse_ofa/backends/cuda.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "check_format.h"  // numbers in messages: never streamed (see there why)
#include "sp24_int8.h"

namespace {

using sparse_ofa::fmt_dims;
using sparse_ofa::fmt_num;

void check_operands(const at::Tensor& x_q, const at::Tensor& values, const at::Tensor& meta,
                    int64_t n, int64_t meta_mode) {
  TORCH_CHECK(x_q.is_cuda() && values.is_cuda() && meta.is_cuda(),
              "sparse_ofa 2:4 kernel: all tensors must be on a CUDA device, got x_q on ",
              x_q.device(), ", values on ", values.device(), ", meta on ", meta.device());
  TORCH_CHECK(x_q.device() == values.device() && x_q.device() == meta.device(),
              "sparse_ofa 2:4 kernel: tensors are on different devices");
  TORCH_CHECK(x_q.scalar_type() == at::kChar && x_q.dim() == 2,
              "sparse_ofa 2:4 kernel: x_q must be 2-D int8, got ", x_q.scalar_type(), " ",
              fmt_dims(x_q));
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 2 && values.is_contiguous(),
              "sparse_ofa 2:4 kernel: values must be a contiguous 2-D int8 tensor");
  TORCH_CHECK(meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.is_contiguous(),
              "sparse_ofa 2:4 kernel: meta must be a contiguous 2-D int32 tensor");
  const int64_t k = x_q.size(1);
  TORCH_CHECK(k % sparse_ofa::kSp24TileK == 0, "sparse_ofa 2:4 kernel: in_features ", fmt_num(k),
              " must be a multiple of ", fmt_num(sparse_ofa::kSp24TileK));
  TORCH_CHECK(values.size(1) == k / 2 && meta.size(1) == k / 32 && meta.size(0) == values.size(0),
              "sparse_ofa 2:4 kernel: values ", fmt_dims(values), " / meta ", fmt_dims(meta),
              " do not match in_features ", fmt_num(k));
  TORCH_CHECK(values.size(0) % sparse_ofa::kSp24TileRows == 0 && n <= values.size(0) && n > 0,
              "sparse_ofa 2:4 kernel: values rows ", fmt_num(values.size(0)),
              " must be padded to a multiple of ", fmt_num(sparse_ofa::kSp24TileRows),
              " and hold out_features ", fmt_num(n));
  TORCH_CHECK(meta_mode == sparse_ofa::kMetaHalves || meta_mode == sparse_ofa::kMetaRows,
              "sparse_ofa 2:4 kernel: unknown meta_mode ", fmt_num(meta_mode));
  TORCH_CHECK(x_q.size(0) < (int64_t{1} << 31) && k < (int64_t{1} << 31),
              "sparse_ofa 2:4 kernel: problem too large for 32-bit indexing");
}

// cp.async copies 16 bytes at a time from x: rows must start on 16-byte boundaries.
at::Tensor aligned_rows(const at::Tensor& x_q) {
  const bool aligned = x_q.is_contiguous() && reinterpret_cast<uintptr_t>(x_q.data_ptr()) % 16 == 0;
  return aligned ? x_q : x_q.contiguous().clone();
}

at::Tensor run(const at::Tensor& x_q_in, const at::Tensor& values, const at::Tensor& meta, int64_t n,
               int64_t meta_mode, int out_kind, at::ScalarType out_dtype, const float* x_scale,
               const float* w_scale, const float* bias) {
  const c10::cuda::CUDAGuard guard(x_q_in.device());
  const at::Tensor x_q = aligned_rows(x_q_in);
  const int64_t m = x_q.size(0), k = x_q.size(1);
  at::Tensor out = at::empty({m, n}, x_q.options().dtype(out_dtype));
  const cudaError_t err = sparse_ofa::sp24_int8_launch(
      x_q.data_ptr<int8_t>(), values.data_ptr<int8_t>(),
      reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()), out.data_ptr(),
      static_cast<int>(m), static_cast<int>(n), static_cast<int>(values.size(0)),
      static_cast<int>(k), out_kind, x_scale, w_scale, bias, static_cast<int>(meta_mode),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sparse_ofa 2:4 kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor cuda_sp24_int_mm(const at::Tensor& x_q, const at::Tensor& values, const at::Tensor& meta,
                            int64_t n, int64_t meta_mode) {
  check_operands(x_q, values, meta, n, meta_mode);
  return run(x_q, values, meta, n, meta_mode, sparse_ofa::kSp24Int32, at::kInt, nullptr, nullptr,
             nullptr);
}

at::Tensor cuda_sp24_linear(const at::Tensor& x_q, const at::Tensor& values, const at::Tensor& meta,
                            const at::Tensor& x_scale, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t n, int64_t meta_mode,
                            at::ScalarType out_dtype) {
  check_operands(x_q, values, meta, n, meta_mode);
  auto check_vec = [&](const at::Tensor& t, int64_t len, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.device() == x_q.device() && t.scalar_type() == at::kFloat &&
                    t.dim() == 1 && t.size(0) == len && t.is_contiguous(),
                "sparse_ofa 2:4 kernel: ", name, " must be a contiguous float32 [", fmt_num(len),
                "] tensor on ", x_q.device(), ", got ", t.scalar_type(), " ", fmt_dims(t), " on ",
                t.device());
  };
  check_vec(x_scale, x_q.size(0), "x_scale");
  check_vec(w_scale, n, "w_scale");
  if (bias.has_value()) check_vec(*bias, n, "bias");
  int kind;
  switch (out_dtype) {
    case at::kFloat: kind = sparse_ofa::kSp24Float32; break;
    case at::kHalf: kind = sparse_ofa::kSp24Float16; break;
    case at::kBFloat16: kind = sparse_ofa::kSp24BFloat16; break;
    default: TORCH_CHECK(false, "sparse_ofa 2:4 kernel: out_dtype must be float32/float16/bfloat16, got ",
                         out_dtype);
  }
  return run(x_q, values, meta, n, meta_mode, kind, out_dtype, x_scale.data_ptr<float>(),
             w_scale.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_ofa, m) {
  m.def("cuda_sp24_int_mm(Tensor x_q, Tensor values, Tensor meta, int n, int meta_mode) -> Tensor");
  m.def(
      "cuda_sp24_linear(Tensor x_q, Tensor values, Tensor meta, Tensor x_scale, Tensor w_scale, "
      "Tensor? bias, int n, int meta_mode, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_ofa, CUDA, m) {
  m.impl("cuda_sp24_int_mm", &cuda_sp24_int_mm);
  m.impl("cuda_sp24_linear", &cuda_sp24_linear);
}
