// Helpers shared by the two CPU bindings (cpu_linear.cpp, cpu_attention.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace sparse_ofa_cpu {

// The ISA code the kernels run: `isa`, or the best this CPU runs when negative; raises for an ISA
// this CPU does not run (defined in cpu_linear.cpp).
int64_t resolve_isa(int64_t isa);

// Per-thread growing scratch (a fresh multi-100 KB malloc per call would be an mmap + page faults),
// 64-byte aligned: a zmm load that straddles two cache lines costs two.
inline uint8_t* scratch(std::vector<uint8_t>& buf, size_t bytes) {
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - p % 64) % 64);
}

}  // namespace sparse_ofa_cpu
