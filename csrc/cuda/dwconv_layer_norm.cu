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
// (C <= 2048). Tile sizes are set by design, not yet tuned on a GPU.
// The window is loaded in the order of x's fastest dim (channels for channels-last, width for
// NCHW) so that global reads coalesce either way; shared memory holds it channel-fastest, so the
// conv's threads (consecutive channels) read consecutive banks.
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
  int C, H, W, TH, CC, tiles_h, tiles_w;  // CC: channels per chunk, kThreads / TH
  int64_t sb, sc, sh, sw;  // x's strides
  bool channels_fastest;   // x's fastest dim is C (channels-last)
};

template <typename T>
__global__ void __launch_bounds__(kThreads) dwconv_layer_norm_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const T* __restrict__ norm_weight, const T* __restrict__ norm_bias, T* __restrict__ z, Geometry g, float eps) {
  extern __shared__ float smem[];
  const int TH = g.TH, CC = g.CC, HH = TH + K - 1, HW = kTW + K - 1, P = TH * kTW, C = g.C;
  float* ys = smem;               // (P, C) conv outputs, rounded to T
  float* win = ys + P * C;        // (HH, HW, CC) input window of one chunk
  float* wts = win + HH * HW * CC;  // (CC, K * K) weights of one chunk

  int64_t t = blockIdx.x;
  const int tw = static_cast<int>(t % g.tiles_w);
  t /= g.tiles_w;
  const int th = static_cast<int>(t % g.tiles_h);
  const int64_t b = t / g.tiles_h;
  const int h0 = th * TH, w0 = tw * kTW;
  const T* xb = x + b * g.sb;

  for (int c0 = 0; c0 < C; c0 += CC) {
    const int cc = min(CC, C - c0);
    __syncthreads();  // the previous chunk's readers are done with win and wts
    const int n = HH * HW * cc;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      int c, py, px;
      if (g.channels_fastest) {
        c = i % cc;
        px = (i / cc) % HW;
        py = i / (cc * HW);
      } else {
        px = i % HW;
        py = (i / HW) % HH;
        c = i / (HW * HH);
      }
      const int gy = h0 + py - K / 2, gx = w0 + px - K / 2;
      float v = 0.f;
      if (gy >= 0 && gy < g.H && gx >= 0 && gx < g.W) {
        v = static_cast<float>(xb[(c0 + c) * g.sc + gy * g.sh + gx * g.sw]);
      }
      win[(py * HW + px) * CC + c] = v;
    }
    for (int i = threadIdx.x; i < cc * K * K; i += kThreads) {
      wts[i] = static_cast<float>(weight[static_cast<int64_t>(c0) * K * K + i]);
    }
    __syncthreads();
    const int c = threadIdx.x % CC, py = threadIdx.x / CC;  // this thread's channel and tile row
    if (c < cc && py < TH) {
      const float* wc = wts + c * K * K;
      const float b0 = bias != nullptr ? static_cast<float>(bias[c0 + c]) : 0.f;
      float acc[kTW];
#pragma unroll
      for (int px = 0; px < kTW; ++px) acc[px] = b0;
#pragma unroll
      for (int dy = 0; dy < K; ++dy) {
        float row[kTW + K - 1];
        const float* wr = win + (py + dy) * HW * CC + c;
#pragma unroll
        for (int j = 0; j < kTW + K - 1; ++j) row[j] = wr[j * CC];
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

size_t smem_bytes(int C, int TH, int CC) {
  return sizeof(float) * (static_cast<size_t>(TH) * kTW * C + (TH + K - 1) * (kTW + K - 1) * CC + CC * K * K);
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
  g.TH = tile_height(g.C);
  g.CC = kThreads / g.TH;
  g.tiles_h = (g.H + g.TH - 1) / g.TH;
  g.tiles_w = (g.W + kTW - 1) / kTW;
  g.sb = x.stride(0);
  g.sc = x.stride(1);
  g.sh = x.stride(2);
  g.sw = x.stride(3);
  g.channels_fastest = g.sc == 1 && g.C > 1;
  const int64_t blocks = B * g.tiles_h * g.tiles_w;
  TORCH_CHECK(blocks <= INT32_MAX, "dwconv_layer_norm: too many tiles (", num(blocks), ")");
  const size_t smem = smem_bytes(g.C, g.TH, g.CC);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_layer_norm_cuda", [&] {
    auto kernel = dwconv_layer_norm_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, norm_weight.const_data_ptr<scalar_t>(),
        norm_bias.const_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(), g, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) { m.impl("dwconv_layer_norm", &dwconv_layer_norm_cuda); }

}  // namespace fastdino
