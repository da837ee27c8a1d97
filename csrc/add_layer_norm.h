// add_layer_norm: the DINOv3 block seam  y = x + gamma * branch ;  z = LayerNorm(y).
// Shared by the CPU kernel (g++) and the CUDA kernel (nvcc) so that CPU CI exercises the same math.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace fastdino {

// The residual add in fp32, then rounded to the storage type: LayerNorm then sees exactly the
// y that the unfused model stores, and statistics are taken over the rounded values.
template <typename T>
C10_HOST_DEVICE inline float add_scaled(float x, float branch, float gamma) {
  return static_cast<float>(static_cast<T>(x + gamma * branch));
}

C10_HOST_DEVICE inline float normalize(float y, float mean, float rstd, float weight, float bias) {
  return (y - mean) * rstd * weight + bias;
}

// Argument checks shared by every backend of the C++ op; messages name the argument.
inline void check_add_layer_norm_args(const at::Tensor& x, const at::Tensor& branch,
                                      const std::optional<at::Tensor>& gamma, const at::Tensor& weight,
                                      const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "add_layer_norm: x must have a non-empty last dim, got shape ",
              shape_str(x));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "add_layer_norm: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t C = x.size(-1);
  auto check = [&](const at::Tensor& t, const char* name, bool full_shape) {
    TORCH_CHECK(t.device() == x.device(), "add_layer_norm: ", name, " is on ", device_str(t), " but x is on ",
                device_str(x));
    TORCH_CHECK(t.scalar_type() == dtype, "add_layer_norm: ", name, " has dtype ", t.scalar_type(),
                " but x has dtype ", dtype);
    if (full_shape) {
      TORCH_CHECK(t.sizes() == x.sizes(), "add_layer_norm: ", name, " has shape ", shape_str(t),
                  " but x has shape ", shape_str(x));
    } else {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "add_layer_norm: ", name, " must have shape (", num(C),
                  ",), got ", shape_str(t));
    }
    TORCH_CHECK(t.is_contiguous(), "add_layer_norm: ", name, " must be contiguous");
  };
  TORCH_CHECK(x.is_contiguous(), "add_layer_norm: x must be contiguous");
  check(branch, "branch", true);
  if (gamma.has_value()) check(*gamma, "gamma", false);
  check(weight, "weight", false);
  check(bias, "bias", false);
}

}  // namespace fastdino
