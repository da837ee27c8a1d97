// masked_attention: Mask2Former's masked cross-attention, the mask read from the mask logits
// (B, Lq, Lk), one mask for every head. A key is blocked where sigmoid(logit), rounded to the
// logits' dtype, is below 0.5 (mask_blocked); a query row with every key blocked attends to all keys (the
// decoders' rule). This header holds that test and the argument checks the CPU and CUDA kernels
// share; scores, softmax and accumulation are fp32 whatever the storage type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <type_traits>

#include "checks.h"

namespace fastdino {

constexpr int64_t kMaskedAttentionMaxHeadDim = 128;

// The decoders' test, sigmoid(logit) < 0.5 with the sigmoid rounded to the logits' type, is
// `logit < threshold`: sigmoid(x) = 0.5 + x/4 - ..., and rounded to nearest-even in a type whose
// spacing below 0.5 is 2^-e it drops below 0.5 exactly when x < -2^-(e-1) (kernels/masked_attention.py
// derives the same thresholds). One comparison, no exp.
template <typename TM>
C10_HOST_DEVICE inline float mask_threshold() {
  if constexpr (std::is_same_v<TM, c10::BFloat16>) return -0.00390625f;  // -2^-8
  if constexpr (std::is_same_v<TM, c10::Half>) return -0.00048828125f;   // -2^-11
  return -5.9604644775390625e-08f;                                      // -2^-24
}

template <typename TM>
C10_HOST_DEVICE inline bool mask_blocked(TM logit) {
  return static_cast<float>(logit) < mask_threshold<TM>();
}

inline bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Argument checks shared by every backend of the C++ op; messages name the argument.
inline void check_masked_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& mask_logits) {
  TORCH_CHECK(q.dim() == 4, "masked_attention: q must be (B, Lq, H, D), got shape ", shape_str(q));
  const auto dtype = q.scalar_type();
  TORCH_CHECK(is_kernel_dtype(dtype), "masked_attention: q must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= kMaskedAttentionMaxHeadDim, "masked_attention: head dim must be in 1..",
              num(kMaskedAttentionMaxHeadDim), ", got ", num(D));
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(2) == H && k.size(3) == D,
              "masked_attention: k must be (B=", num(B), ", Lk, H=", num(H), ", D=", num(D), "), got shape ",
              shape_str(k));
  TORCH_CHECK(k.size(1) > 0, "masked_attention: k and v have no keys (Lk = 0)");
  TORCH_CHECK(v.sizes() == k.sizes(), "masked_attention: v has shape ", shape_str(v), " but k has ", shape_str(k));
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : (t == &k ? "k" : "v");
    TORCH_CHECK(t->device() == q.device(), "masked_attention: ", name, " is on ", device_str(*t), " but q is on ",
                device_str(q));
    TORCH_CHECK(t->scalar_type() == dtype, "masked_attention: ", name, " has dtype ", t->scalar_type(),
                " but q has dtype ", dtype);
    TORCH_CHECK(t->stride(-1) == 1, "masked_attention: ", name, " must have stride 1 along the head dim");
  }
  if (!mask_logits.has_value()) return;
  const at::Tensor& m = *mask_logits;
  TORCH_CHECK(m.dim() == 3 && m.size(0) == B && m.size(1) == Lq && m.size(2) == k.size(1),
              "masked_attention: mask_logits must be (B=", num(B), ", Lq=", num(Lq), ", Lk=", num(k.size(1)),
              "), got shape ", shape_str(m));
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == dtype,
              "masked_attention: mask_logits must be float32 or q's dtype ", dtype, ", got ", m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), "masked_attention: mask_logits is on ", device_str(m), " but q is on ",
              device_str(q));
  TORCH_CHECK(m.stride(2) == 1 || m.size(2) == 1, "masked_attention: mask_logits must have stride 1 along the keys");
}

}  // namespace fastdino
