// dwconv_layer_norm: depthwise KxK conv (+ bias) of x (B, C, H, W), then LayerNorm over channels,
// written as (B, H, W, C) tokens. Shared by the CPU kernel (g++) and the CUDA kernel (nvcc).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include "add_layer_norm.h"  // normalize(): the LayerNorm epilogue both ops share
#include "checks.h"

namespace fastdino {

constexpr int64_t kDwconvK = 7;  // the kernels take ConvNeXt's 7x7 depthwise conv

// The conv output as the unfused conv stores it: statistics are then taken over the rounded values.
template <typename T>
C10_HOST_DEVICE inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Argument checks shared by every backend of the C++ op; messages name the argument. x may have
// any strides (NCHW and channels-last both read in place); the parameters must be contiguous.
inline void check_dwconv_layer_norm_args(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& norm_weight,
                                         const at::Tensor& norm_bias) {
  TORCH_CHECK(x.dim() == 4, "dwconv_layer_norm: x must be (B, C, H, W), got shape ", shape_str(x));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dwconv_layer_norm: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t C = x.size(1);
  TORCH_CHECK(C > 0, "dwconv_layer_norm: x has no channels (shape ", shape_str(x), ")");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == kDwconvK &&
                  weight.size(3) == kDwconvK,
              "dwconv_layer_norm: weight must be (", num(C), ", 1, 7, 7) (the kernels take a 7x7 depthwise conv), got ",
              shape_str(weight));
  auto check = [&](const at::Tensor& t, const char* name, bool vector) {
    TORCH_CHECK(t.device() == x.device(), "dwconv_layer_norm: ", name, " is on ", device_str(t), " but x is on ",
                device_str(x));
    TORCH_CHECK(t.scalar_type() == dtype, "dwconv_layer_norm: ", name, " has dtype ", t.scalar_type(),
                " but x has dtype ", dtype);
    if (vector) {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "dwconv_layer_norm: ", name, " must have shape (", num(C),
                  ",), got ", shape_str(t));
    }
    TORCH_CHECK(t.is_contiguous(), "dwconv_layer_norm: ", name, " must be contiguous");
  };
  check(weight, "weight", false);
  if (bias.has_value()) check(*bias, "bias", true);
  check(norm_weight, "norm_weight", true);
  check(norm_bias, "norm_bias", true);
  // Offsets into x and z are int64; a pixel's row and column (with halo and tile arithmetic) are int.
  constexpr int64_t kMaxSide = int64_t(1) << 30;
  TORCH_CHECK(x.size(2) <= kMaxSide && x.size(3) <= kMaxSide, "dwconv_layer_norm: x has H=", num(x.size(2)),
              ", W=", num(x.size(3)), "; the kernels index rows and columns in 32 bits (limit 2**30 each)");
}

}  // namespace fastdino
