// CPU kernel of add_layer_norm: one pass per row over a float buffer, rows split across threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "add_layer_norm.h"

namespace fastdino {
namespace {

template <typename T>
void add_layer_norm_rows(const T* x, const T* branch, const T* gamma, const T* weight, const T* bias, T* y,
                         T* z, int64_t rows, int64_t C, float eps) {
  // ~64k elements per task keeps the per-task overhead small for C = 384.
  const int64_t grain = std::max<int64_t>(1, 65536 / C);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * C;
      float sum = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const float g = gamma ? static_cast<float>(gamma[c]) : 1.f;
        const float v = add_scaled<T>(static_cast<float>(x[off + c]), static_cast<float>(branch[off + c]), g);
        y[off + c] = static_cast<T>(v);
        buf[c] = v;
        sum += v;
      }
      const float mean = sum / static_cast<float>(C);
      // Two-pass variance over the buffered row: no cancellation for rows with a large mean.
      float sq = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const float d = buf[c] - mean;
        sq += d * d;
      }
      const float rstd = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
      for (int64_t c = 0; c < C; ++c) {
        z[off + c] = static_cast<T>(
            normalize(buf[c], mean, rstd, static_cast<float>(weight[c]), static_cast<float>(bias[c])));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& branch,
                                                      const std::optional<at::Tensor>& gamma,
                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                      double eps) {
  check_add_layer_norm_args(x, branch, gamma, weight, bias);
  TORCH_CHECK(x.device().is_cpu(), "add_layer_norm (CPU kernel): x must be on the CPU, got ", x.device());
  auto y = at::empty_like(x);
  auto z = at::empty_like(x);
  const int64_t C = x.size(-1);
  const int64_t rows = x.numel() / C;
  if (rows == 0) return {y, z};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_cpu", [&] {
    add_layer_norm_rows<scalar_t>(x.const_data_ptr<scalar_t>(), branch.const_data_ptr<scalar_t>(),
                                  gamma.has_value() ? gamma->const_data_ptr<scalar_t>() : nullptr,
                                  weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                                  y.mutable_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(), rows, C,
                                  static_cast<float>(eps));
  });
  return {y, z};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("add_layer_norm", &add_layer_norm_cpu); }

}  // namespace fastdino
