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
  // Converted only where a corner on that axis is inside (else 0): defined for any float, and
  // the offsets below become selects rather than branches.
  const int64_t xi = static_cast<int64_t>(x_in[0] || x_in[1] ? xf : 0.0f);
  const int64_t yi = static_cast<int64_t>(y_in[0] || y_in[1] ? yf : 0.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int dy = i >> 1, dx = i & 1;
    const bool in = y_in[dy] && x_in[dx];
    c.w[i] = wy[dy] * wx[dx];
    c.off[i] = in ? (yi + dy) * W + xi + dx : -1;
  }
  return c;
}

// One sample of weight `a` at (loc_x, loc_y) in a level of H x W rows starting at `start`, ready to
// gather: row[i] (in value) and weight w[i] = a * bilinear weight of each corner, ok[i] where the corner
// is inside the map and its row inside [0, S) (shapes or starts that disagree with value's length read
// nothing out of bounds, without a host-side check). NaN and Inf follow F.grid_sample (what the models
// run): a non-finite location, or a non-finite weight on a sample whose corners all fall outside the
// map, sets `nan` (the query-head's output is NaN) with no corner ok.
struct SampleRows {
  int64_t row[4];
  float w[4];
  bool ok[4];
  bool nan;
};

C10_HOST_DEVICE inline SampleRows sample_rows(float loc_x, float loc_y, float a, int64_t H, int64_t W, int64_t start,
                                              int64_t S) {
  const float x = loc_x * static_cast<float>(W) - 0.5f, y = loc_y * static_cast<float>(H) - 0.5f;
  // A NaN or infinite x or y fails every bounds test in bilinear_corners: no corner is inside.
  const Corners c = bilinear_corners(x, y, H, W);
  SampleRows r;
  bool any = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    r.row[i] = start + c.off[i];
    r.ok[i] = c.off[i] >= 0 && r.row[i] >= 0 && r.row[i] < S;
    r.w[i] = a * c.w[i];
    any = any || r.ok[i];
  }
  // grid_sample: a * 0. Bitwise, not short-circuit: no branch.
  r.nan = !any & (S > 0) & !(is_finite(x) & is_finite(y) & is_finite(a));
  return r;
}

// The same as calls add_row(row, weight) for each corner read, then add_row(0, NaN) where `nan`.
template <typename AddRow>
C10_HOST_DEVICE inline void ms_deform_attn_sample(float loc_x, float loc_y, float a, int64_t H, int64_t W,
                                                  int64_t start, int64_t S, AddRow& add_row) {
  const SampleRows r = sample_rows(loc_x, loc_y, a, H, W, start, S);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (r.ok[i]) add_row(r.row[i], r.w[i]);
  }
  if (r.nan) add_row(0, NAN);
}

// Every sample of one query-head, level by level, from sampling locations and softmaxed weights:
// sample(loc_x, loc_y, weight, H, W, start). Levels are packed in order: each one's first row is
// derived from the shapes here, never read from level_start_index, so kernels and reference agree on
// one layout whatever index a caller passes. KL, KP > 0 fix L and P at compile time (the L, P
// arguments must then equal them) and the loops unroll; 0 keeps them runtime values.
template <int KL = 0, int KP = 0, typename TL, typename Sample>
C10_HOST_DEVICE inline void for_each_sample(const TL* loc, const TL* attw, const int64_t* shapes, int L, int P,
                                            Sample&& sample) {
  const int nl = KL > 0 ? KL : L, np = KP > 0 ? KP : P;
  int64_t start = 0;
#pragma unroll
  for (int l = 0; l < nl; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
#pragma unroll
    for (int p = 0; p < np; ++p) {
      const int s = l * np + p;
      sample(static_cast<float>(loc[2 * s]), static_cast<float>(loc[2 * s + 1]), static_cast<float>(attw[s]), H, W,
             start);
    }
    start += H * W;
  }
}

// The same from what the module's projections give, with the two steps around the sampling fused:
// the softmax of the L * P logits (fp32), and the locations from reference points `ref` (per level:
// R = 2, (x, y) + offset / (W, H); R = 4, a box (x, y, w, h): (x, y) + offset / P * (w, h) * 0.5),
// in the order Deformable DETR computes them. With KP > 0 a level's P locations are all formed before
// its first sample: the division by W, H branches (its slow path), and a GPU kernel's gathers of the
// level's samples then sit in one branch-free stretch of code.
template <int KL = 0, int KP = 0, typename TL, typename Sample>
C10_HOST_DEVICE inline void for_each_offset_sample(const float* ref, int R, const TL* off, const TL* logits,
                                                   const int64_t* shapes, int L, int P, Sample&& sample) {
  const int nl = KL > 0 ? KL : L, np = KP > 0 ? KP : P;
  const int n = nl * np;
  float m = -INFINITY;
#pragma unroll
  for (int s = 0; s < n; ++s) m = fmaxf(m, static_cast<float>(logits[s]));
  float sum = 0.0f;
#pragma unroll
  for (int s = 0; s < n; ++s) sum += expf(static_cast<float>(logits[s]) - m);
  const float inv = 1.0f / sum;
  int64_t start = 0;  // packed levels, as in for_each_sample
#pragma unroll
  for (int l = 0; l < nl; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const float* r = ref + l * R;
    auto locate = [&](int p, float& lx, float& ly, float& a) {
      const int s = l * np + p;
      const float ox = static_cast<float>(off[2 * s]), oy = static_cast<float>(off[2 * s + 1]);
      lx = R == 2 ? r[0] + ox / static_cast<float>(W) : r[0] + ox / static_cast<float>(np) * r[2] * 0.5f;
      ly = R == 2 ? r[1] + oy / static_cast<float>(H) : r[1] + oy / static_cast<float>(np) * r[3] * 0.5f;
      a = expf(static_cast<float>(logits[s]) - m) * inv;
    };
    if constexpr (KP > 0) {
      float lx[KP], ly[KP], a[KP];
#pragma unroll
      for (int p = 0; p < KP; ++p) locate(p, lx[p], ly[p], a[p]);
#pragma unroll
      for (int p = 0; p < KP; ++p) sample(lx[p], ly[p], a[p], H, W, start);
    } else {
      for (int p = 0; p < np; ++p) {
        float lx, ly, a;
        locate(p, lx, ly, a);
        sample(lx, ly, a, H, W, start);
      }
    }
    start += H * W;
  }
}

// One query-head's output from sampling locations and softmaxed weights: add_row(row, weight) (fp32
// accumulation) for every corner read, as ms_deform_attn_sample calls it.
template <typename TL, typename AddRow>
C10_HOST_DEVICE inline void ms_deform_attn_samples(const TL* loc, const TL* attw, const int64_t* shapes, int L, int P,
                                                   int64_t S, AddRow add_row) {
  for_each_sample(loc, attw, shapes, L, P, [&](float x, float y, float a, int64_t H, int64_t W, int64_t start) {
    ms_deform_attn_sample(x, y, a, H, W, start, S, add_row);
  });
}

// The same from reference points, raw offsets and logits (for_each_offset_sample).
template <typename TL, typename AddRow>
C10_HOST_DEVICE inline void ms_deform_attn_offset_samples(const float* ref, int R, const TL* off, const TL* logits,
                                                          const int64_t* shapes, int L, int P, int64_t S,
                                                          AddRow add_row) {
  for_each_offset_sample(ref, R, off, logits, shapes, L, P,
                         [&](float x, float y, float a, int64_t H, int64_t W, int64_t start) {
                           ms_deform_attn_sample(x, y, a, H, W, start, S, add_row);
                         });
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
