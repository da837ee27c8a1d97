// ms_deform_attn, C++ form: the CPU kernel here, the CUDA kernel in cuda/ms_deform_attn.cu; both
// run the sampling steps of the header: ms_deform_attn_samples on locations and softmaxed weights, or,
// given reference_points, ms_deform_attn_offset_samples on the raw offsets and logits (softmax and
// location arithmetic fused). Output (B, Lq, heads * Dh) in value's dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn.h"

namespace fastdino {
namespace {

template <typename T, typename TL>
void ms_deform_attn_rows_cpu(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc,
                             const at::Tensor& attw, const std::optional<at::Tensor>& ref, at::Tensor& out) {
  const int64_t B = value.size(0), S = value.size(1), Hh = value.size(2), Dh = value.size(3);
  const int64_t Lq = loc.size(1);
  const int L = static_cast<int>(loc.size(3)), P = static_cast<int>(loc.size(4));
  const T* v = value.const_data_ptr<T>();
  const TL* lp = loc.const_data_ptr<TL>();
  const TL* ap = attw.const_data_ptr<TL>();
  const int64_t* sp = shapes.const_data_ptr<int64_t>();
  // Reference points (B or 1, Lq, L, R): batch stride 0 when one set serves the whole batch.
  const float* rp = ref ? ref->const_data_ptr<float>() : nullptr;
  const int R = ref ? static_cast<int>(ref->size(3)) : 0;
  const int64_t ref_b = ref && ref->size(0) > 1 ? Lq * L * R : 0;
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * Lq, std::max<int64_t>(1, 256 / Hh), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Dh);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Lq;
      for (int64_t h = 0; h < Hh; ++h) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int64_t qh = bq * Hh + h;
        auto add_row = [&](int64_t row, float w) {
          const T* src = v + ((b * S + row) * Hh + h) * Dh;
          for (int64_t d = 0; d < Dh; ++d) acc[d] += w * static_cast<float>(src[d]);
        };
        if (rp) {
          const float* r = rp + b * ref_b + (bq - b * Lq) * L * R;
          ms_deform_attn_offset_samples(r, R, lp + qh * L * P * 2, ap + qh * L * P, sp, L, P, S, add_row);
        } else {
          ms_deform_attn_samples(lp + qh * L * P * 2, ap + qh * L * P, sp, L, P, S, add_row);
        }
        for (int64_t d = 0; d < Dh; ++d) o[qh * Dh + d] = static_cast<T>(acc[d]);
      }
    }
  });
}

// The level shapes and starts, held on the host with the CPU kernel, against value's S: checked here
// (a few integers) so that Python dispatch need not read them on every call.
void check_levels_cpu(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t S) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* hw = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  int64_t packed = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(hw[2 * l] >= 1 && hw[2 * l + 1] >= 1, "ms_deform_attn: spatial_shapes must be positive (H, W), got ",
                num(hw[2 * l]), " x ", num(hw[2 * l + 1]), " at level ", num(l));
    TORCH_CHECK(starts[l] == packed, "ms_deform_attn: level_start_index must be where the levels of spatial_shapes "
                "start when packed in order: ", num(packed), " at level ", num(l), ", got ", num(starts[l]));
    TORCH_CHECK(hw[2 * l] <= S && hw[2 * l + 1] <= S / hw[2 * l] && packed <= S - hw[2 * l] * hw[2 * l + 1],
                "ms_deform_attn: spatial_shapes cover more rows than value has (S=", num(S), ")");
    packed += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK(packed == S, "ms_deform_attn: spatial_shapes cover ", num(packed), " rows but value has S=", num(S),
              " (the levels flattened one after the other)");
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights,
                              const std::optional<at::Tensor>& reference_points) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn (CPU kernel): value must be on the CPU, got ", device_str(value));
  check_ms_deform_attn_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                            reference_points);
  check_levels_cpu(spatial_shapes, level_start_index, value.size(1));
  auto out = at::empty({value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)}, value.options());
  if (out.numel() == 0) return out;
  const bool fp32_loc = sampling_locations.scalar_type() == at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    if (fp32_loc) {
      ms_deform_attn_rows_cpu<scalar_t, float>(value, spatial_shapes, sampling_locations,
                                               attention_weights, reference_points, out);
    } else {
      ms_deform_attn_rows_cpu<scalar_t, scalar_t>(value, spatial_shapes, sampling_locations,
                                                  attention_weights, reference_points, out);
    }
  });
  return out;
}

}  // namespace

#ifdef FASTDINO_WITH_CUDA
at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights,
                               const std::optional<at::Tensor>& reference_points);  // cuda/ms_deform_attn.cu

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("ms_deform_attn", &ms_deform_attn_cuda); }
#endif

TORCH_LIBRARY_IMPL(fastdino, CPU, m) { m.impl("ms_deform_attn", &ms_deform_attn_cpu); }

}  // namespace fastdino
