// Numbers and shapes for TORCH_CHECK messages, formatted without streaming them.
//
// Why: on the H200 image (CXX=/opt/gcc/bin/g++) torch's JIT build links libstdc++ statically into
// the extension, and streaming an integer into TORCH_CHECK's message (std::ostream::_M_insert<long>
// in that private copy) segfaulted instead of raising; strings and const char* stream fine.
// std::to_string / snprintf never touch the stream locale. bench/NOTES.md "GPU kernels" has the trace.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace sparse_ofa {

inline std::string fmt_num(int64_t v) { return std::to_string(v); }

inline std::string fmt_float(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

inline std::string fmt_dims(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

}  // namespace sparse_ofa
