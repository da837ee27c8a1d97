// CPU kernel of dwconv_layer_norm: one image row at a time, rows split across threads. The conv
// of a row accumulates in a (W, C) float buffer, then each pixel's channels are normalised.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "dwconv_layer_norm.h"

namespace fastdino {
namespace {

template <typename T>
void dwconv_layer_norm_rows(const T* x, const T* weight, const T* bias, const T* norm_weight, const T* norm_bias,
                            T* z, int64_t B, int64_t C, int64_t H, int64_t W, const int64_t* sx, float eps) {
  constexpr int64_t K = kDwconvK, P = K / 2;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * C));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wt(C * K * K), nw(C), nb(C), bs(C, 0.f), acc(W * C);
    for (int64_t i = 0; i < C * K * K; ++i) wt[i] = static_cast<float>(weight[i]);
    for (int64_t c = 0; c < C; ++c) {
      nw[c] = static_cast<float>(norm_weight[c]);
      nb[c] = static_cast<float>(norm_bias[c]);
      if (bias != nullptr) bs[c] = static_cast<float>(bias[c]);
    }
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = x + b * sx[0] + c * sx[1];
        const float* wc = wt.data() + c * K * K;
        for (int64_t w = 0; w < W; ++w) acc[w * C + c] = bs[c];
        for (int64_t dy = 0; dy < K; ++dy) {
          const int64_t hh = h + dy - P;
          const bool row_in = hh >= 0 && hh < H;
          const T* xr = xc + (row_in ? hh : 0) * sx[2];
          for (int64_t dx = 0; dx < K; ++dx) {
            const float wv = wc[dy * K + dx];
            // output columns whose tap w + dx - P lies inside the map; the others read the zero
            // padding, which is multiplied as conv2d does (a NaN or Inf weight gives NaN there)
            // (both clamped to [0, W]: on a map narrower than the kernel the window may miss it)
            const int64_t lo = row_in ? std::min<int64_t>(W, std::max<int64_t>(0, P - dx)) : W;
            const int64_t hi = row_in ? std::max<int64_t>(lo, std::min<int64_t>(W, W + P - dx)) : W;
            for (int64_t w = 0; w < lo; ++w) acc[w * C + c] += 0.f * wv;
            for (int64_t w = lo; w < hi; ++w) acc[w * C + c] += static_cast<float>(xr[(w + dx - P) * sx[3]]) * wv;
            for (int64_t w = hi; w < W; ++w) acc[w * C + c] += 0.f * wv;
          }
        }
      }
      T* zr = z + bh * W * C;
      for (int64_t w = 0; w < W; ++w) {
        float* y = acc.data() + w * C;
        float sum = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          y[c] = round_to<T>(y[c]);
          sum += y[c];
        }
        const float mean = sum / static_cast<float>(C);
        float sq = 0.f;
        for (int64_t c = 0; c < C; ++c) sq += (y[c] - mean) * (y[c] - mean);
        const float rstd = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
        for (int64_t c = 0; c < C; ++c) zr[w * C + c] = static_cast<T>(normalize(y[c], mean, rstd, nw[c], nb[c]));
      }
    }
  });
}

at::Tensor dwconv_layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  check_dwconv_layer_norm_args(x, weight, bias, norm_weight, norm_bias);
  TORCH_CHECK(x.device().is_cpu(), "dwconv_layer_norm (CPU kernel): x must be on the CPU, got ", device_str(x));
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto z = at::empty({B, H, W, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (z.numel() == 0) return z;
  const int64_t sx[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_layer_norm_cpu", [&] {
    dwconv_layer_norm_rows<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                     bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                     norm_weight.const_data_ptr<scalar_t>(), norm_bias.const_data_ptr<scalar_t>(),
                                     z.mutable_data_ptr<scalar_t>(), B, C, H, W, sx, static_cast<float>(eps));
  });
  return z;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("dwconv_layer_norm", &dwconv_layer_norm_cpu); }

}  // namespace fastdino
