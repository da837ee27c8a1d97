"""The dispatch every op shares: which backends exist, why one cannot run, which one runs.

An op is an `Op`: its priority per device type, one `check` of its arguments (ValueError naming the
argument, whatever the backend), one `reasons(backend, *args)` (why that backend cannot run these
arguments: device, dtype, sizes, layout) and one `run(backend, *args)`. Calling the op checks
once, picks (or validates a pinned backend) once and runs. A fused module decides once per call
with `choose` and then calls `run`; where it decides before its projections exist, it describes
the tensors it will pass with `Like`.

Gradients: the kernels are forward kernels. Where an argument requires grad, dispatch picks the
reference (so unpinned training runs the models' own code), while a pinned kernel backend runs its
kernel forward under `RecomputeRef`, whose backward recomputes the op through its reference under
autograd: the gradients are the reference's, at the cost of a second (reference) forward.
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _ext

BACKENDS = ("cuda", "triton", "cpu", "ref")
_NATIVE = tuple(b for b in ("cuda", "cpu") if not _ext.ext_reasons(b))  # built backends of fastdino._C


class Like:
    """What the ops' reasons read of a tensor a fused module is about to make (a projection's
    output): device, dtype, shape, unit-stride contiguous layout, and whether it will need grad."""

    __slots__ = ("device", "dtype", "shape", "requires_grad")

    def __init__(self, device: torch.device, dtype: torch.dtype, shape, requires_grad: bool = False):
        self.device, self.dtype, self.shape, self.requires_grad = device, dtype, tuple(shape), requires_grad

    def dim(self) -> int:
        return len(self.shape)

    def stride(self, dim: int) -> int:
        stride = 1
        for size in self.shape[dim % len(self.shape) + 1:]:
            stride *= size
        return stride

    def is_contiguous(self) -> bool:
        return True


class Op:
    """One op's dispatch. `priority[device type]` lists the backends to try in order ("ref" last);
    `example(device, dtype)` gives `Like` arguments of a representative DINOv3 problem, on which
    `fastdino info` reports the backends."""

    def __init__(self, name: str, priority: dict, check: Callable, reasons: Callable, run: Callable,
                 example: Callable):
        self.name, self.check, self.reasons, self.kernel, self.example = name, check, reasons, run, example
        self.priority = priority

    def run(self, backend: str, *args):
        """Run `backend` on checked arguments; with grad, a kernel backend's backward is the reference's."""
        if backend != "ref" and _grad_reasons(args):
            return RecomputeRef.apply(self, backend, *args)
        return self.kernel(backend, *args)

    def pick(self, *args) -> tuple[str, dict[str, list[str]]]:
        """The first backend of priority[device] that can run `args`, and why each one before it could not."""
        skipped = {}
        grad = _grad_reasons(args)
        for backend in self.priority.get(args[0].device.type, ("ref",)):
            why = self.reasons(backend, *args) + grad if backend != "ref" else []
            if not why:
                return backend, skipped
            skipped[backend] = why
        raise AssertionError(f"{self.name}: priority must end with 'ref'")

    def choose(self, backend: Optional[str], *args) -> str:
        """The backend that runs `args`: the pick when `backend` is None; a pinned one only if it can
        (ValueError with the reasons otherwise; with grad its backward is the reference's); "ref" always."""
        if backend is None:
            return self.pick(*args)[0]
        if backend != "ref":
            why = self.reasons(backend, *args)
            if why:
                raise ValueError(f"{self.name}: backend {backend!r} cannot run: {'; '.join(why)}")
        return backend

    def __call__(self, *args, backend: Optional[str] = None):
        """Check the arguments once, choose once, run."""
        self.check(*args)
        if backend == "ref":
            return self.run("ref", *args)
        if backend is None:
            backend = self.pick(*args)[0]
        elif backend in _NATIVE and args[0].device.type == backend:
            # A registered C++ op checks dtypes and layouts itself (it can be called directly), so a
            # call pinned to it runs at once; the reasons only explain a refusal.
            try:
                return self.run(backend, *args)
            except RuntimeError:
                self.choose(backend, *args)  # ValueError with the reasons, where there are some
                raise
        else:
            self.choose(backend, *args)
        return self.run(backend, *args)


def kernel_reasons(backend: str, device, dtype: torch.dtype) -> list[str]:
    """Why `backend` cannot run any kernel on `device`/`dtype` (before op-specific limits). The
    answer depends on the build only, so it is computed once per (backend, device type, dtype)."""
    key = (backend, device.type, dtype)
    why = _KERNEL_REASONS.get(key)
    if why is None:
        why = _KERNEL_REASONS[key] = tuple(_kernel_reasons(backend, device.type, dtype))
    return list(why)


_KERNEL_REASONS: dict = {}


def _kernel_reasons(backend: str, device_type: str, dtype: torch.dtype) -> list[str]:
    if backend == "ref":
        return []
    reasons = []
    if dtype not in _ext.KERNEL_DTYPES:
        reasons.append(f"dtype={dtype} (kernels take float32, float16, bfloat16)")
    if backend == "triton":
        return reasons + _ext.triton_reasons(device_type)
    if backend in ("cuda", "cpu"):
        if device_type != backend:
            reasons.append(f"device={device_type} (needs {backend})")
        return reasons + _ext.ext_reasons(backend)
    raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")


def _grad_reasons(args) -> list[str]:
    if torch.is_grad_enabled() and any(getattr(a, "requires_grad", False) for a in args):
        return ["inputs require grad (the reference runs; a pinned kernel backend uses it for the backward)"]
    return []


class RecomputeRef(torch.autograd.Function):
    """A kernel forward whose backward is the reference's: the saved inputs go through the op's
    reference again under autograd, and its gradients are returned. Outputs and gradients match the
    reference within the kernel's tolerance."""

    @staticmethod
    def forward(ctx, op: Op, backend: str, *args):
        ctx.op, ctx.args = op, [None if isinstance(a, Tensor) else a for a in args]
        ctx.tensors = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.save_for_backward(*(args[i] for i in ctx.tensors))
        out = op.kernel(backend, *args)
        ctx.single = isinstance(out, Tensor)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        args = list(ctx.args)
        for i, t in zip(ctx.tensors, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        wanted = [i for i in ctx.tensors if args[i].requires_grad]
        with torch.enable_grad():
            out = ctx.op.kernel("ref", *args)
        outs = (out,) if ctx.single else tuple(out)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs],
                                    allow_unused=True) if pairs else [None] * len(wanted)
        result = [None] * (2 + len(args))
        for i, g in zip(wanted, found):
            result[2 + i] = g
        return tuple(result)


def layout_reasons(named, stride_along: Optional[str] = None) -> list[str]:
    """What a kernel that reads one dtype needs of `named` ((name, tensor or None) pairs; the first
    sets the dtype): that dtype, and contiguous memory or, with `stride_along`, unit stride along
    the last dim (named so in the reason)."""
    first, dt = named[0][0], named[0][1].dtype
    why = []
    for name, t in named:
        if t is None:
            continue
        if t.dtype != dt:
            why.append(f"{name} has dtype {t.dtype} != {first}.dtype")
        if stride_along is None:
            if not t.is_contiguous():
                why.append(f"{name} is not contiguous")
        elif t.stride(-1) != 1:
            why.append(f"{name} has stride {t.stride(-1)} along {stride_along} (needs 1)")
    return why


def check_queries(op: str, q, layout: str):
    """The queries of an attention op: 4-D in `layout`, a head dim, floating point (ValueError
    naming q otherwise). Returns q.shape."""
    shape = q.shape
    if len(shape) != 4:
        raise ValueError(f"{op}: q must be {layout}, got shape {tuple(shape)}")
    if shape[3] == 0:
        raise ValueError(f"{op}: q has head dim 0 (shape {tuple(shape)}, read as {layout})")
    if not q.is_floating_point():
        raise ValueError(f"{op}: q must be floating point, got {q.dtype}")
    return shape
