// CUDA kernel of the C++ form of rope_attention: rotate q and k (B, N, H, D) in one launch into
// new contiguous tensors that ATen's flash/cuDNN attention then reads. Memory-bound (read q, k,
// write them back), so each thread moves VEC rotation pairs with 16-byte loads and stores when
// the head dim and strides allow it, else one pair. Tables are fp32 (HW, D), L2-resident: shared
// by every batch and head, read in their own dtype (fp32 from dinov3, the activation dtype from
// transformers) so no conversion runs per call. Prefix tokens are copied unchanged.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "rope_attention.h"

namespace fastdino {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

struct Strides {
  int64_t b, n, h;
};

template <typename T, typename TT, int VEC>
__global__ void rope_qk_kernel(const T* __restrict__ q, const T* __restrict__ k, const TT* __restrict__ cos,
                               const TT* __restrict__ sin, T* __restrict__ qo, T* __restrict__ ko, int64_t rows,
                               int N, int H, int half, int prefix, Strides qs, Strides ks) {
  using P = Pack<T, VEC>;
  const int per_row = half / VEC;
  const int64_t per_tensor = rows * per_row;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= 2 * per_tensor) return;
  const bool is_k = i >= per_tensor;
  const int64_t j = is_k ? i - per_tensor : i;
  const int64_t row = j / per_row;  // (b, n, h) flattened
  const int d = static_cast<int>(j % per_row) * VEC;
  const int h = static_cast<int>(row % H);
  const int64_t bn = row / H;
  const int n = static_cast<int>(bn % N);
  const int64_t b = bn / N;
  const Strides s = is_k ? ks : qs;
  const T* src = (is_k ? k : q) + b * s.b + n * s.n + h * s.h;
  T* dst = (is_k ? ko : qo) + row * 2 * half;
  const P lo = *reinterpret_cast<const P*>(src + d);
  const P hi = *reinterpret_cast<const P*>(src + d + half);
  if (n < prefix) {
    *reinterpret_cast<P*>(dst + d) = lo;
    *reinterpret_cast<P*>(dst + d + half) = hi;
    return;
  }
  const TT* c = cos + static_cast<int64_t>(n - prefix) * 2 * half + d;
  const TT* sn = sin + static_cast<int64_t>(n - prefix) * 2 * half + d;
  P out_lo, out_hi;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float o1, o2;
    rope_pair(static_cast<float>(lo.v[v]), static_cast<float>(hi.v[v]), static_cast<float>(c[v]),
              static_cast<float>(c[v + half]), static_cast<float>(sn[v]), static_cast<float>(sn[v + half]), o1, o2);
    out_lo.v[v] = static_cast<T>(o1);
    out_hi.v[v] = static_cast<T>(o2);
  }
  *reinterpret_cast<P*>(dst + d) = out_lo;
  *reinterpret_cast<P*>(dst + d + half) = out_hi;
}

template <typename T, typename TT, int VEC>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& qo,
            at::Tensor& ko) {
  const int N = q.size(1), H = q.size(2), half = q.size(3) / 2;
  const int64_t rows = q.size(0) * static_cast<int64_t>(N) * H;
  const int64_t threads = 2 * rows * (half / VEC);
  constexpr int kThreads = 256;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;  // offsets are int64; only the grid is bounded
  TORCH_CHECK(blocks <= INT32_MAX, "rope_attention (CUDA kernel): q and k (", num(q.numel()),
              " elements each) need ", num(blocks), " blocks, more than a grid holds (limit 2**31 - 1)");
  rope_qk_kernel<T, TT, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      q.const_data_ptr<T>(), k.const_data_ptr<T>(), cos.const_data_ptr<TT>(), sin.const_data_ptr<TT>(),
      qo.mutable_data_ptr<T>(), ko.mutable_data_ptr<T>(), rows, N, H, half, static_cast<int>(N - cos.size(0)),
      Strides{q.stride(0), q.stride(1), q.stride(2)}, Strides{k.stride(0), k.stride(1), k.stride(2)});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte packs need the half head dim, every stride and both base pointers to be multiples of it.
bool can_pack(const at::Tensor& t, int64_t vec) {
  return (t.size(3) / 2) % vec == 0 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && t.stride(2) % vec == 0 &&
         reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                const at::Tensor& sin) {
  // Offsets are int64; tokens and heads are held in int.
  TORCH_CHECK(q.size(1) <= INT32_MAX && q.size(2) <= INT32_MAX, "rope_attention (CUDA kernel): q has N=",
              num(q.size(1)), " tokens, H=", num(q.size(2)), " heads; the CUDA kernel that rotates q and k counts "
              "each in 32 bits (limit 2**31 - 1)");
  const c10::cuda::CUDAGuard guard(q.device());
  auto qo = at::empty(q.sizes(), q.options());
  auto ko = at::empty(k.sizes(), k.options());
  if (q.numel() == 0) return {qo, ko};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_qk_cuda", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    const bool packed = can_pack(q, kVec) && can_pack(k, kVec);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "rope_qk_cuda_tables", [&] {
      if (packed) {
        launch<T, scalar_t, kVec>(q, k, cos, sin, qo, ko);
      } else {
        launch<T, scalar_t, 1>(q, k, cos, sin, qo, ko);
      }
    });
  });
  return {qo, ko};
}

}  // namespace fastdino
