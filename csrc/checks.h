// Helpers for argument checks shared by every C++ op.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fastdino {

// Error messages are built from strings only: with some toolchains (seen: g++ 13.3 against
// torch 2.11) streaming a number into TORCH_CHECK's ostringstream from the extension crashed
// (SIGSEGV in the locale's num_put), so numbers, shapes and devices are formatted here.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

// "(2, 3, 4)"; "(5,)" for one dim.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    s += (t.dim() == 1 ? "," : (i + 1 < t.dim() ? ", " : ""));
  }
  return s + ")";
}

}  // namespace fastdino
