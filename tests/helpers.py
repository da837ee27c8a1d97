"""Shared test helpers: dtypes, tolerances, skip markers and the tolerance rule."""

import os
import time

import torch

# The interpreter is chosen when @triton.jit decorates, so before fastdino.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdino import _ext  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# atol of the tolerance rule, per dtype (see assert_close_to_ref).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"fastdino._C not built: {_ext.EXT_ERROR}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.BUILD["cuda"]), reason="needs a CUDA device and fastdino._C CUDA kernels"
)


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


def assert_close_to_ref(name, out, exact, lowp, atol):
    """The tolerance rule, per element: |out - exact| <= 2 * max|lowp - exact| + atol + ulp(exact).

    `exact` is the math in float64; `lowp` is the unfused PyTorch computation in the dtype under
    test, so the bound scales with what that dtype can do. The one-ulp term (eps * |exact|) covers
    a single rounding landing on the rare large element, where PyTorch's own worst case need not
    fall; a wrong kernel (errors of 0.1-1) cannot hide in it.
    """
    exact = exact.double()
    err = (out.double() - exact).abs()
    lowp_err = (lowp.double() - exact).abs().max().item() if exact.numel() else 0.0
    bound = 2 * lowp_err + atol + torch.finfo(out.dtype).eps * exact.abs()
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(err - bound, nan=float("inf")).argmax(), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements out of tolerance; worst at {idx}: got {out[idx].item():.6g}, "
            f"exact {exact[idx].item():.6g}, error {err[idx].item():.3e} > bound {bound[idx].item():.3e} "
            f"(2 x {lowp_err:.3e} from PyTorch {lowp.dtype} + {atol:.0e} + 1 ulp)"
        )
