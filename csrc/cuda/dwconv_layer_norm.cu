// CUDA kernel of dwconv_layer_norm.
//
// Memory-bound: x is read once from DRAM and z written once. A block owns a tile of TH x kTW
// output pixels of one image with all their channels. Channel chunk by chunk (CC = 256 / TH
// channels, so that every thread has one (tile row, channel) item), it stages the tile's input
// window, halo included ((TH + 6) x (kTW + 6) pixels), and the chunk's 7x7 weights in shared
// memory, so each input value is fetched from global memory once per tile however many taps read
// it. A thread then computes the kTW outputs of its row and channel from registers: per input row
// it loads the kTW + 6 window values once and applies its 7 taps to all kTW outputs (18 shared
// loads per output instead of 98). The conv outputs, rounded to T, collect in shared memory
// ((TH * kTW, C) floats); then one warp per pixel takes fp32 statistics over its channels and
// writes the pixel's C tokens, coalesced. TH shrinks as C grows so that the outputs fit in 64 KB
// (C <= 2048); it is a template parameter (8, 4, 2, 1, picked on the host), so the window's
// extents and the chunk width are constants and the staging loop's divisions compile to
// multiplies and shifts. Tile sizes are set by design, not yet tuned on a GPU.
// The window is loaded in the order of x's fastest dim (channels for channels-last, width for
// NCHW) so that global reads coalesce either way; shared memory holds it channel-fastest, so the
// conv's threads (consecutive channels) read consecutive banks. Its pixel stride is CC + 1 words,
// not CC (a multiple of 32): NCHW staging has consecutive threads on consecutive pixels, which a
// stride of CC would put on one bank (a 32-way conflict per store).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dwconv_layer_norm.h"

namespace fastdino {
namespace {

constexpr int K = static_cast<int>(kDwconvK);
constexpr int kTW = 8;  // tile width in pixels: the outputs one thread computes
constexpr int kThreads = 256;
constexpr int kMaxTileBytes = 64 * 1024;  // conv outputs of one tile
constexpr int kMaxC = kMaxTileBytes / (kTW * 4);

struct Geometry {
  int C, H, W, tiles_h, tiles_w;
  int64_t sb, sc, sh, sw;  // x's strides
  bool channels_fastest;   // x's fastest dim is C (channels-last)
};

// Shared-memory extents of a tile TH pixels high, in floats.
template <int TH>
struct Tile {
  static constexpr int CC = kThreads / TH;   // channels per chunk: one (row, channel) item per thread
  static constexpr int CS = CC + 1;          // the window's pixel stride (padded, see the header)
  static constexpr int HH = TH + K - 1;      // window rows
  static constexpr int HW = kTW + K - 1;     // window columns
  static constexpr int P = TH * kTW;         // output pixels
  static constexpr int kWindow = HH * HW * CS;
  static constexpr int kWeights = CC * K * K;
};

// Loads in flight per thread while staging: a divisor of the staging iterations (no idle tail).
constexpr int loads_in_flight(int iters) {
  return iters % 8 == 0 ? 8 : iters % 7 == 0 ? 7 : iters % 6 == 0 ? 6 : iters % 5 == 0 ? 5 : 4;
}

// Stages channels [c0, c0 + cc) of the tile's input window, zero outside the image: every
// (py, px, c) of the chunk once, the channels >= cc (only in the last chunk) skipped. Extents are
// constants, so the index math is multiplies and shifts. Each thread issues U predicated loads
// before it stores any: one load in flight per thread cannot cover DRAM latency with a few CTAs.
template <typename T, int TH, bool kChannelsFastest>
__device__ __forceinline__ void stage_window(const T* __restrict__ xb, float* __restrict__ win, const Geometry& g,
                                             int h0, int w0, int c0, int cc) {
  using Tl = Tile<TH>;
  constexpr int CC = Tl::CC, CS = Tl::CS, HH = Tl::HH, HW = Tl::HW;
  constexpr int N = HH * HW * CC, kIters = (N + kThreads - 1) / kThreads, U = loads_in_flight(kIters);
  static_assert(kIters % U == 0, "whole groups of loads");
#pragma unroll 1
  for (int k0 = 0; k0 < kIters; k0 += U) {
    float v[U];
    int dst[U];  // the value's place in win, -1: nothing to store
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = threadIdx.x + (k0 + u) * kThreads;
      int c, py, px;
      if (kChannelsFastest) {  // i = (py * HW + px) * CC + c: a warp reads 32 channels of one pixel
        c = i % CC;
        px = (i / CC) % HW;
        py = i / (CC * HW);
      } else {  // i = (c * HH + py) * HW + px: a warp reads along rows of one channel
        px = i % HW;
        py = (i / HW) % HH;
        c = i / (HW * HH);
      }
      const bool used = i < N && c < cc;
      const int gy = h0 + py - K / 2, gx = w0 + px - K / 2;
      const bool inside = used && gy >= 0 && gy < g.H && gx >= 0 && gx < g.W;
      v[u] = inside ? static_cast<float>(xb[(c0 + c) * g.sc + gy * g.sh + gx * g.sw]) : 0.f;
      dst[u] = used ? (py * HW + px) * CS + c : -1;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] >= 0) win[dst[u]] = v[u];
    }
  }
}

template <typename T, int TH>
__global__ void __launch_bounds__(kThreads) dwconv_layer_norm_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const T* __restrict__ norm_weight, const T* __restrict__ norm_bias, T* __restrict__ z, Geometry g, float eps) {
  using Tl = Tile<TH>;
  constexpr int CC = Tl::CC, CS = Tl::CS, HW = Tl::HW, P = Tl::P;
  static_assert(CC * TH == kThreads && CC % 32 == 0, "a chunk is whole warps of channels");
  extern __shared__ float smem[];
  const int C = g.C;
  float* ys = smem;                 // (P, C) conv outputs, rounded to T
  float* win = ys + P * C;          // (HH, HW, CS) input window of one chunk, channels [0, CC) used
  float* wts = win + Tl::kWindow;   // (CC, K * K) weights of one chunk

  int64_t t = blockIdx.x;
  const int tw = static_cast<int>(t % g.tiles_w);
  t /= g.tiles_w;
  const int th = static_cast<int>(t % g.tiles_h);
  const int64_t b = t / g.tiles_h;
  const int h0 = th * TH, w0 = tw * kTW;
  const T* xb = x + b * g.sb;

  for (int c0 = 0; c0 < C; c0 += CC) {
    const int cc = min(CC, C - c0);  // CC except in the last chunk
    __syncthreads();  // the previous chunk's readers are done with win and wts
    if (g.channels_fastest) {
      stage_window<T, TH, true>(xb, win, g, h0, w0, c0, cc);
    } else {
      stage_window<T, TH, false>(xb, win, g, h0, w0, c0, cc);
    }
    for (int i = threadIdx.x; i < cc * K * K; i += kThreads) {
      wts[i] = static_cast<float>(weight[static_cast<int64_t>(c0) * K * K + i]);
    }
    __syncthreads();
    const int c = threadIdx.x % CC, py = threadIdx.x / CC;  // this thread's channel and tile row
    if (c < cc) {
      const float* wc = wts + c * K * K;  // a warp reads 32 channels 49 words apart: 49 odd, no conflict
      const float b0 = bias != nullptr ? static_cast<float>(bias[c0 + c]) : 0.f;
      float acc[kTW];
#pragma unroll
      for (int px = 0; px < kTW; ++px) acc[px] = b0;
#pragma unroll
      for (int dy = 0; dy < K; ++dy) {
        float row[HW];
        const float* wr = win + (py + dy) * HW * CS + c;
#pragma unroll
        for (int j = 0; j < HW; ++j) row[j] = wr[j * CS];
#pragma unroll
        for (int dx = 0; dx < K; ++dx) {
          const float w = wc[dy * K + dx];
#pragma unroll
          for (int px = 0; px < kTW; ++px) acc[px] += row[px + dx] * w;
        }
      }
#pragma unroll
      for (int px = 0; px < kTW; ++px) ys[(py * kTW + px) * C + c0 + c] = round_to<T>(acc[px]);
    }
  }
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int p = warp; p < P; p += kThreads / 32) {
    const int gy = h0 + p / kTW, gx = w0 + p % kTW;
    if (gy >= g.H || gx >= g.W) continue;  // warp-uniform: the tile's overhang
    const float* y = ys + p * C;
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) sum += y[c];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float mean = sum / C;
    float sq = 0.f;
    for (int c = lane; c < C; c += 32) sq += (y[c] - mean) * (y[c] - mean);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    const float rstd = rsqrtf(sq / C + eps);
    T* zp = z + ((b * g.H + gy) * g.W + gx) * C;
    for (int c = lane; c < C; c += 32) {
      zp[c] = static_cast<T>(normalize(y[c], mean, rstd, static_cast<float>(norm_weight[c]),
                                       static_cast<float>(norm_bias[c])));
    }
  }
}

// Tile height: the largest power of two <= 8 whose outputs fit in kMaxTileBytes.
int tile_height(int C) {
  int th = 8;
  while (th > 1 && th * kTW * C * 4 > kMaxTileBytes) th /= 2;
  return th;
}

template <int TH>
size_t smem_bytes(int C) {
  using Tl = Tile<TH>;
  return sizeof(float) * (static_cast<size_t>(Tl::P) * C + Tl::kWindow + Tl::kWeights);
}

template <typename T, int TH>
void launch(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const at::Tensor& norm_weight, const at::Tensor& norm_bias, at::Tensor& z, Geometry g, float eps) {
  g.tiles_h = (g.H + TH - 1) / TH;
  const int64_t blocks = x.size(0) * g.tiles_h * g.tiles_w;
  TORCH_CHECK(blocks <= INT32_MAX, "dwconv_layer_norm: too many tiles (", num(blocks), ")");
  // at most 211 KB (TH 1, C 2048: 64 KB of outputs, a 7 x 14 x 257 window, 256 x 49 weights)
  const size_t smem = smem_bytes<TH>(g.C);
  auto kernel = dwconv_layer_norm_kernel<T, TH>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      x.const_data_ptr<T>(), weight.const_data_ptr<T>(), bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
      norm_weight.const_data_ptr<T>(), norm_bias.const_data_ptr<T>(), z.mutable_data_ptr<T>(), g, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_tile(int TH, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& norm_weight, const at::Tensor& norm_bias, at::Tensor& z, const Geometry& g,
                 float eps) {
  switch (TH) {
    case 8: return launch<T, 8>(x, weight, bias, norm_weight, norm_bias, z, g, eps);
    case 4: return launch<T, 4>(x, weight, bias, norm_weight, norm_bias, z, g, eps);
    case 2: return launch<T, 2>(x, weight, bias, norm_weight, norm_bias, z, g, eps);
    default: return launch<T, 1>(x, weight, bias, norm_weight, norm_bias, z, g, eps);
  }
}

at::Tensor dwconv_layer_norm_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  check_dwconv_layer_norm_args(x, weight, bias, norm_weight, norm_bias);
  TORCH_CHECK(x.size(1) <= kMaxC, "dwconv_layer_norm (CUDA kernel): x has ", num(x.size(1)),
              " channels, more than the supported maximum ", num(kMaxC));
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0);
  Geometry g;
  g.C = static_cast<int>(x.size(1));
  g.H = static_cast<int>(x.size(2));
  g.W = static_cast<int>(x.size(3));
  auto z = at::empty({B, g.H, g.W, g.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (z.numel() == 0) return z;
  g.tiles_w = (g.W + kTW - 1) / kTW;
  g.sb = x.stride(0);
  g.sc = x.stride(1);
  g.sh = x.stride(2);
  g.sw = x.stride(3);
  g.channels_fastest = g.sc == 1 && g.C > 1;
  const int TH = tile_height(g.C);
  const float e = static_cast<float>(eps);
  // float, half and bfloat16 (check_dwconv_layer_norm_args refuses the rest): no double kernels
  AT_DISPATCH_SWITCH(
      x.scalar_type(), "dwconv_layer_norm_cuda",
      AT_DISPATCH_CASE(at::kFloat, [&] { launch_tile<scalar_t>(TH, x, weight, bias, norm_weight, norm_bias, z, g, e); })
      AT_DISPATCH_CASE(at::kHalf, [&] { launch_tile<scalar_t>(TH, x, weight, bias, norm_weight, norm_bias, z, g, e); })
      AT_DISPATCH_CASE(at::kBFloat16,
                       [&] { launch_tile<scalar_t>(TH, x, weight, bias, norm_weight, norm_bias, z, g, e); }));
  return z;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("dwconv_layer_norm", &dwconv_layer_norm_cuda); }

}  // namespace fastdino
