"""add_layer_norm: eager PyTorch, torch.compile of it, Triton, CUDA, and a copy of the same bytes.

Bytes moved per call: read x and branch, write y and z (4 * rows * C * itemsize; the (C,)
vectors are negligible). The copy provider moves the same bytes (a 2 * rows * C copy), so
GB/s over the copy's GB/s is the fraction of achievable bandwidth.
"""

import pytest
import torch
import torch.nn.functional as F
from timing import bench_device, bench_ms, cuda_timer, providers, quick

from fastdino.ops import add_layer_norm

CUDA = torch.cuda.is_available()
# (rows, C): ViT-S/16 and ViT-L/16 at 512^2 (1029 tokens) batch 32 and 1, ViT-7B at 1024^2 batch 1.
SHAPES = [(32 * 1029, 384), (32 * 1029, 1024), (1029, 384), (1029, 1024), (4101, 4096)] if CUDA else [(1029,
                                                                                                       384)]
SHAPES = quick(SHAPES, (2, 1))  # ViT-S batch 1, ViT-L batch 32
PROVIDERS = providers(["eager", "compile", "triton", "cuda", "copy"] if CUDA else ["eager", "cpu"])


def eager(x, branch, gamma, weight, bias):
    y = x + branch * gamma
    return y, F.layer_norm(y, (x.shape[-1],), weight, bias, 1e-5)


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows,C", SHAPES, ids=lambda v: str(v))
def test_bench_add_layer_norm(benchmark, rows, C, provider):
    device, dtype = bench_device(provider)
    x = torch.randn(rows, C, device=device, dtype=dtype)
    args = (x, torch.randn_like(x), torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device,
                                                                                            dtype=dtype),
            torch.randn(C, device=device, dtype=dtype))
    if provider == "eager":
        fn = lambda: eager(*args)  # noqa: E731
    elif provider == "compile":
        compiled = torch.compile(eager)
        fn = lambda: compiled(*args)  # noqa: E731
    elif provider == "copy":
        src = torch.randn(2 * rows * C, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        fn = lambda: add_layer_norm(*args, eps=1e-5, backend=provider)  # noqa: E731
    benchmark.group = f"add_layer_norm rows={rows} C={C} {dtype}"
    benchmark.extra_info.update(op="add_layer_norm", shape=f"rows={rows} C={C}", dtype=str(dtype),
                                provider=provider,
                                baselines=["copy"])
    ms = bench_ms(benchmark, fn, rounds=20, iterations=5)
    nbytes = 4 * rows * C * x.element_size()
    if ms:
        benchmark.extra_info.update(ms=ms, metric="GB/s", value=nbytes / ms / 1e6)
