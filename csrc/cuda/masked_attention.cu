// CUDA kernels of masked_attention, on CUDA cores (the Triton kernel is the tensor-core form).
//
// masked_attention_lift_kernel: one warp per (batch, query) row tests the row's logits 32 at a
// time and stops at the first open key; a row with none is flagged (the decoder lifts its mask).
// masked_attention_kernel: one warp per (batch, query, head), kWarps queries of one (batch, head)
// per block so their k and v rows are shared through L1; the blocks run along grid axis 0 only
// (axes 1 and 2 stop at 65535), the (batch, head) fastest. Each step scores 32 keys, one per lane
// (the query row, pre-scaled, in shared memory; the lane's key row in VEC-wide loads), adds -inf
// to the scores of blocked keys (the models' additive mask, so a NaN or +Inf score stays NaN),
// updates the online softmax with two warp reductions, then walks the step's keys to accumulate
// p * v with lanes on channels (a blocked key's p is 0, and 0 * Inf = NaN as in
// nn.MultiheadAttention). No atomics; the logits stay on the device.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "masked_attention.h"

namespace fastdino {
namespace {

constexpr int kWarps = 4;  // queries per block
constexpr unsigned kFull = 0xffffffffu;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename TM>
__global__ void masked_attention_lift_kernel(const TM* __restrict__ m, int8_t* __restrict__ lift, int64_t smb,
                                             int64_t smq, int64_t rows, int64_t Lq, int64_t Lk) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  const TM* mr = m + (row / Lq) * smb + (row % Lq) * smq;
  bool found = false;
  for (int64_t j0 = 0; j0 < Lk && !found; j0 += 32) {
    const int64_t j = j0 + lane;
    found = __any_sync(kFull, j < Lk && !mask_blocked(mr[j]));
  }
  if (lane == 0) lift[row] = found ? 0 : 1;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

struct Strides {
  int64_t qb, qn, qh, kb, kn, kh, vb, vn, vh, mb, mq;
};

// DPL: channels per lane in the accumulation (ceil(D / 32)); VEC: elements per load of a key row.
template <typename T, typename TM, int DPL, int VEC>
__global__ void masked_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const TM* __restrict__ m, const int8_t* __restrict__ lift,
                                        T* __restrict__ out, Strides st, int64_t BH, int H, int64_t Lq,
                                        int64_t Lk, int D, float scale) {
  using Pk = Pack<T, VEC>;
  extern __shared__ float q_smem[];  // kWarps * D
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t block = blockIdx.x, bh = block % BH, b = bh / H, h = bh % H;
  const int64_t i = block / BH * kWarps + warp;
  if (i >= Lq) return;  // per-warp work only from here: no block-wide barrier follows
  float* qs = q_smem + warp * D;
  const T* qr = q + b * st.qb + i * st.qn + h * st.qh;
  for (int d = lane; d < D; d += 32) qs[d] = static_cast<float>(qr[d]) * scale;
  __syncwarp();
  const bool masked = m != nullptr && lift[b * Lq + i] == 0;
  const TM* mr = masked ? m + b * st.mb + i * st.mq : nullptr;
  const T* kb = k + b * st.kb + h * st.kh;
  const T* vb = v + b * st.vb + h * st.vh;

  float mx = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
  for (int c = 0; c < DPL; ++c) acc[c] = 0.0f;
  for (int64_t j0 = 0; j0 < Lk; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool valid = j < Lk;
    float s = -INFINITY;
    if (valid) {
      const T* kr = kb + j * st.kn;
      float dot = 0.0f;
      for (int d = 0; d < D; d += VEC) {
        const Pk x = *reinterpret_cast<const Pk*>(kr + d);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot += qs[d + e] * static_cast<float>(x.v[e]);
      }
      s = masked && mask_blocked(mr[j]) ? dot - INFINITY : dot;
    }
    const float m_new = fmaxf(mx, warp_max(s));  // fmaxf skips NaN; a NaN p makes l NaN below
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing open yet: exp gives 0, not NaN
    const float alpha = expf(mx - m_use);
    const float p = valid ? expf(s - m_use) : 0.0f;
    l = l * alpha + warp_sum(p);
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[c] *= alpha;
    const int n = static_cast<int>(Lk - j0 < 32 ? Lk - j0 : 32);
    for (int src = 0; src < n; ++src) {
      const float pj = __shfl_sync(kFull, p, src);
      const T* vr = vb + (j0 + src) * st.vn;
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D) acc[c] += pj * static_cast<float>(vr[d]);
      }
    }
    mx = m_new;
  }
  T* o = out + ((b * Lq + i) * H + h) * D;
#pragma unroll
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    if (d < D) o[d] = static_cast<T>(acc[c] / l);
  }
}

template <typename T, typename TM, int DPL, int VEC>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const TM* m, const int8_t* lift,
            const Strides& st, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  const int H = q.size(2), D = q.size(3);
  const int64_t blocks = B * H * ((Lq + kWarps - 1) / kWarps);  // checked by masked_attention_cuda
  const size_t smem = sizeof(float) * kWarps * D;
  masked_attention_kernel<T, TM, DPL, VEC><<<static_cast<unsigned>(blocks), kWarps * 32, smem,
                                             c10::cuda::getCurrentCUDAStream()>>>(
      q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), m, lift, out.mutable_data_ptr<T>(), st,
      B * H, H, Lq, Lk, D, static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Channels per lane from D; key rows in 16-byte loads when D, the row strides and k allow it.
template <typename T, typename TM>
void launch_for_head_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const TM* m,
                         const int8_t* lift, const Strides& st, double scale, at::Tensor& out) {
  constexpr int kVec = 16 / sizeof(T);
  const int D = q.size(3);
  const bool wide = D % kVec == 0 && st.kn % kVec == 0 && st.kh % kVec == 0 && st.kb % kVec == 0 &&
                    reinterpret_cast<uintptr_t>(k.const_data_ptr()) % 16 == 0;
  auto go = [&](auto dpl) {
    constexpr int DPL = decltype(dpl)::value;
    if (wide) return launch<T, TM, DPL, kVec>(q, k, v, m, lift, st, scale, out);
    launch<T, TM, DPL, 1>(q, k, v, m, lift, st, scale, out);
  };
  if (D <= 32) return go(std::integral_constant<int, 1>{});
  if (D <= 64) return go(std::integral_constant<int, 2>{});
  go(std::integral_constant<int, 4>{});
}

}  // namespace

at::Tensor masked_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask_logits, double scale) {
  TORCH_CHECK(q.is_cuda(), "masked_attention (CUDA kernel): q must be on a CUDA device, got ", device_str(q));
  check_masked_attention_args(q, k, v, mask_logits);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  // Offsets are int64; only the grid is bounded: kWarps query rows per block (the lift kernel's
  // 8 rows per block then fit too).
  const int64_t blocks = B * q.size(2) * ((Lq + kWarps - 1) / kWarps);
  TORCH_CHECK(blocks <= INT32_MAX, "masked_attention (CUDA kernel): q has ", num(B * q.size(2) * Lq),
              " query rows (B * H * Lq), which need ", num(blocks),
              " blocks, more than a grid holds (limit 2**31 - 1)");
  Strides st{q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2), 0, 0};
  at::Tensor lift;
  if (mask_logits) {
    st.mb = mask_logits->stride(0);
    st.mq = mask_logits->stride(1);
    lift = at::empty({B, Lq}, q.options().dtype(at::kChar));
  }
  const auto mdtype = mask_logits ? mask_logits->scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "masked_attention_cuda", [&] {
    using T = scalar_t;
    auto run = [&](auto* tag) {
      using TM = std::remove_pointer_t<decltype(tag)>;
      const TM* m = nullptr;
      const int8_t* lp = nullptr;
      if (mask_logits) {
        m = mask_logits->const_data_ptr<TM>();
        const int64_t rows = B * Lq;
        const auto lift_blocks = static_cast<unsigned>((rows * 32 + 255) / 256);
        masked_attention_lift_kernel<TM><<<lift_blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
            m, lift.mutable_data_ptr<int8_t>(), st.mb, st.mq, rows, Lq, Lk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        lp = lift.const_data_ptr<int8_t>();
      }
      launch_for_head_dim<T, TM>(q, k, v, m, lp, st, scale, out);
    };
    if constexpr (!std::is_same_v<T, double>) {
      if (mdtype == at::kFloat) {
        run(static_cast<float*>(nullptr));
      } else {
        run(static_cast<T*>(nullptr));  // q's dtype (checked)
      }
    }
  });
  return out;
}

}  // namespace fastdino
