// rope_attention, C++ form: one pass rotates q and k (CPU kernel here, CUDA kernel in
// cuda/rope_attention.cu), then ATen's scaled_dot_product_attention, which picks flash/cuDNN
// attention on the GPU and its fused CPU kernel on the host.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "rope_attention.h"

namespace fastdino {

// The device-independent part of the op: rotate with the device's `rope_qk` ((q, k, cos, sin) -> new
// contiguous (B, N, H, D) q and k; tables in their own dtype), then ATen attention on transposed
// views (no copies). EoMT's mask: the M masked rows run again through ATen attention with a
// (B, 1, M, N) boolean mask (True = attend; it broadcasts over the heads), built from logit > 0,
// and replace their unmasked result: M / N of the attention is done twice (about 6% at ViT-L 640^2)
// instead of building the models' dense (B, heads, N, N) additive mask.
template <typename RopeFn>
at::Tensor rope_attention_with(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                               const std::optional<at::Tensor>& mask_logits, double scale, RopeFn rope_qk) {
  check_rope_attention_args(q, k, v, cos, sin, mask_logits);
  // nothing to attend (ATen's CPU attention of torch 2.11 dies of SIGFPE on zero heads)
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  at::Tensor qr = q, kr = k;
  if (cos.has_value()) {
    std::tie(qr, kr) = rope_qk(q, k, cos->contiguous(), sin->contiguous());
  }
  const auto kt = kr.transpose(1, 2), vt = v.transpose(1, 2);
  auto out = at::scaled_dot_product_attention(qr.transpose(1, 2), kt, vt, {}, 0.0, false, scale)
                 .transpose(1, 2)
                 .contiguous();
  if (!mask_logits.has_value() || mask_logits->size(1) == 0) return out;
  const auto& logits = *mask_logits;
  const int64_t B = q.size(0), N = q.size(1), M = logits.size(1), K = logits.size(2);
  auto open = at::ones({B, 1, M, N}, q.options().dtype(at::kBool));
  open.narrow(3, N - K, K).copy_(logits.gt(0).unsqueeze(1));
  auto masked = at::scaled_dot_product_attention(qr.narrow(1, 0, M).transpose(1, 2), kt, vt, open, 0.0, false, scale);
  out.narrow(1, 0, M).copy_(masked.transpose(1, 2));
  return out;
}

namespace {

template <typename T>
void rope_rows_cpu(const at::Tensor& x, const float* cos, const float* sin, int64_t hw, T* out) {
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t prefix = N - hw;
  const T* xp = x.const_data_ptr<T>();
  const int64_t sb = x.stride(0), sn = x.stride(1), sh = x.stride(2);
  at::parallel_for(0, B * N, std::max<int64_t>(1, 16384 / (H * D)), [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, n = bn % N;
      for (int64_t h = 0; h < H; ++h) {
        const T* src = xp + b * sb + n * sn + h * sh;
        T* dst = out + ((bn * H) + h) * D;
        if (n < prefix) {
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
          continue;
        }
        const float* c = cos + (n - prefix) * D;
        const float* s = sin + (n - prefix) * D;
        for (int64_t d = 0; d < half; ++d) {
          float o1, o2;
          rope_pair(static_cast<float>(src[d]), static_cast<float>(src[d + half]), c[d], c[d + half], s[d],
                    s[d + half], o1, o2);
          dst[d] = static_cast<T>(o1);
          dst[d + half] = static_cast<T>(o2);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_qk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in,
                                               const at::Tensor& sin_in) {
  const auto cos = cos_in.to(at::kFloat), sin = sin_in.to(at::kFloat);  // no copy for fp32 tables
  auto qo = at::empty(q.sizes(), q.options());
  auto ko = at::empty(k.sizes(), k.options());
  if (q.numel() == 0) return {qo, ko};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_qk_cpu", [&] {
    for (auto [x, out] : {std::pair{&q, &qo}, std::pair{&k, &ko}}) {
      rope_rows_cpu<scalar_t>(*x, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), cos.size(0),
                              out->mutable_data_ptr<scalar_t>());
    }
  });
  return {qo, ko};
}

at::Tensor rope_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                              const std::optional<at::Tensor>& mask_logits, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "rope_attention (CPU kernel): q must be on the CPU, got ", device_str(q));
  return rope_attention_with(q, k, v, cos, sin, mask_logits, scale, rope_qk_cpu);
}

}  // namespace

#ifdef FASTDINO_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rope_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                const at::Tensor& sin);  // cuda/rope_attention.cu

at::Tensor rope_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                               const std::optional<at::Tensor>& mask_logits, double scale) {
  TORCH_CHECK(q.is_cuda(), "rope_attention (CUDA kernel): q must be on a CUDA device, got ", device_str(q));
  return rope_attention_with(q, k, v, cos, sin, mask_logits, scale, rope_qk_cuda);
}

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("rope_attention", &rope_attention_cuda); }
#endif

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("rope_attention", &rope_attention_cpu); }

}  // namespace fastdino
