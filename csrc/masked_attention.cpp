// masked_attention, C++ form: the CPU kernel here, the CUDA kernel in cuda/masked_attention.cu;
// both apply mask_blocked from the header. Output (B, Lq, H, D) contiguous, in q's dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "masked_attention.h"

namespace fastdino {
namespace {

// One task per (batch, query): the mask row is tested once for all heads, then each head's scores
// are softmaxed in fp32 and applied to v. A blocked key is scored and weighted 0, as the models'
// additive -inf mask does, so a NaN or Inf in its key or value row reaches the output exactly as in
// nn.MultiheadAttention (NaN + -inf = NaN, 0 * Inf = NaN).
template <typename T, typename TM>
void masked_attention_rows_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask_logits, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3), Lk = k.size(1);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const TM* mp = mask_logits ? mask_logits->const_data_ptr<TM>() : nullptr;
  const int64_t smb = mask_logits ? mask_logits->stride(0) : 0, smq = mask_logits ? mask_logits->stride(1) : 0;
  T* op = out.mutable_data_ptr<T>();
  const float sc = static_cast<float>(scale);
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Lq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bias(Lk), qrow(D), s(Lk), acc(D);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Lq, i = bq % Lq;
      bool open = mp == nullptr;
      if (mp != nullptr) {
        const TM* row = mp + b * smb + i * smq;
        for (int64_t j = 0; j < Lk; ++j) {
          const bool blocked = mask_blocked(row[j]);
          bias[j] = blocked ? -inf : 0.0f;
          open = open || !blocked;
        }
      }
      if (!open) std::fill(bias.begin(), bias.end(), 0.0f);  // every key blocked: all open
      for (int64_t h = 0; h < H; ++h) {
        const T* qh = qp + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<float>(qh[d]);
        float mx = -inf;
        for (int64_t j = 0; j < Lk; ++j) {
          const T* kr = kp + b * k.stride(0) + j * k.stride(1) + h * k.stride(2);
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qrow[d] * static_cast<float>(kr[d]);
          s[j] = dot * sc + bias[j];
          mx = std::max(mx, s[j]);  // NaN scores are skipped here and make the sum NaN below
        }
        float sum = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < Lk; ++j) {
          const float p = std::exp(s[j] - mx);
          sum += p;
          const T* vr = vp + b * v.stride(0) + j * v.stride(1) + h * v.stride(2);
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vr[d]);
        }
        T* o = op + ((bq * H) + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / sum);
      }
    }
  });
}

at::Tensor masked_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask_logits, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "masked_attention (CPU kernel): q must be on the CPU, got ", device_str(q));
  check_masked_attention_args(q, k, v, mask_logits);
  auto out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  const bool fp32_mask = !mask_logits || mask_logits->scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "masked_attention_cpu", [&] {
    if (fp32_mask) {
      masked_attention_rows_cpu<scalar_t, float>(q, k, v, mask_logits, scale, out);
    } else {
      masked_attention_rows_cpu<scalar_t, scalar_t>(q, k, v, mask_logits, scale, out);
    }
  });
  return out;
}

}  // namespace

#ifdef FASTDINO_WITH_CUDA
at::Tensor masked_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask_logits,
                                 double scale);  // cuda/masked_attention.cu

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("masked_attention", &masked_attention_cuda); }
#endif

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("masked_attention", &masked_attention_cpu); }

}  // namespace fastdino
