"""The backend walk every op shares: which backends exist, why one cannot run, which one runs."""

import torch

from .. import _ext

BACKENDS = ("cuda", "triton", "cpu", "ref")


def kernel_reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why `backend` cannot run any kernel of `op` on `device`/`dtype` (before op-specific limits)."""
    if backend == "ref":
        return []
    reasons = _ext.dtype_reasons(dtype)
    if backend == "cuda":
        return reasons + _ext.device_reasons(device, "cuda") + _ext.ext_reasons("cuda")
    if backend == "triton":
        return reasons + _ext.triton_reasons(device.type)
    if backend == "cpu":
        return reasons + _ext.device_reasons(device, "cpu") + _ext.ext_reasons("cpu")
    raise ValueError(f"{op}: unknown backend {backend!r}, expected one of {BACKENDS}")


def first_backend(priority: dict, device: torch.device, reasons_of, input_reasons=()) -> tuple[str, dict]:
    """The first backend of priority[device.type] that applies, and why each one before it did not.

    `reasons_of(backend)` gives the device/dtype/shape reasons; `input_reasons` (from the tensors
    themselves: layout, grad) rule out every kernel, never the reference.
    """
    skipped = {}
    for backend in priority.get(device.type, ("ref",)):
        reasons = reasons_of(backend) + (list(input_reasons) if backend != "ref" else [])
        if not reasons:
            return backend, skipped
        skipped[backend] = reasons
    raise AssertionError("unreachable: ref always applies")


def resolve_backend(op: str, backend, select, pinned_reasons) -> str:
    """The backend a call runs: `select()`'s pick when none is pinned; a pinned one only if
    `pinned_reasons()` is empty (ValueError with them otherwise); "ref" always."""
    if backend is None:
        return select()[0]
    if backend != "ref":
        reasons = pinned_reasons()
        if reasons:
            raise ValueError(f"{op}: backend {backend!r} cannot run: {'; '.join(reasons)}")
    return backend


def requires_grad(*tensors) -> list[str]:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ["inputs require grad (kernels are forward-only)"]
    return []
