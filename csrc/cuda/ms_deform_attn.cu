// CUDA kernel of ms_deform_attn. One thread per (batch, query, head, VEC channels): it walks the
// L * P samples of its query-head level by level (the sampling math of ms_deform_attn.h; given
// reference points, the softmax and the offset -> location step too, each thread of a head redoing
// them from the same cached logits rather than sharing them through memory), gathers VEC channels of
// each valid corner with one vector load (16 bytes when Dh allows), accumulates in fp32 and writes
// its channels once: no atomics, no shared memory, and the level shapes are read from the device
// tensor (each level's first row derived from them: levels packed in order), so nothing
// synchronises with the host. Neighbouring threads hold neighbouring channels
// and heads of one query, so a corner's row is fetched in a few wide transactions.
//
// The four corner gathers of a sample are predicated loads, not loads in branches, so several are in
// flight at once (in branches, the 16-byte ones issued one at a time on sm_90). The (L, P) of the
// real models have kernels with both fixed at compile time, the sample loops unrolled; other (L, P)
// run a kernel with runtime L and P (launch_levels).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ms_deform_attn.h"

namespace fastdino {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// A pack's bytes as whole 32-bit (or narrower) words: a predicated load with a zero default then fills
// whole registers, where a zeroed Pack<Half or BFloat16> merges lane by lane (a PRMT per lane: 7-10%
// more instructions and up to 8 more registers in the unrolled 16-bit kernels on sm_90).
template <int BYTES>
struct Raw;
template <>
struct Raw<16> {
  using type = uint4;
};
template <>
struct Raw<8> {
  using type = uint2;
};
template <>
struct Raw<4> {
  using type = uint32_t;
};
template <>
struct Raw<2> {
  using type = uint16_t;
};

// The VEC values at p as floats where `read`, zeros elsewhere (p is not dereferenced then).
template <typename T, int VEC>
C10_HOST_DEVICE __forceinline__ void load_or_zero(const T* p, bool read, float (&x)[VEC]) {
  using R = typename Raw<sizeof(T) * VEC>::type;
  R raw{};
  if (read) raw = *reinterpret_cast<const R*>(p);
  if constexpr (std::is_same_v<T, at::BFloat16> && VEC % 2 == 0) {
    // bf16 -> fp32 is exact bit placement: two values per 32-bit word, no 16-bit lane extraction.
    uint32_t w[VEC / 2];
    memcpy(w, &raw, sizeof(w));
#pragma unroll
    for (int v = 0; v < VEC / 2; ++v) {
      const uint32_t lo = w[v] << 16, hi = w[v] & 0xffff0000u;
      memcpy(&x[2 * v], &lo, 4);
      memcpy(&x[2 * v + 1], &hi, 4);
    }
  } else {
    T t[VEC];
    memcpy(t, &raw, sizeof(t));
#pragma unroll
    for (int v = 0; v < VEC; ++v) x[v] = static_cast<float>(t[v]);
  }
}

// One thread's work: output group i (VEC channels of one query-head). KL, KP > 0: L and P fixed at
// compile time (the sample loops unroll); 0: runtime L and P. Host-callable too: a host build can run
// each specialisation's arithmetic against the CPU op's on a machine without a GPU.
template <typename T, typename TL, int VEC, int KL, int KP>
C10_HOST_DEVICE __forceinline__ void ms_deform_attn_thread(int64_t i, const T* value, const int64_t* shapes,
                                                          const TL* loc, const TL* attw, const float* ref, int R,
                                                          int64_t ref_b, T* out, int64_t Lq, int64_t S, int Hh, int Dh,
                                                          int L, int P) {
  using Pk = Pack<T, VEC>;
  if (KL > 0) L = KL;
  if (KP > 0) P = KP;
  const int chunks = Dh / VEC;
  const int d = static_cast<int>(i % chunks) * VEC;
  const int64_t qh = i / chunks;  // (b, q, h) flattened
  const int h = static_cast<int>(qh % Hh);
  const int64_t b = qh / Hh / Lq;
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
  const T* base = value + (b * S * Hh + h) * Dh + d;
  const int64_t row_stride = static_cast<int64_t>(Hh) * Dh;
  // One sample: its four addresses, then the four gathers, predicated rather than branched around (with
  // L and P fixed, the compiler may also start the next samples' before these return), then the sums
  // in corner order. A corner not read adds 0 * 0, a no-op as acc is never -0: the sums are those of
  // adding only the corners read, as the CPU op does.
  auto sample = [&](float lx, float ly, float a, int64_t H, int64_t W, int64_t start) {
    const SampleRows r = sample_rows(lx, ly, a, H, W, start, S);
    int64_t off[4];  // all four addresses before the first load (row 0 where the corner is not read)
#pragma unroll
    for (int c = 0; c < 4; ++c) off[c] = (r.ok[c] ? r.row[c] : 0) * row_stride;
    float x[4][VEC];
#pragma unroll
    for (int c = 0; c < 4; ++c) load_or_zero(base + off[c], r.ok[c], x[c]);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float w = r.ok[c] ? r.w[c] : 0.0f;
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += w * x[c][v];
    }
    if (r.nan) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = NAN;
    }
  };
  if (ref != nullptr) {
    const int64_t q = qh / Hh - b * Lq;
    for_each_offset_sample<KL, KP>(ref + b * ref_b + q * L * R, R, loc + qh * L * P * 2, attw + qh * L * P, shapes, L,
                                   P, sample);
  } else {
    for_each_sample<KL, KP>(loc + qh * L * P * 2, attw + qh * L * P, shapes, L, P, sample);
  }
  Pk o;
#pragma unroll
  for (int v = 0; v < VEC; ++v) o.v[v] = static_cast<T>(acc[v]);
  *reinterpret_cast<Pk*>(out + qh * Dh + d) = o;
}

template <typename T, typename TL, int VEC, int KL, int KP>
__global__ void ms_deform_attn_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                                      const TL* __restrict__ loc, const TL* __restrict__ attw,
                                      const float* __restrict__ ref, int R, int64_t ref_b, T* __restrict__ out,
                                      int64_t threads, int64_t Lq, int64_t S, int Hh, int Dh, int L, int P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < threads) {
    ms_deform_attn_thread<T, TL, VEC, KL, KP>(i, value, shapes, loc, attw, ref, R, ref_b, out, Lq, S, Hh, Dh, L, P);
  }
}

template <typename T, typename TL, int VEC, int KL, int KP>
void launch(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
            const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  const int64_t B = value.size(0), S = value.size(1), Lq = loc.size(1);
  const int Hh = value.size(2), Dh = value.size(3), L = loc.size(3), P = loc.size(4);
  const int64_t threads = B * Lq * Hh * (Dh / VEC);
  const int R = ref ? static_cast<int>(ref->size(3)) : 0;
  const int64_t ref_b = ref && ref->size(0) > 1 ? Lq * L * R : 0;  // one set of points for the batch: stride 0
  // 128 threads: the unrolled kernels take up to 96 registers, and smaller blocks lose less of an SM
  // to the rounding of its registers into whole blocks (at 96: 20 warps per SM, 16 with 256 threads).
  constexpr int kThreads = 128;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;  // offsets are int64; only the grid is bounded
  TORCH_CHECK(blocks <= INT32_MAX, "ms_deform_attn (CUDA kernel): the output (", num(out.numel()),
              " elements) needs ", num(blocks), " blocks, more than a grid holds (limit 2**31 - 1)");
  ms_deform_attn_kernel<T, TL, VEC, KL, KP>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          value.const_data_ptr<T>(), shapes.const_data_ptr<int64_t>(), loc.const_data_ptr<TL>(),
          attw.const_data_ptr<TL>(), ref ? ref->const_data_ptr<float>() : nullptr, R, ref_b,
          out.mutable_data_ptr<T>(), threads, Lq, S, Hh, Dh, L, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The (L, P) of the real models get kernels with both fixed: (1, 4) the ViT-Adapter's extractors,
// (3, 4) the Mask2Former pixel decoder and the adapter's injectors, (4, 4) Deformable DETR. Any
// other (L, P), and the scalar pack (odd Dh or unaligned value, no real model), runs the kernel with
// runtime L and P.
template <typename T, typename TL, int VEC>
void launch_levels(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                   const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  const int64_t L = loc.size(3), P = loc.size(4);
  if constexpr (VEC > 1) {
    if (L == 1 && P == 4) return launch<T, TL, VEC, 1, 4>(value, shapes, loc, attw, ref, out);
    if (L == 3 && P == 4) return launch<T, TL, VEC, 3, 4>(value, shapes, loc, attw, ref, out);
    if (L == 4 && P == 4) return launch<T, TL, VEC, 4, 4>(value, shapes, loc, attw, ref, out);
  }
  launch<T, TL, VEC, 0, 0>(value, shapes, loc, attw, ref, out);
}

// The widest pack (at most 16 bytes) that divides Dh, given 16-byte aligned value and out.
template <typename T, typename TL>
void launch_widest(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                   const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  constexpr int kMax = 16 / sizeof(T);
  const int Dh = value.size(3);
  const bool aligned = reinterpret_cast<uintptr_t>(value.const_data_ptr()) % 16 == 0;
  if (aligned && Dh % kMax == 0) return launch_levels<T, TL, kMax>(value, shapes, loc, attw, ref, out);
  if (aligned && Dh % 4 == 0) return launch_levels<T, TL, 4>(value, shapes, loc, attw, ref, out);
  if (aligned && Dh % 2 == 0) return launch_levels<T, TL, 2>(value, shapes, loc, attw, ref, out);
  launch_levels<T, TL, 1>(value, shapes, loc, attw, ref, out);
}

// Locations and weights in fp32, or in value's dtype.
template <typename T>
void launch_dtype(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                  const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  if (loc.scalar_type() == at::kFloat) return launch_widest<T, float>(value, shapes, loc, attw, ref, out);
  if constexpr (!std::is_same_v<T, float>) launch_widest<T, T>(value, shapes, loc, attw, ref, out);
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
  // The dtypes check_ms_deform_attn_args admits, no more: every kernel instantiated is one that can run.
  switch (value.scalar_type()) {
    case at::kFloat:
      launch_dtype<float>(value, spatial_shapes, sampling_locations, attention_weights, reference_points, out);
      break;
    case at::kHalf:
      launch_dtype<at::Half>(value, spatial_shapes, sampling_locations, attention_weights, reference_points, out);
      break;
    case at::kBFloat16:
      launch_dtype<at::BFloat16>(value, spatial_shapes, sampling_locations, attention_weights, reference_points,
                                 out);
      break;
    default:
      TORCH_CHECK(false, "ms_deform_attn (CUDA kernel): no kernel for ", value.scalar_type());
  }
  return out;
}

}  // namespace fastdino
