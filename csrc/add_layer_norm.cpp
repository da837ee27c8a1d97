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

// Partial sums in kLanes independent accumulators: a single float accumulator is a serial
// dependency chain that the compiler may not vectorise (fp addition is not reassociated).
constexpr int64_t kLanes = 16;

inline float lane_sum(const float* acc) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T, bool kHasGamma>
void add_layer_norm_rows(const T* x, const T* branch, const T* gamma, const T* weight, const T* bias, T* y,
                         T* z, int64_t rows, int64_t C, float eps) {
  // ~64k elements per task keeps the per-task overhead small for C = 384.
  const int64_t grain = std::max<int64_t>(1, 65536 / C);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // fp32 copies of the (C,) vectors, once per task; buf holds the row between the passes.
    std::vector<float> g(kHasGamma ? C : 0), w(C), b(C), buf(C);
    for (int64_t c = 0; c < C; ++c) {
      if constexpr (kHasGamma) g[c] = static_cast<float>(gamma[c]);
      w[c] = static_cast<float>(weight[c]);
      b[c] = static_cast<float>(bias[c]);
    }
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      const T* br = branch + r * C;
      T* yr = y + r * C;
      T* zr = z + r * C;
      float acc[kLanes] = {};
      for (int64_t c = 0; c < C; ++c) {
        const float v = add_scaled<T>(static_cast<float>(xr[c]), static_cast<float>(br[c]), kHasGamma ? g[c] : 1.f);
        yr[c] = static_cast<T>(v);
        buf[c] = v;
        acc[c % kLanes] += v;
      }
      const float mean = lane_sum(acc) / static_cast<float>(C);
      // Two-pass variance over the buffered row: no cancellation for rows with a large mean.
      float sq[kLanes] = {};
      for (int64_t c = 0; c < C; ++c) {
        const float d = buf[c] - mean;
        sq[c % kLanes] += d * d;
      }
      const float rstd = 1.f / std::sqrt(lane_sum(sq) / static_cast<float>(C) + eps);
      for (int64_t c = 0; c < C; ++c) zr[c] = static_cast<T>(normalize(buf[c], mean, rstd, w[c], b[c]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& branch,
                                                      const std::optional<at::Tensor>& gamma,
                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                      double eps) {
  check_add_layer_norm_args(x, branch, gamma, weight, bias);
  TORCH_CHECK(x.device().is_cpu(), "add_layer_norm (CPU kernel): x must be on the CPU, got ", device_str(x));
  auto y = at::empty_like(x);
  auto z = at::empty_like(x);
  const int64_t C = x.size(-1);
  const int64_t rows = x.numel() / C;
  if (rows == 0) return {y, z};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_cpu", [&] {
    auto run = gamma.has_value() ? add_layer_norm_rows<scalar_t, true> : add_layer_norm_rows<scalar_t, false>;
    run(x.const_data_ptr<scalar_t>(), branch.const_data_ptr<scalar_t>(),
        gamma.has_value() ? gamma->const_data_ptr<scalar_t>() : nullptr, weight.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(), rows, C,
        static_cast<float>(eps));
  });
  return {y, z};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("add_layer_norm", &add_layer_norm_cpu); }

}  // namespace fastdino
