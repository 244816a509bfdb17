// AVX-VNNI path (Alder Lake and later client cores, Zen 5 also has it): the AVX2 product with
// vpdpbusd on ymm (avx2_impl.h, SPARSE_OFA_VNNI 1). Quantization shares the AVX2 quantizer.
#include <cstdint>

#include "sparse_cpu.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,avxvnni")
#define SPARSE_OFA_VNNI 1
#define SPARSE_OFA_SPMM spmm_avxvnni
#include "avx2_impl.h"
#pragma GCC pop_options
#else
namespace sparse_ofa_cpu {
void spmm_avxvnni(const QuadWeight& w, const PackedActs& a, const Epilogue& e, int64_t t0, int64_t t1) {
  spmm_scalar(w, a, e, t0, t1);
}
}  // namespace sparse_ofa_cpu
#endif
