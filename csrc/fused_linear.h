// fused_linear: an MLP Linear with its elementwise work after the GEMM. The C++ form runs the GEMM
// with ATen (cuBLAS/cuBLASLt with the bias epilogue on the GPU) and then one pass of this header's
// epilogue math (shared by the CPU and CUDA kernels) in place on its output: exact GELU, SwiGLU's
// silu(a) * b, and residual + gamma * y. cuBLASLt's own GELU epilogue is the tanh approximation,
// which DINOv3 does not use, hence the separate pass.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "checks.h"

namespace fastdino {

enum class LinearAct : int { kNone = 0, kGelu = 1, kSwiglu = 2 };

// y (and y2 for SwiGLU) are the GEMM outputs with their biases; r, g the residual and LayerScale.
template <LinearAct ACT, bool RESIDUAL, bool GAMMA>
C10_HOST_DEVICE inline float linear_epilogue(float y, float y2, float r, float g) {
  if constexpr (ACT == LinearAct::kGelu) {
    y = 0.5f * y * (1.0f + erff(y * 0.70710678118654752f));  // exact (erf) GELU, as nn.GELU()
  } else if constexpr (ACT == LinearAct::kSwiglu) {
    y = y / (1.0f + expf(-y)) * y2;
  }
  if constexpr (GAMMA) y *= g;
  if constexpr (RESIDUAL) y += r;
  return y;
}

// Calls run(act, residual, gamma) with the three as std::integral_constant, so each combination is
// its own instantiation (no per-element branches).
template <typename Run>
void dispatch_linear_epilogue(LinearAct act, bool residual, bool gamma, Run&& run) {
  auto with_flags = [&](auto act_c) {
    if (residual && gamma) {
      run(act_c, std::true_type{}, std::true_type{});
    } else if (residual) {
      run(act_c, std::true_type{}, std::false_type{});
    } else {
      run(act_c, std::false_type{}, std::false_type{});
    }
  };
  switch (act) {
    case LinearAct::kGelu: return with_flags(std::integral_constant<LinearAct, LinearAct::kGelu>{});
    case LinearAct::kSwiglu: return with_flags(std::integral_constant<LinearAct, LinearAct::kSwiglu>{});
    default: return with_flags(std::integral_constant<LinearAct, LinearAct::kNone>{});
  }
}

inline LinearAct parse_linear_act(const std::optional<c10::string_view>& act) {
  if (!act.has_value()) return LinearAct::kNone;
  if (*act == "gelu") return LinearAct::kGelu;
  if (*act == "swiglu") return LinearAct::kSwiglu;
  TORCH_CHECK(false, "fused_linear: act must be None, 'gelu' or 'swiglu', got '", std::string(*act), "'");
}

// Argument checks shared by every backend of the C++ op; messages name the argument.
inline void check_fused_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, LinearAct act,
                                    const std::optional<at::Tensor>& weight2, const std::optional<at::Tensor>& bias2,
                                    const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& gamma) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_linear: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() >= 1, "fused_linear: x must have at least one dim");
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "fused_linear: weight must be (N, ", num(K), "), got ",
              shape_str(weight));
  const int64_t N = weight.size(0);
  TORCH_CHECK((act == LinearAct::kSwiglu) == weight2.has_value(),
              "fused_linear: weight2 is required by act='swiglu' and only by it");
  TORCH_CHECK(!gamma.has_value() || residual.has_value(),
              "fused_linear: gamma scales the branch added to residual; residual is missing");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "fused_linear: ", name, " is on ", device_str(t), " but x is on ",
                device_str(x));
    TORCH_CHECK(t.scalar_type() == dtype, "fused_linear: ", name, " has dtype ", t.scalar_type(),
                " but x has dtype ", dtype);
  };
  same(weight, "weight");
  if (weight2.has_value()) {
    same(*weight2, "weight2");
    TORCH_CHECK(weight2->sizes() == weight.sizes(), "fused_linear: weight2 has shape ", shape_str(*weight2),
                " but weight has ", shape_str(weight));
  }
  for (const auto& [t, name] : {std::pair{&bias, "bias"}, std::pair{&bias2, "bias2"}, std::pair{&gamma, "gamma"}}) {
    if (!t->has_value()) continue;
    same(**t, name);
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == N, "fused_linear: ", name, " must have shape (", num(N),
                ",), got ", shape_str(**t));
  }
  if (residual.has_value()) {
    same(*residual, "residual");
    bool ok = residual->dim() == x.dim() && residual->size(-1) == N;
    for (int64_t d = 0; ok && d + 1 < x.dim(); ++d) ok = residual->size(d) == x.size(d);
    TORCH_CHECK(ok, "fused_linear: residual must have x's leading dims and ", num(N), " columns, got ",
                shape_str(*residual), " for x ", shape_str(x));
  }
}

}  // namespace fastdino
