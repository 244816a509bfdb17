// The pieces of the fused-linear binding (cpu_linear.cpp) that the fused FFN binding
// (cpu_ffn.cpp) reuses: argument checks, the activation tiles, quantize + pack, post-ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "sparse_cpu.h"

namespace sparse_ofa_cpu {

// Token tiles of the activation layout. The AVX-512 path packs 64-token tiles one after another
// (tile t holds tokens [64t, 64t + 64) with mp = 64, contiguous): a tile is 48 KB at K = 768, every
// L1 set in use, and the product runs all output rows of a thread against one tile. (A 64-token
// slice of a 128-token layout touched 256 B of every 512 B: only half the L1 sets.) The other paths,
// and M <= 64, keep one tile of all tokens (mp = M padded).
struct Tiles {
  int64_t tok;    // tokens per tile
  int64_t mp;     // padded tokens of a tile (the kernels' mp)
  int64_t bytes;  // bytes per tile
  int64_t count;  // tiles
  int layout;     // ActLayout of the packed activations
};

Tiles tiles_of(int isa, const QuadWeight& w, int64_t m);

// Checked views of the op arguments (messages name the argument and what it should be).
QuadWeight weight_of(const at::Tensor& quad_w, const at::Tensor& quad_k, const at::Tensor& row_ptr,
                     const at::Tensor& rowsum, const at::Tensor& layout);
QuantParams quant_params(double static_scale, double inv_scale, int64_t zero_point, int64_t qmin, int64_t qmax);
at::Tensor float_input(const at::Tensor& x, int64_t k);  // float32 [M, K] with contiguous rows
void check_vec(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel);
void check_out(const at::Tensor& out, int64_t m, int64_t n);
// the 5 layout tensors (quad_w, quad_k, row_ptr, rowsum, layout) of a Tensor[] argument; `op` and
// `name` name the op and the argument in messages
QuadWeight layout_of(const std::vector<at::Tensor>& w, const char* op, const char* name);
const float* bias_of(const c10::optional<at::Tensor>& bias, const char* name, int64_t n);  // null if none
PostOps post_ops(const c10::optional<at::Tensor>& residual, bool gelu, const c10::optional<at::Tensor>& ln_weight,
                 const c10::optional<at::Tensor>& ln_bias, double ln_eps, const at::Tensor& out, int64_t m, int64_t n);

uint8_t flip_of(int isa);  // 0x80 where the kernels multiply u8 x s8
void quantize_rows(int isa, const float* x, int64_t ldx, int64_t k, int64_t m0, int64_t m1,
                   const QuantParams& qp, int8_t* xq, int64_t ldq, float* x_scale);
// 16-token block b of int8 rows xb (stride ldx; m tokens in all) into the tiles of xt
void pack_block(int isa, const QuadWeight& w, const Tiles& t, const int8_t* xb, int64_t ldx, int64_t m, int64_t b,
                uint8_t flip, uint8_t* xt);
void post_rows(int isa, const PostOps& po, at::Tensor& out, int64_t n, int64_t m0, int64_t m1);

// One tile of kTileTokens tokens in ISA `isa`'s activation layout for w (mp = kTileTokens), and
// tokens [s, s + mt) (mt <= kTileTokens) of float rows x [*, ldx] quantized per token into it
// (x_scale [mt]) by ISA `isa` (the fused ops: cpu_ffn.cpp, cpu_attention.cpp).
Tiles one_tile(int isa, const QuadWeight& w);
void pack_tile(int isa, const QuadWeight& w, const float* x, int64_t ldx, int64_t s, int64_t mt, const QuantParams& q,
               uint8_t* xt, float* x_scale);

// The fused ops' channel-major steps (sparse_cpu.h: spmm_cols_*, quant_pack_cols_*) by ISA. They exist
// for AVX-512 and for the 256-bit paths on a CPU with FMA (their epilogue's GELU); elsewhere the fused
// ops run the op sequences they replace.
bool has_cols_route(int isa);
void spmm_cols(int isa, const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias, bool gelu,
               float* yt, int64_t ldy, float* amax, uint64_t* nonfinite);
void quant_pack_cols(int isa, const float* yt, int64_t k, int64_t m, const float* amax, uint64_t nonfinite,
                     const QuantParams& qp, int layout, uint8_t* xt, float* x_scale);
// the product + epilogue for tasks [t0, t1) of the ISA's kernel
void spmm_tasks(int isa, const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1);
// the post-ops of rows [m0, m1) of y [*, ldy] by the ISA (as cpu_linear runs them)
void post_rows_raw(int isa, const PostOps& po, float* y, int64_t ldy, int64_t n, int64_t m0, int64_t m1);

// torch.ops.sparse_ofa.cpu_quantize: x [M, K] float -> (x_q int8 [M, K], x_scale float32 [M])
std::tuple<at::Tensor, at::Tensor> cpu_quantize(const at::Tensor& x, double static_scale, double inv_scale,
                                                int64_t zero_point, int64_t qmin, int64_t qmax, int64_t isa);

void cpu_linear_out(const at::Tensor& x, const at::Tensor& quad_w, const at::Tensor& quad_k,
                    const at::Tensor& row_ptr, const at::Tensor& rowsum, const at::Tensor& layout,
                    const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, double static_scale,
                    double inv_scale, int64_t zero_point, int64_t qmin, int64_t qmax, at::Tensor& out,
                    int64_t isa, const c10::optional<at::Tensor>& residual, bool gelu,
                    const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                    double ln_eps);

// The token split of the AVX-512 paths: each of `threads` threads its own run of whole
// kTileTokens tiles, `token_chunk` tokens long (the split pays when m >= kTileTokens * threads).
inline int64_t token_chunk(int64_t m, int64_t threads) {
  return ((m + threads - 1) / threads + kTileTokens - 1) / kTileTokens * kTileTokens;
}

// Whether the fused ops' token split keeps every thread busy with m tokens (else they run their op
// sequences, whose products split the output channels between threads instead).
inline bool tiles_for_every_thread(int64_t m) {
  const int64_t threads = at::get_num_threads();
  return threads == 1 || m >= kTileTokens * threads;
}

// tile(s, mt) for every kTileTokens tile [s, s + mt) of m tokens, split by token_chunk (the fused
// ops: their tile buffers are thread-local, so a thread keeps its tiles in its own cache)
template <class Tile>
void for_each_tile(int64_t m, const Tile& tile) {
  const int64_t chunk = token_chunk(m, at::get_num_threads());
  at::parallel_for(0, (m + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t s = c0 * chunk; s < std::min(m, c1 * chunk); s += kTileTokens)
      tile(s, std::min<int64_t>(kTileTokens, m - s));
  });
}

}  // namespace sparse_ofa_cpu
