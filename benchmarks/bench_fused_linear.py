"""fused_linear against the unfused MLP ops DINOv3 runs today (cuBLAS Linear, then eager GELU /
silu * / LayerScale + residual), torch.compile of those, the Triton kernel and the C++ form
(ATen GEMM + one CUDA epilogue pass).

TFLOP/s counts the GEMMs: 2 * M * N * K (twice for SwiGLU's two projections).
"""

import pytest
import torch
from test_fused_linear import make_inputs, unfused
from timing import bench_device, bench_ms, cuda_timer, providers, quick

from fastdino import _ext
from fastdino.ops.fused_linear import fused_linear

CUDA = torch.cuda.is_available()
# (name, M, K, N, act, residual): ViT-S and ViT-L MLPs at 512^2, batch 32 (M = 32 * 1029 tokens),
# ViT-S+ SwiGLU (hidden 1024), ViT-L at batch 1.
SHAPES = [("vits-fc1", 32928, 384, 1536, "gelu", False), ("vitl-fc1", 32928, 1024, 4096, "gelu", False),
          ("vitl-fc2", 32928, 4096, 1024, None, True), ("vits+-swiglu", 32928, 384, 1024, "swiglu", False),
          ("vitl-fc1-b1", 1029, 1024, 4096, "gelu", False)] if CUDA else [("vits-fc1", 197, 384, 1536, "gelu",
                                                                           False)]
SHAPES = quick(SHAPES, (0, 4))  # ViT-S fc1 at batch 32, ViT-L fc1 at batch 1
PROVIDERS = providers((["eager", "compile", "triton"] + (["cuda"] if _ext.BUILD["cuda"] else [])) if CUDA
                      else ["eager"])


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name,M,K,N,act,residual", SHAPES, ids=lambda v: str(v))
def test_bench_fused_linear(benchmark, name, M, K, N, act, residual, provider):
    device, dtype = bench_device(provider)
    args = make_inputs(M, K, N, act, residual, dtype, device)
    if provider == "eager":
        fn = lambda: unfused(*args)  # noqa: E731
    elif provider == "compile":
        compiled = torch.compile(unfused)
        fn = lambda: compiled(*args)  # noqa: E731
    else:
        fn = lambda: fused_linear(*args, backend=provider)  # noqa: E731
    benchmark.group = f"fused_linear {name} M={M} K={K} N={N} {dtype}"
    benchmark.extra_info.update(op="fused_linear", shape=f"{name} M={M} K={K} N={N}", dtype=str(dtype),
                                provider=provider, baselines=["eager", "compile"])
    ms = bench_ms(benchmark, fn)
    if ms:
        flops = 2 * M * N * K * (2 if act == "swiglu" else 1)
        benchmark.extra_info.update(ms=ms, metric="TFLOP/s", value=flops / ms / 1e9)
