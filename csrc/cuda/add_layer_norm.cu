// CUDA kernel of add_layer_norm.
//
// Memory-bound: per element it reads x and branch and writes y and z (4 passes of T), so the
// target is copy bandwidth. A row is handled by `tpr` threads (blockDim.x, 32..1024) that keep
// their <= 32 values in registers between the statistics and the normalisation, so every byte is
// read once. Short rows (C <= 512) share a 128-thread block between several rows (blockDim.y).
// Loads and stores are 16 bytes wide when C and all pointers allow it (VEC), else scalar.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "add_layer_norm.h"

namespace fastdino {
namespace {

constexpr int kItems = 32;  // values per thread kept in registers; C <= 32 * 1024
constexpr int kMaxC = kItems * 1024;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Sum over the threads of one row (threadIdx.y); every thread gets the result.
__device__ __forceinline__ float row_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = blockDim.x / 32;
  if (warps == 1) return v;
  float* partial = smem + threadIdx.y * warps;
  __syncthreads();  // the previous call's readers are done with smem
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += partial[w];
  return total;
}

template <typename T, int VEC>
__global__ void add_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ branch,
                                      const T* __restrict__ gamma, const T* __restrict__ weight,
                                      const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ z,
                                      int64_t rows, int C, float eps) {
  constexpr int NV = kItems / VEC;
  using P = Pack<T, VEC>;
  extern __shared__ float smem[];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;  // no early return: every thread takes part in row_sum's barriers
  const int64_t off = row * C;
  float v[kItems];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VEC;
    if (valid && c < C) {
      const P xp = *reinterpret_cast<const P*>(x + off + c);
      const P bp = *reinterpret_cast<const P*>(branch + off + c);
      P gp;
      if (gamma != nullptr) gp = *reinterpret_cast<const P*>(gamma + c);
      P yp;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = gamma != nullptr ? static_cast<float>(gp.v[j]) : 1.f;
        const float t = add_scaled<T>(static_cast<float>(xp.v[j]), static_cast<float>(bp.v[j]), g);
        v[i * VEC + j] = t;
        sum += t;
        yp.v[j] = static_cast<T>(t);
      }
      *reinterpret_cast<P*>(y + off + c) = yp;
    }
  }
  const float mean = row_sum(sum, smem) / C;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VEC;
    if (valid && c < C) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[i * VEC + j] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(row_sum(sq, smem) / C + eps);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (i * blockDim.x + threadIdx.x) * VEC;
    if (valid && c < C) {
      const P wp = *reinterpret_cast<const P*>(weight + c);
      const P bp = *reinterpret_cast<const P*>(bias + c);
      P zp;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        zp.v[j] = static_cast<T>(normalize(v[i * VEC + j], mean, rstd, static_cast<float>(wp.v[j]),
                                           static_cast<float>(bp.v[j])));
      }
      *reinterpret_cast<P*>(z + off + c) = zp;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& branch, const std::optional<at::Tensor>& gamma,
            const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, at::Tensor& z, float eps) {
  const int C = static_cast<int>(x.size(-1));
  const int64_t rows = x.numel() / C;
  const T* g = gamma.has_value() ? gamma->const_data_ptr<T>() : nullptr;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = C % kVec == 0 && aligned16(x.const_data_ptr()) && aligned16(branch.const_data_ptr()) &&
                   (g == nullptr || aligned16(g)) && aligned16(weight.const_data_ptr()) &&
                   aligned16(bias.const_data_ptr()) && aligned16(y.const_data_ptr()) &&
                   aligned16(z.const_data_ptr());
  // About 16 values per thread, at least one warp per row.
  int tpr = 32;
  while (tpr < 1024 && tpr * 16 < C) tpr *= 2;
  const int rows_per_block = tpr >= 128 ? 1 : 128 / tpr;
  const dim3 block(tpr, rows_per_block);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "add_layer_norm: too many rows (", num(rows), ")");
  const size_t smem = sizeof(float) * rows_per_block * (tpr / 32);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), block, smem, stream>>>(
        x.const_data_ptr<T>(), branch.const_data_ptr<T>(), g, weight.const_data_ptr<T>(),
        bias.const_data_ptr<T>(), y.mutable_data_ptr<T>(), z.mutable_data_ptr<T>(), rows, C, eps);
  };
  if (vec) {
    args(add_layer_norm_kernel<T, kVec>);
  } else {
    args(add_layer_norm_kernel<T, 1>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_cuda(const at::Tensor& x, const at::Tensor& branch,
                                                       const std::optional<at::Tensor>& gamma,
                                                       const at::Tensor& weight, const at::Tensor& bias,
                                                       double eps) {
  check_add_layer_norm_args(x, branch, gamma, weight, bias);
  TORCH_CHECK(x.size(-1) <= kMaxC, "add_layer_norm (CUDA kernel): x.size(-1) = ", num(x.size(-1)),
              " exceeds the supported maximum ", num(kMaxC));
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto z = at::empty_like(x);
  if (x.numel() == 0) return {y, z};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_cuda", [&] {
    launch<scalar_t>(x, branch, gamma, weight, bias, y, z, static_cast<float>(eps));
  });
  return {y, z};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("add_layer_norm", &add_layer_norm_cuda); }

}  // namespace fastdino
