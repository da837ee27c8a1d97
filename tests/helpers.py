"""Shared test helpers: dtypes, tolerances, skip and quick markers, the tolerance rule and op-call
counting."""

import contextlib
import inspect
import os
import tempfile
from unittest import mock

import torch

# The interpreter is chosen when @triton.jit decorates, so before fastdino.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests never read or write the user's timing cache (conftest also gives each test its own).
os.environ["FASTDINO_CACHE"] = tempfile.mkdtemp(prefix="fastdino-test-cache-")

import pytest  # noqa: E402

from fastdino import _ext  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# atol of the tolerance rule, per dtype (see assert_close_to_ref).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"fastdino._C not built: {_ext.EXT_ERROR}")


def quick_cases(values, *chosen, spread: bool = False) -> list:
    """`values` for parametrize, with those in `chosen` also marked `quick` (the representative
    subset `pytest -m quick` runs). `spread`: each value holds the arguments of a multi-name
    parametrize."""
    missing = [c for c in chosen if c not in values]
    assert not missing, f"not among the cases: {missing}"
    return [pytest.param(*(v if spread else (v,)), marks=pytest.mark.quick) if v in chosen else v
            for v in values]


def _needs_cuda(missing: bool, reason: str):
    """A decorator: skipped where `missing`, and marked `cuda`, so that `-m cuda` selects exactly
    the tests that need a GPU (and `-m "not cuda"` leaves them out)."""
    skip = pytest.mark.skipif(missing, reason=reason)

    def decorate(test):
        return pytest.mark.cuda(skip(test))

    return decorate


requires_cuda = _needs_cuda(not torch.cuda.is_available(), "needs a CUDA device")
requires_cuda_ext = _needs_cuda(not (torch.cuda.is_available() and _ext.BUILD["cuda"]),
                                "needs a CUDA device and fastdino._C CUDA kernels")


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
        idx = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(err - bound,
                                                                         nan=float("inf")).argmax(),
                                                                         err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements out of tolerance; worst at {idx}: got {out[idx].item():.6g}, "
            f"exact {exact[idx].item():.6g}, error {err[idx].item():.3e} > bound {bound[idx].item():.3e} "
            f"(2 x {lowp_err:.3e} from PyTorch {lowp.dtype} + {atol:.0e} + 1 ulp)"
        )


@contextlib.contextmanager
def op_runs(*names):
    """{name: mock} of the named ops, each called (backend, *args) every time the op runs (through
    fastdino's observer hook, `observe`): a fused module runs an op once per op call, after
    deciding its backend; `op_args` names a recorded call's arguments."""
    from fastdino.ops._dispatch import observe

    mocks = {n: mock.Mock() for n in names}

    def seen(op, backend, args):
        if op in mocks:
            mocks[op](backend, *args)

    with observe(seen):
        yield mocks


def op_args(name, call) -> dict:
    """A recorded run-step call of op `name` as {argument name: value}, "backend" first."""
    from fastdino.ops import OPS

    bound = inspect.signature(OPS[name].reasons).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return bound.arguments
