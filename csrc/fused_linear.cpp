// fused_linear, C++ form: ATen GEMM(s) with the bias, then one in-place epilogue pass (CPU kernel
// here, CUDA kernel in cuda/fused_linear.cu). The epilogue reads the GEMM output once instead of
// the two or three passes of eager GELU / silu * mul / gamma * y + residual.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "fused_linear.h"

namespace fastdino {

// The device-independent part: GEMM(s) over x viewed as (M, K) (ATen reads weight^T as a view),
// then `epilogue(y, y2, residual, gamma, act)` in place on y (M, N). Returns x's leading dims + (N,).
template <typename EpilogueFn>
at::Tensor fused_linear_with(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             std::optional<c10::string_view> act_name, const std::optional<at::Tensor>& weight2,
                             const std::optional<at::Tensor>& bias2, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& gamma, EpilogueFn epilogue) {
  const LinearAct act = parse_linear_act(act_name);
  check_fused_linear_args(x, weight, bias, act, weight2, bias2, residual, gamma);
  const int64_t K = x.size(-1), N = weight.size(0);
  const auto x2 = x.reshape({-1, K});
  auto gemm = [&](const at::Tensor& w, const std::optional<at::Tensor>& b) {
    return b.has_value() ? at::addmm(*b, x2, w.t()) : at::mm(x2, w.t());
  };
  auto y = gemm(weight, bias);
  std::optional<at::Tensor> y2, r2, g;
  if (weight2.has_value()) y2 = gemm(*weight2, bias2);
  if (residual.has_value()) r2 = residual->reshape({-1, N}).contiguous();
  if (gamma.has_value()) g = gamma->contiguous();
  if (y.numel() > 0 && (act != LinearAct::kNone || residual.has_value())) epilogue(y, y2, r2, g, act);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

namespace {

template <typename T, LinearAct ACT, bool RESIDUAL, bool GAMMA>
void epilogue_rows_cpu(T* y, const T* y2, const T* r, const T* g, int64_t M, int64_t N) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / N), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = m * N + n;
        y[i] = static_cast<T>(linear_epilogue<ACT, RESIDUAL, GAMMA>(
            static_cast<float>(y[i]), y2 ? static_cast<float>(y2[i]) : 0.0f, RESIDUAL ? static_cast<float>(r[i]) : 0.0f,
            GAMMA ? static_cast<float>(g[n]) : 1.0f));
      }
    }
  });
}

void linear_epilogue_cpu(at::Tensor& y, const std::optional<at::Tensor>& y2, const std::optional<at::Tensor>& r,
                         const std::optional<at::Tensor>& g, LinearAct act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fused_linear_cpu", [&] {
    using T = scalar_t;
    T* yp = y.mutable_data_ptr<T>();
    const T* y2p = y2 ? y2->const_data_ptr<T>() : nullptr;
    const T* rp = r ? r->const_data_ptr<T>() : nullptr;
    const T* gp = g ? g->const_data_ptr<T>() : nullptr;
    const int64_t M = y.size(0), N = y.size(1);
    auto run = [&](auto act_c, auto res_c, auto gam_c) {
      epilogue_rows_cpu<T, decltype(act_c)::value, decltype(res_c)::value, decltype(gam_c)::value>(yp, y2p, rp, gp,
                                                                                                     M, N);
    };
    dispatch_linear_epilogue(act, r.has_value(), g.has_value(), run);
  });
}

at::Tensor fused_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            std::optional<c10::string_view> act, const std::optional<at::Tensor>& weight2,
                            const std::optional<at::Tensor>& bias2, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& gamma) {
  TORCH_CHECK(x.device().is_cpu(), "fused_linear (CPU kernel): x must be on the CPU, got ", device_str(x));
  return fused_linear_with(x, weight, bias, act, weight2, bias2, residual, gamma, linear_epilogue_cpu);
}

}  // namespace

#ifdef FASTDINO_WITH_CUDA
void linear_epilogue_cuda(at::Tensor& y, const std::optional<at::Tensor>& y2, const std::optional<at::Tensor>& r,
                          const std::optional<at::Tensor>& g, LinearAct act);  // cuda/fused_linear.cu

at::Tensor fused_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             std::optional<c10::string_view> act, const std::optional<at::Tensor>& weight2,
                             const std::optional<at::Tensor>& bias2, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& gamma) {
  TORCH_CHECK(x.is_cuda(), "fused_linear (CUDA kernel): x must be on a CUDA device, got ", device_str(x));
  return fused_linear_with(x, weight, bias, act, weight2, bias2, residual, gamma, linear_epilogue_cuda);
}

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("fused_linear", &fused_linear_cuda); }
#endif

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("fused_linear", &fused_linear_cpu); }

}  // namespace fastdino
