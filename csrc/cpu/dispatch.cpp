// Runtime ISA detection: the best kernel this CPU runs, from cpuid (via __builtin_cpu_supports).
// On a non-x86 build only the scalar path exists.
#include "sparse_cpu.h"

namespace sparse_ofa_cpu {

bool isa_supported(int isa) {
  switch (isa) {
    case kScalar:
      return true;
#if defined(__x86_64__) || defined(__i386__)
    case kAvx2:
      return __builtin_cpu_supports("avx2");
    case kAvxVnni:
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
#else
      return false;
#endif
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
#endif
    default:
      return false;
  }
}

bool fma_supported() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

int best_isa() {
  static const int best = [] {
    for (int isa = kAvx512Vnni; isa > kScalar; --isa)
      if (isa_supported(isa)) return isa;
    return (int)kScalar;
  }();
  return best;
}

const char* isa_name(int isa) {
  switch (isa) {
    case kScalar: return "scalar";
    case kAvx2: return "avx2";
    case kAvxVnni: return "avxvnni";
    case kAvx512Vnni: return "avx512vnni";
    default: return "unknown";
  }
}

}  // namespace sparse_ofa_cpu
