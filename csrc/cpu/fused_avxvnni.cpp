// spmm_cols_avxvnni: the fused ops' channel-major product (avx2_impl.h) with vpdpbusd on ymm
// (AVX-VNNI); its activations are packed and quantized by the AVX2 steps (fused_avx2.cpp, flip 0x80).
#include <cstdint>

#include "sparse_cpu.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,avxvnni,fma")
#define SPARSE_OFA_AVX2_MATH
#define SPARSE_OFA_VNNI 1
#define SPARSE_OFA_SPMM_COLS spmm_cols_avxvnni
#include "avx2_impl.h"
#pragma GCC pop_options
#elif defined(__x86_64__) || defined(__i386__)
namespace sparse_ofa_cpu {  // (never selected: isa_supported(kAvxVnni) is false with this compiler; the
                            // AVX2 product it links to reads the int16 layouts, not AVX-VNNI's bytes)
void spmm_cols_avxvnni(const QuadWeight& w, const PackedActs& a, const float* w_scale, const float* bias,
                       bool gelu, float* yt, int64_t ldy, float* amax, uint64_t* nonfinite) {
  spmm_cols_avx2(w, a, w_scale, bias, gelu, yt, ldy, amax, nonfinite);
}
}  // namespace sparse_ofa_cpu
#endif
