"""dwconv_layer_norm: cuDNN's depthwise conv + LayerNorm (eager, NCHW and channels-last input),
torch.compile of it, Triton, CUDA, and a copy of the same bytes.

Bytes moved per call: read x, write z (2 * B * C * H * W * itemsize; the weights are negligible
and the 7x7 halo is re-read from cache, not DRAM). The copy provider moves the same bytes, so GB/s
over the copy's GB/s is the fraction of achievable bandwidth. The fused providers read a
channels-last x, as a patched ConvNeXt stage hands its blocks.
"""

import pytest
import torch
import torch.nn.functional as F
from timing import bench_device, bench_ms, cuda_timer, providers, quick

from fastdino.ops import dwconv_layer_norm

CUDA = torch.cuda.is_available()
# (B, C, H, W): ConvNeXt stages at 512^2 (maps 128, 64, 32, 16) for T (96..768) and L (1536),
# batch 1 and 32; stage 1 at batch 32 is the bandwidth target.
SHAPES = ([(32, 96, 128, 128), (1, 96, 128, 128), (1, 192, 64, 64), (1, 384, 32, 32), (1, 768, 16, 16),
           (32, 768, 16, 16), (1, 1536, 16, 16)] if CUDA else [(1, 96, 32, 32)])
SHAPES = quick(SHAPES, (0, 1))  # stage 1 of ConvNeXt-T at batch 32 (the bandwidth target) and 1
PROVIDERS = providers(["eager", "eager-cl", "compile", "triton", "cuda", "copy"] if CUDA
                      else ["eager", "cpu"])


def eager(x, weight, bias, norm_weight, norm_bias):
    y = F.conv2d(x, weight, bias, padding=3, groups=x.shape[1]).permute(0, 2, 3, 1)
    return F.layer_norm(y, (x.shape[1],), norm_weight, norm_bias, 1e-6)


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,C,H,W", SHAPES, ids=lambda v: str(v))
def test_bench_dwconv_layer_norm(benchmark, B, C, H, W, provider):
    device, dtype = bench_device(provider)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    if provider != "eager":
        x = x.to(memory_format=torch.channels_last)
    vec = lambda: torch.randn(C, device=device, dtype=dtype)  # noqa: E731
    args = (x, torch.randn(C, 1, 7, 7, device=device, dtype=dtype) / 7, vec(), vec(), vec())
    if provider in ("eager", "eager-cl"):
        fn = lambda: eager(*args)  # noqa: E731
    elif provider == "compile":
        compiled = torch.compile(eager)
        fn = lambda: compiled(*args)  # noqa: E731
    elif provider == "copy":
        dst = torch.empty_like(x)
        fn = lambda: dst.copy_(x)  # noqa: E731
    else:
        fn = lambda: dwconv_layer_norm(*args, eps=1e-6, backend=provider)  # noqa: E731
    shape = f"B={B} C={C} {H}x{W}"
    benchmark.group = f"dwconv_layer_norm {shape} {dtype}"
    benchmark.extra_info.update(op="dwconv_layer_norm", shape=shape, dtype=str(dtype), provider=provider,
                                baselines=["copy"])
    ms = bench_ms(benchmark, fn, rounds=20, iterations=5)
    nbytes = 2 * x.numel() * x.element_size()
    if ms:
        benchmark.extra_info.update(ms=ms, metric="GB/s", value=nbytes / ms / 1e6)


# Batch sizes that change every call (dinov3 issue #172: cuDNN's depthwise conv re-tuned per shape),
# against the fixed batch of the same mean; images per second is the figure to compare.
VARYING = [30, 250, 77, 143, 201, 58, 112, 189] if CUDA else [1, 3, 2]


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", ["eager-cl", "triton", "cuda"] if CUDA else ["eager-cl", "cpu"])
@pytest.mark.parametrize("batches", ["varying", "fixed"])
def test_bench_dwconv_layer_norm_varying_batch(benchmark, batches, provider):
    device, dtype = bench_device(provider)
    C, H = 96, 64 if CUDA else 16
    sizes = VARYING if batches == "varying" else [sum(VARYING) // len(VARYING)] * len(VARYING)
    x = torch.randn(max(sizes), C, H, H, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    vec = lambda: torch.randn(C, device=device, dtype=dtype)  # noqa: E731
    params = (torch.randn(C, 1, 7, 7, device=device, dtype=dtype) / 7, vec(), vec(), vec())
    if provider == "eager-cl":
        one = lambda b: eager(x[:b], *params)  # noqa: E731
    else:
        one = lambda b: dwconv_layer_norm(x[:b], *params, eps=1e-6, backend=provider)  # noqa: E731

    def fn():
        for b in sizes:
            one(b)

    benchmark.group = f"dwconv_layer_norm batch {batches} C={C} {H}x{H} {dtype}"
    benchmark.extra_info.update(op="dwconv_layer_norm", shape=f"batch {batches} C={C} {H}x{H}",
                                dtype=str(dtype), provider=provider)
    ms = bench_ms(benchmark, fn, rounds=5, iterations=1)
    if ms:
        benchmark.extra_info.update(ms=ms, metric="img/s", value=sum(sizes) / ms * 1e3)
