// Helpers for argument checks shared by every C++ op.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fastdino {

// "(2, 3, 4)": shapes are formatted here rather than by streaming IntArrayRef into TORCH_CHECK,
// which crashed (SIGSEGV) in an extension built by g++ 13.3 against torch 2.11.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    s += (t.dim() == 1 ? "," : (i + 1 < t.dim() ? ", " : ""));
  }
  return s + ")";
}

}  // namespace fastdino
