// CUDA kernel of the C++ form of fused_linear: the epilogue pass over the GEMM output y (M, N),
// in place. Memory-bound, so each thread moves VEC elements with 16-byte loads and stores when N
// and every pointer allow it (y and y2 are fresh ATen allocations; the residual may be a view).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fused_linear.h"

namespace fastdino {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, LinearAct ACT, bool RESIDUAL, bool GAMMA>
__global__ void linear_epilogue_kernel(T* __restrict__ y, const T* __restrict__ y2, const T* __restrict__ r,
                                       const T* __restrict__ g, int64_t packs, int64_t N) {
  using P = Pack<T, VEC>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= packs) return;
  const int64_t e = i * VEC;
  P a = *reinterpret_cast<const P*>(y + e);
  P b, res, gam;
  if constexpr (ACT == LinearAct::kSwiglu) b = *reinterpret_cast<const P*>(y2 + e);
  if constexpr (RESIDUAL) res = *reinterpret_cast<const P*>(r + e);
  if constexpr (GAMMA) gam = *reinterpret_cast<const P*>(g + e % N);  // VEC divides N: a pack stays in a row
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    a.v[v] = static_cast<T>(linear_epilogue<ACT, RESIDUAL, GAMMA>(
        static_cast<float>(a.v[v]), ACT == LinearAct::kSwiglu ? static_cast<float>(b.v[v]) : 0.0f,
        RESIDUAL ? static_cast<float>(res.v[v]) : 0.0f, GAMMA ? static_cast<float>(gam.v[v]) : 1.0f));
  }
  *reinterpret_cast<P*>(y + e) = a;
}

bool aligned16(const std::optional<at::Tensor>& t) {
  return !t.has_value() || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
}

}  // namespace

void linear_epilogue_cuda(at::Tensor& y, const std::optional<at::Tensor>& y2, const std::optional<at::Tensor>& r,
                          const std::optional<at::Tensor>& g, LinearAct act) {
  const c10::cuda::CUDAGuard guard(y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fused_linear_cuda", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    const int64_t N = y.size(1);
    const bool packed = N % kVec == 0 && aligned16(y) && aligned16(y2) && aligned16(r) && aligned16(g);
    T* yp = y.mutable_data_ptr<T>();
    const T* y2p = y2 ? y2->const_data_ptr<T>() : nullptr;
    const T* rp = r ? r->const_data_ptr<T>() : nullptr;
    const T* gp = g ? g->const_data_ptr<T>() : nullptr;
    auto run = [&](auto act_c, auto res_c, auto gam_c) {
      constexpr LinearAct A = decltype(act_c)::value;
      constexpr bool R = decltype(res_c)::value, G = decltype(gam_c)::value;
      constexpr int kThreads = 256;
      auto launch = [&](auto vec_c) {
        constexpr int V = decltype(vec_c)::value;
        const int64_t packs = y.numel() / V;
        // offsets are int64; only the grid is bounded
        const int64_t blocks = (packs + kThreads - 1) / kThreads;
        TORCH_CHECK(blocks <= INT32_MAX, "fused_linear (CUDA kernel): the output (", num(y.numel()),
                    " elements) needs ", num(blocks), " blocks, more than a grid holds (limit 2**31 - 1)");
        linear_epilogue_kernel<T, V, A, R, G>
            <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(yp, y2p, rp, gp,
                                                                                                packs, N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (packed) {
        launch(std::integral_constant<int, kVec>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    };
    dispatch_linear_epilogue(act, r.has_value(), g.has_value(), run);
  });
}

}  // namespace fastdino
