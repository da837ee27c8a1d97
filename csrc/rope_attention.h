// rope_attention: DINOv3 attention with its 2D RoPE. The C++ form rotates q and k in one pass
// (this header's math, shared by the CPU and CUDA kernels) and hands them to ATen's
// scaled_dot_product_attention.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

namespace fastdino {

// One rotation pair (d, d + D/2) of the half-split layout: x * cos + rotate_half(x) * sin, in fp32.
C10_HOST_DEVICE inline void rope_pair(float x1, float x2, float c1, float c2, float s1, float s2, float& o1,
                                      float& o2) {
  o1 = x1 * c1 - x2 * s1;
  o2 = x2 * c2 + x1 * s2;
}

// Argument checks shared by every backend of the C++ op; messages name the argument.
inline void check_rope_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                                      const std::optional<at::Tensor>& mask_logits) {
  TORCH_CHECK(q.dim() == 4, "rope_attention: q must be (B, N, H, D), got shape ", shape_str(q));
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "rope_attention: q must be float32, float16 or bfloat16, got ", dtype);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == q.sizes(), "rope_attention: ", name, " has shape ", shape_str(t), " but q has shape ",
                shape_str(q));
    TORCH_CHECK(t.device() == q.device(), "rope_attention: ", name, " is on ", device_str(t), " but q is on ",
                device_str(q));
    TORCH_CHECK(t.scalar_type() == dtype, "rope_attention: ", name, " has dtype ", t.scalar_type(),
                " but q has dtype ", dtype);
    TORCH_CHECK(t.stride(-1) == 1, "rope_attention: ", name, " must have stride 1 along the head dim");
  };
  TORCH_CHECK(q.stride(-1) == 1, "rope_attention: q must have stride 1 along the head dim");
  same(k, "k");
  same(v, "v");
  if (mask_logits.has_value()) {
    const auto& m = *mask_logits;
    TORCH_CHECK(m.dim() == 3 && m.size(0) == q.size(0) && m.size(1) + m.size(2) <= q.size(1),
                "rope_attention: mask_logits must be (B=", num(q.size(0)), ", M, K) with M + K <= N=", num(q.size(1)),
                ", got ", shape_str(m));
    TORCH_CHECK(m.device() == q.device(), "rope_attention: mask_logits is on ", device_str(m), " but q is on ",
                device_str(q));
    TORCH_CHECK(m.is_floating_point(), "rope_attention: mask_logits must be floating point, got ", m.scalar_type());
  }
  TORCH_CHECK(cos.has_value() == sin.has_value(), "rope_attention: cos and sin must be given together");
  if (!cos.has_value()) return;
  const int64_t N = q.size(1), D = q.size(3);
  TORCH_CHECK(D % 2 == 0, "rope_attention: RoPE needs an even head dim, got ", num(D));
  for (const auto* t : {&*cos, &*sin}) {
    const char* name = t == &*cos ? "cos" : "sin";
    TORCH_CHECK(t->dim() == 2 && t->size(1) == D && t->size(0) <= N, "rope_attention: ", name, " must be (HW, ", num(D),
                ") with HW <= N=", num(N), ", got ", shape_str(*t));
    TORCH_CHECK(t->device() == q.device(), "rope_attention: ", name, " is on ", device_str(*t), " but q is on ",
                device_str(q));
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf ||
                    t->scalar_type() == at::kBFloat16,
                "rope_attention: ", name, " must be float32, float16 or bfloat16, got ", t->scalar_type());
  }
  TORCH_CHECK(cos->sizes() == sin->sizes(), "rope_attention: cos has shape ", shape_str(*cos), " but sin has ",
              shape_str(*sin));
  TORCH_CHECK(cos->scalar_type() == sin->scalar_type(), "rope_attention: cos has dtype ", cos->scalar_type(),
              " but sin has dtype ", sin->scalar_type());
}

}  // namespace fastdino
