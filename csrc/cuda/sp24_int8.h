// 2:4 sparse INT8 matmul on sparse tensor cores (mma.sp, sm_80+): the launcher the torch binding calls.
// Plain pointers and a stream only, so the kernel file compiles with nvcc without torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace sparse_ofa {

// Output of the launcher: the exact int32 product, or the fused dequantized float (see sp24_int8.cu).
enum Sp24Out : int { kSp24Int32 = 0, kSp24Float32 = 1, kSp24Float16 = 2, kSp24BFloat16 = 3 };

// Which threads' metadata register holds which rows/columns of the 16x32 A tile (see sp24_int8.cu).
enum Sp24MetaMode : int { kMetaHalves = 0, kMetaRows = 1 };

constexpr int kSp24TileRows = 128;  // weight rows per block; the prepared weight is padded to this
constexpr int kSp24TileK = 64;      // logical K per pipeline stage; K must be a multiple of it

// x [m, k] int8 (row-major, 16-byte aligned), values [n_padded, k/2] int8, meta [n_padded, k/32]
// uint32, out [m, n] (int32, float, half or bfloat16 by out_kind). x_scale [m], w_scale [n] and
// bias [n] (or null) are float32 and only read when out_kind != kSp24Int32.
cudaError_t sp24_int8_launch(const int8_t* x, const int8_t* values, const uint32_t* meta, void* out,
                             int m, int n, int n_padded, int k, int out_kind, const float* x_scale,
                             const float* w_scale, const float* bias, int meta_mode,
                             cudaStream_t stream);

}  // namespace sparse_ofa
