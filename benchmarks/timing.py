"""What the benchmarks share: a pytest-benchmark timer that waits for the GPU, the kernel time of a
call, the benchmarks' device and dtype, and the quick profile.

FASTDINO_BENCH_QUICK=1 (scripts/gpu_run.sh's default): each op at two representative shapes, no
torch.compile or FlexAttention providers (each compiles for seconds to minutes), one
pytest-benchmark round and a shorter do_bench: about a minute for every op on an H200.
"""

import os
import time

import pytest
import torch

from fastdino import _ext

QUICK = os.environ.get("FASTDINO_BENCH_QUICK") == "1"
COMPILING = ("compile", "flex")  # providers left out of the quick profile


def quick(shapes: list, picks: tuple) -> list:
    """`shapes`, or in the quick profile the representative ones (indices `picks`)."""
    if not QUICK:
        return shapes
    return [shapes[i] for i in picks if i < len(shapes)] or shapes[:2]  # the CPU's short lists


def providers(names: list) -> list:
    """`names`, without the compiling providers in the quick profile."""
    return [p for p in names if p not in COMPILING] if QUICK else names


def cuda_timer():
    """pytest-benchmark timer that waits for the GPU, so a round measures finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_ms(benchmark, fn, rounds=10, iterations=3):
    """Run `fn` under pytest-benchmark and return its median in ms: on a GPU the kernel time from
    triton.testing.do_bench (CUDA events, L2 flushed between calls), on the CPU the benchmark's own."""
    cuda = torch.cuda.is_available()
    if QUICK:
        rounds = iterations = 1
    benchmark.pedantic(fn, rounds=rounds if cuda else 3, iterations=iterations if cuda else 1,
                       warmup_rounds=2 if cuda else 1)
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10 if QUICK else 25, rep=50 if QUICK else 200,
                                       return_mode="median")
    return benchmark.stats.stats.median * 1e3 if benchmark.stats else None


def bench_device(provider):
    """The benchmarks' (device, dtype): bf16 on a GPU, fp32 on the CPU. A C++ provider ("cuda",
    "cpu") without the extension's kernels for that device is skipped with the reason."""
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    if provider in ("cuda", "cpu") and _ext.ext_reasons(device):
        pytest.skip("; ".join(_ext.ext_reasons(device)))
    return device, dtype
