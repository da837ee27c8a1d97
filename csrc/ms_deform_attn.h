// ms_deform_attn: multi-scale deformable attention (Deformable DETR; the ViT-Adapter's extractors
// and the Mask2Former pixel decoder). For every query q and head h:
//   out[q, h, :] = sum over levels l, points p of  weight[q, h, l, p] * bilinear(value_l[h], loc[q, h, l, p])
// with F.grid_sample's align_corners=False convention (pixel x = loc_x * W - 0.5) and zero padding:
// each of the four corners outside the map contributes 0. This header holds the sampling math the
// CPU and CUDA kernels share; accumulation is fp32 whatever the storage type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace fastdino {

// The four bilinear corners of one sample: row offsets (y * W + x) into the level and their weights;
// a corner outside the map gets offset -1 (never read). A corner inside is read even where its weight
// is 0, as grid_sample does: a NaN or Inf value there reaches the output (0 * Inf = NaN).
struct Corners {
  int64_t off[4];
  float w[4];
};

// v - v is 0 for a finite v and NaN for an infinite or NaN one (no fast-math in this build).
C10_HOST_DEVICE inline bool is_finite(float v) { return v - v == 0.0f; }

C10_HOST_DEVICE inline Corners bilinear_corners(float x, float y, int64_t H, int64_t W) {
  const float xf = floorf(x), yf = floorf(y);
  const float fx = x - xf, fy = y - yf;
  Corners c;
  // Locations far outside [0, 1] give coordinates that need not fit an int: test in float.
  const float x_max = static_cast<float>(W - 1), y_max = static_cast<float>(H - 1);
  const bool x_in[2] = {xf >= 0.0f && xf <= x_max, xf + 1.0f >= 0.0f && xf + 1.0f <= x_max};
  const bool y_in[2] = {yf >= 0.0f && yf <= y_max, yf + 1.0f >= 0.0f && yf + 1.0f <= y_max};
  const float wx[2] = {1.0f - fx, fx}, wy[2] = {1.0f - fy, fy};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int dy = i >> 1, dx = i & 1;
    const bool in = y_in[dy] && x_in[dx];
    c.w[i] = wy[dy] * wx[dx];
    c.off[i] = in ? (static_cast<int64_t>(yf) + dy) * W + static_cast<int64_t>(xf) + dx : -1;
  }
  return c;
}

// One sample of weight `a` at (loc_x, loc_y) in a level of H x W rows starting at `start`: add_row(row, weight)
// for each corner inside the map. Rows outside [0, S) (shapes or starts that disagree with value's length)
// are skipped, so bad level tensors read nothing out of bounds without a host-side check. NaN and Inf
// follow F.grid_sample (what the models run): a non-finite location, or a non-finite weight on a sample
// whose corners all fall outside the map, makes the query-head's output NaN.
template <typename AddRow>
C10_HOST_DEVICE inline void ms_deform_attn_sample(float loc_x, float loc_y, float a, int64_t H, int64_t W,
                                                  int64_t start, int64_t S, AddRow& add_row) {
  const float x = loc_x * static_cast<float>(W) - 0.5f, y = loc_y * static_cast<float>(H) - 0.5f;
  if (!is_finite(x) || !is_finite(y)) {
    if (S > 0) add_row(0, NAN);
    return;
  }
  const Corners c = bilinear_corners(x, y, H, W);
  bool read = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = start + c.off[i];
    if (c.off[i] >= 0 && row >= 0 && row < S) {
      add_row(row, a * c.w[i]);
      read = true;
    }
  }
  if (!read && !is_finite(a) && S > 0) add_row(0, NAN);  // grid_sample: a * 0
}

// One query-head's output: sum over levels and points of weight * bilinear sample, accumulated by
// `add_row(row, weight)` (fp32) from sampling locations and softmaxed weights. Levels are packed in
// order: each one's first row is derived from the shapes here, never read from level_start_index,
// so kernels and reference agree on one layout whatever index a caller passes.
template <typename TL, typename AddRow>
C10_HOST_DEVICE inline void ms_deform_attn_samples(const TL* loc, const TL* attw, const int64_t* shapes, int L, int P,
                                                   int64_t S, AddRow add_row) {
  int64_t start = 0;
  for (int l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    for (int p = 0; p < P; ++p) {
      const int s = l * P + p;
      ms_deform_attn_sample(static_cast<float>(loc[2 * s]), static_cast<float>(loc[2 * s + 1]),
                            static_cast<float>(attw[s]), H, W, start, S, add_row);
    }
    start += H * W;
  }
}

// The same from what the module's projections give, with the two steps around the sampling fused:
// the softmax of the L * P logits (fp32), and the locations from reference points `ref` (per level:
// R = 2, (x, y) + offset / (W, H); R = 4, a box (x, y, w, h): (x, y) + offset / P * (w, h) * 0.5),
// in the order Deformable DETR computes them.
template <typename TL, typename AddRow>
C10_HOST_DEVICE inline void ms_deform_attn_offset_samples(const float* ref, int R, const TL* off, const TL* logits,
                                                          const int64_t* shapes, int L, int P, int64_t S,
                                                          AddRow add_row) {
  const int n = L * P;
  float m = -INFINITY;
  for (int s = 0; s < n; ++s) m = fmaxf(m, static_cast<float>(logits[s]));
  float sum = 0.0f;
  for (int s = 0; s < n; ++s) sum += expf(static_cast<float>(logits[s]) - m);
  const float inv = 1.0f / sum;
  int64_t start = 0;  // packed levels, as in ms_deform_attn_samples
  for (int l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const float* r = ref + l * R;
    for (int p = 0; p < P; ++p) {
      const int s = l * P + p;
      const float ox = static_cast<float>(off[2 * s]), oy = static_cast<float>(off[2 * s + 1]);
      const float lx = R == 2 ? r[0] + ox / static_cast<float>(W) : r[0] + ox / static_cast<float>(P) * r[2] * 0.5f;
      const float ly = R == 2 ? r[1] + oy / static_cast<float>(H) : r[1] + oy / static_cast<float>(P) * r[3] * 0.5f;
      ms_deform_attn_sample(lx, ly, expf(static_cast<float>(logits[s]) - m) * inv, H, W, start, S, add_row);
    }
    start += H * W;
  }
}

// Argument checks shared by every backend of the C++ op; messages name the argument.
inline void check_ms_deform_attn_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights,
                                      const std::optional<at::Tensor>& reference_points) {
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "ms_deform_attn: value must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, heads, Dh), got shape ", shape_str(value));
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn: value must be contiguous");
  const int64_t B = value.size(0), Hh = value.size(2);
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == B && sampling_locations.size(2) == Hh &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (B=", num(B), ", Lq, heads=", num(Hh), ", L, P, 2), got ",
              shape_str(sampling_locations));
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  // Offsets are int64; heads, channels and samples per query-head are held in int.
  TORCH_CHECK(Hh <= INT32_MAX && value.size(3) <= INT32_MAX && L * P <= INT32_MAX, "ms_deform_attn: value has ",
              num(Hh), " heads of ", num(value.size(3)), " channels, sampling_locations ", num(L), " * ", num(P),
              " samples per query-head; the C++ kernels count each in 32 bits (limit 2**31 - 1)");
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == B && attention_weights.size(1) == Lq &&
                  attention_weights.size(2) == Hh && attention_weights.size(3) == L && attention_weights.size(4) == P,
              "ms_deform_attn: attention_weights must be (", num(B), ", ", num(Lq), ", ", num(Hh), ", ", num(L), ", ",
              num(P), ") like sampling_locations, got ", shape_str(attention_weights));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64 (L=", num(L), ", 2), got ", shape_str(spatial_shapes), " ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64 (L=", num(L), ",), got ", shape_str(level_start_index),
              " ", level_start_index.scalar_type());
  const auto ldtype = sampling_locations.scalar_type();
  TORCH_CHECK(ldtype == at::kFloat || ldtype == dtype,
              "ms_deform_attn: sampling_locations must be float32 or value's dtype ", dtype, ", got ", ldtype);
  TORCH_CHECK(attention_weights.scalar_type() == ldtype, "ms_deform_attn: attention_weights has dtype ",
              attention_weights.scalar_type(), " but sampling_locations has ", ldtype);
  TORCH_CHECK(sampling_locations.is_contiguous() && attention_weights.is_contiguous() &&
                  spatial_shapes.is_contiguous() && level_start_index.is_contiguous(),
              "ms_deform_attn: sampling_locations, attention_weights, spatial_shapes and level_start_index must be "
              "contiguous");
  for (const auto* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: every tensor must be on value's device ",
                device_str(value), ", got one on ", device_str(*t));
  }
  if (!reference_points) return;
  const auto& ref = *reference_points;
  TORCH_CHECK(ref.dim() == 4 && (ref.size(0) == 1 || ref.size(0) == B) && ref.size(1) == Lq && ref.size(2) == L &&
                  (ref.size(3) == 2 || ref.size(3) == 4),
              "ms_deform_attn: reference_points must be (B=", num(B), " or 1, Lq=", num(Lq), ", L=", num(L),
              ", 2 or 4), got ", shape_str(ref));
  TORCH_CHECK(ref.scalar_type() == at::kFloat, "ms_deform_attn: reference_points must be float32, got ",
              ref.scalar_type());
  TORCH_CHECK(ref.is_contiguous(), "ms_deform_attn: reference_points must be contiguous");
  TORCH_CHECK(ref.device() == value.device(), "ms_deform_attn: reference_points is on ", device_str(ref),
              " but value is on ", device_str(value));
}

}  // namespace fastdino
