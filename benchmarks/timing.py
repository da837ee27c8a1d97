"""What the benchmarks share: a pytest-benchmark timer that waits for the GPU, the kernel time of a
call, and the benchmarks' device and dtype."""

import time

import pytest
import torch

from fastdino import _ext


def cuda_timer():
    """pytest-benchmark timer that waits for the GPU, so a round measures finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_ms(benchmark, fn, rounds=10, iterations=3):
    """Run `fn` under pytest-benchmark and return its median in ms: on a GPU the kernel time from
    triton.testing.do_bench (CUDA events, L2 flushed between calls), on the CPU the benchmark's own."""
    cuda = torch.cuda.is_available()
    benchmark.pedantic(fn, rounds=rounds if cuda else 3, iterations=iterations if cuda else 1,
                       warmup_rounds=2 if cuda else 1)
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return benchmark.stats.stats.median * 1e3 if benchmark.stats else None


def bench_device(provider):
    """The benchmarks' (device, dtype): bf16 on a GPU, fp32 on the CPU. A C++ provider ("cuda",
    "cpu") without the extension's kernels for that device is skipped with the reason."""
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    if provider in ("cuda", "cpu") and _ext.ext_reasons(device):
        pytest.skip("; ".join(_ext.ext_reasons(device)))
    return device, dtype
