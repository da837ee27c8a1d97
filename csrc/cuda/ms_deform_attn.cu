// CUDA kernel of ms_deform_attn. One thread per (batch, query, head, VEC channels): it walks the
// L * P samples of its query-head (the sampling math of ms_deform_attn.h; given reference points, the
// softmax and the offset -> location step too, each thread of a head redoing them from the same
// cached logits rather than sharing them through memory), gathers VEC channels of
// each valid corner with one vector load (16 bytes when Dh allows), accumulates in fp32 and writes
// its channels once: no atomics, no shared memory, and the level shapes are read from the device
// tensor (each level's first row derived from them: levels packed in order), so nothing
// synchronises with the host. Neighbouring threads hold neighbouring channels
// and heads of one query, so a corner's row is fetched in a few wide transactions.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ms_deform_attn.h"

namespace fastdino {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, typename TL, int VEC>
__global__ void ms_deform_attn_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                                      const TL* __restrict__ loc,
                                      const TL* __restrict__ attw, const float* __restrict__ ref, int R,
                                      int64_t ref_b, T* __restrict__ out, int64_t threads, int64_t Lq, int64_t S,
                                      int Hh, int Dh, int L, int P) {
  using Pk = Pack<T, VEC>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= threads) return;
  const int chunks = Dh / VEC;
  const int d = static_cast<int>(i % chunks) * VEC;
  const int64_t qh = i / chunks;  // (b, q, h) flattened
  const int h = static_cast<int>(qh % Hh);
  const int64_t b = qh / Hh / Lq;
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
  const T* base = value + (b * S * Hh + h) * Dh + d;
  auto add_row = [&](int64_t row, float w) {
    const Pk x = *reinterpret_cast<const Pk*>(base + row * Hh * Dh);
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] += w * static_cast<float>(x.v[v]);
  };
  if (ref != nullptr) {
    const int64_t q = qh / Hh - b * Lq;
    ms_deform_attn_offset_samples(ref + b * ref_b + q * L * R, R, loc + qh * L * P * 2, attw + qh * L * P, shapes,
                                  L, P, S, add_row);
  } else {
    ms_deform_attn_samples(loc + qh * L * P * 2, attw + qh * L * P, shapes, L, P, S, add_row);
  }
  Pk o;
#pragma unroll
  for (int v = 0; v < VEC; ++v) o.v[v] = static_cast<T>(acc[v]);
  *reinterpret_cast<Pk*>(out + qh * Dh + d) = o;
}

template <typename T, typename TL, int VEC>
void launch(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
            const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  const int64_t B = value.size(0), S = value.size(1), Lq = loc.size(1);
  const int Hh = value.size(2), Dh = value.size(3), L = loc.size(3), P = loc.size(4);
  const int64_t threads = B * Lq * Hh * (Dh / VEC);
  const int R = ref ? static_cast<int>(ref->size(3)) : 0;
  const int64_t ref_b = ref && ref->size(0) > 1 ? Lq * L * R : 0;  // one set of points for the batch: stride 0
  constexpr int kThreads = 256;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;  // offsets are int64; only the grid is bounded
  TORCH_CHECK(blocks <= INT32_MAX, "ms_deform_attn (CUDA kernel): the output (", num(out.numel()),
              " elements) needs ", num(blocks), " blocks, more than a grid holds (limit 2**31 - 1)");
  ms_deform_attn_kernel<T, TL, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      value.const_data_ptr<T>(), shapes.const_data_ptr<int64_t>(),
      loc.const_data_ptr<TL>(), attw.const_data_ptr<TL>(), ref ? ref->const_data_ptr<float>() : nullptr, R, ref_b,
      out.mutable_data_ptr<T>(), threads, Lq, S, Hh, Dh, L, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The widest pack (at most 16 bytes) that divides Dh, given 16-byte aligned value and out.
template <typename T, typename TL>
void launch_widest(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                   const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  constexpr int kMax = 16 / sizeof(T);
  const int Dh = value.size(3);
  const bool aligned = reinterpret_cast<uintptr_t>(value.const_data_ptr()) % 16 == 0;
  if (aligned && Dh % kMax == 0) return launch<T, TL, kMax>(value, shapes, loc, attw, ref, out);
  if (aligned && Dh % 4 == 0) return launch<T, TL, 4>(value, shapes, loc, attw, ref, out);
  if (aligned && Dh % 2 == 0) return launch<T, TL, 2>(value, shapes, loc, attw, ref, out);
  launch<T, TL, 1>(value, shapes, loc, attw, ref, out);
}

}  // namespace

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights,
                               const std::optional<at::Tensor>& reference_points) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be on a CUDA device, got ", device_str(value));
  check_ms_deform_attn_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                            reference_points);
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty({value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)}, value.options());
  if (out.numel() == 0) return out;
  const bool fp32_loc = sampling_locations.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    if (fp32_loc) {
      launch_widest<scalar_t, float>(value, spatial_shapes, sampling_locations, attention_weights,
                                     reference_points, out);
    } else if constexpr (!std::is_same_v<scalar_t, float>) {
      launch_widest<scalar_t, scalar_t>(value, spatial_shapes, sampling_locations,
                                        attention_weights, reference_points, out);
    }
  });
  return out;
}

}  // namespace fastdino
