// CUDA kernel of the C++ form of rope_attention: rotate q or k (B, N, H, D) into a new contiguous
// tensor. One thread per rotation pair (d, d + D/2): reads two values and four table entries
// (L2-resident, shared by every batch and head), writes two. Prefix tokens are copied.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rope_attention.h"

namespace fastdino {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                            T* __restrict__ out, int64_t pairs, int N, int H, int half, int prefix, int64_t sb,
                            int64_t sn, int64_t sh) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int d = static_cast<int>(i % half);
  const int64_t row = i / half;  // (b, n, h) flattened
  const int h = static_cast<int>(row % H);
  const int64_t bn = row / H;
  const int n = static_cast<int>(bn % N);
  const int64_t b = bn / N;
  const T* src = x + b * sb + n * sn + h * sh;
  T* dst = out + row * 2 * half;
  const float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[d + half]);
  if (n < prefix) {
    dst[d] = src[d];
    dst[d + half] = src[d + half];
    return;
  }
  const int64_t t = static_cast<int64_t>(n - prefix) * 2 * half;
  float o1, o2;
  rope_pair(x1, x2, cos[t + d], cos[t + d + half], sin[t + d], sin[t + d + half], o1, o2);
  dst[d] = static_cast<T>(o1);
  dst[d + half] = static_cast<T>(o2);
}

}  // namespace

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  const int N = x.size(1), H = x.size(2), half = x.size(3) / 2;
  const int64_t pairs = x.numel() / 2;
  if (pairs == 0) return out;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((pairs + kThreads - 1) / kThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_cuda", [&] {
    rope_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
        out.mutable_data_ptr<scalar_t>(), pairs, N, H, half, static_cast<int>(N - cos.size(0)), x.stride(0),
        x.stride(1), x.stride(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fastdino
