"""The dispatch every op shares: which backends exist, why one cannot run, which one runs.

An op is an `Op`: its untuned priority per device type, one `check` of its arguments (ValueError
naming the argument, whatever the backend), one `reasons(backend, *args)` (why that backend cannot
run these arguments: device, dtype, sizes, layout), one `launch(backend, *args)` and a small
`sample` problem for the first-use self-check (fastdino/selfcheck.py). `Op.dispatch`, what the
public function calls, checks, picks (or validates a pinned backend) and runs, and keeps that decision per
signature of the arguments (`signature`): a repeated call does no check and no reasons work. A
fused module decides per signature too (`fused.common.decide`, which also reads fastdino.tune's
choices) and then calls `run`; where it decides before its projections exist, it describes the
tensors it will pass with `Like`. `observe` lets verify and the tests see every op that runs.

Gradients: the kernels are forward kernels. Where an argument requires grad, dispatch picks the
reference (so unpinned training runs the models' own code), while a pinned kernel backend runs its
kernel forward under `RecomputeRef`, whose backward recomputes the op through its reference under
autograd: the gradients are the reference's, at the cost of a second (reference) forward.
"""

import contextlib
import inspect
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _ext, selfcheck

BACKENDS = ("cuda", "triton", "cpu", "ref")
_NATIVE = tuple(b for b in ("cuda", "cpu") if not _ext.ext_reasons(b))  # built backends of fastdino._C


class Like:
    """What the ops' reasons read of a tensor a fused module is about to make (a projection's
    output): device, dtype, shape, unit-stride contiguous layout, and whether it will need grad."""

    __slots__ = ("device", "dtype", "shape", "requires_grad", "_strides", "key")

    def __init__(self, device: torch.device, dtype: torch.dtype, shape, requires_grad: bool = False):
        self.device, self.dtype, self.shape, self.requires_grad = device, dtype, tuple(shape), requires_grad
        strides, stride = [], 1
        for size in reversed(self.shape):
            strides.append(stride)
            stride *= size
        self._strides = tuple(reversed(strides))
        self.key = (device, dtype, self.shape, self._strides, requires_grad)  # its part of a `signature`

    def dim(self) -> int:
        return len(self.shape)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def stride(self, dim: Optional[int] = None):
        return self._strides if dim is None else self._strides[dim]

    def is_contiguous(self) -> bool:
        return True


class Op:
    """One op's dispatch. `priority[device type]` lists the backends to try in order ("ref" last);
    `example(device, dtype)` gives `Like` arguments of a representative DINOv3 problem, on which
    `fastdino info` reports the backends; `sample(device, dtype)` gives a small concrete problem
    (random tensors from a fixed seed) for the first-use self-check (fastdino/selfcheck.py).
    `launch(backend, *args)` launches one backend's kernel with no checks; `run(backend, *args)`
    launches it for a fused module or a public call: it tells the observers and, under grad, gives
    a kernel backend the reference's backward."""

    def __init__(self, name: str, priority: dict, check: Callable, reasons: Callable, launch: Callable,
                 example: Callable, sample: Optional[Callable] = None,
                 check_values: Optional[Callable] = None, native_args: bool = False, tensors: tuple = (),
                 numbers: tuple = ()):
        self.name, self.reasons, self.launch, self.example = name, reasons, launch, example
        # `check`, after the arguments named in `tensors` are tensors and those in `numbers` are
        # numbers ("name?": or None)
        self.check = typed_check(name, check, tensors, numbers) if tensors or numbers else check
        self.priority, self.sample = priority, sample
        # The part of `check` that reads values (level shapes held on the host), run on every
        # decided call with CPU tensors: equal signatures do not mean equal values. (The native
        # C++ ops that `dispatch` runs at once check those values themselves.)
        self.check_values = check_values
        # The public function's decisions, per (pinned backend, grad mode, signature of the arguments).
        self._decisions: dict = {}
        self._native_first = {dev: order[0] for dev, order in priority.items() if order and order[0] == dev}
        # native_args: `launch` passes the arguments to the C++ op as they are, so `dispatch` calls
        # the registered op itself once its self-check passed: in eager its C++ entry (no Python
        # frame; the dispatcher still sees modes and fake tensors), under torch.compile the
        # overload, which it traces.
        self._traced = getattr(torch.ops.fastdino, name).default if native_args and _NATIVE else None
        # (native backend, or None where it comes first; dtype, on CUDA, on the CPU) -> the C++
        # entry that `dispatch` calls at once
        self._fast: dict = {}

    def run(self, backend: str, *args):
        """Run `backend` on checked arguments; with grad, a kernel backend's backward is the reference's."""
        if _OBSERVERS:
            for observer in _OBSERVERS:
                observer(self.name, backend, args)
        if backend != "ref" and torch.is_grad_enabled() and grad_reasons(args):
            return RecomputeRef.apply(self, backend, *args)
        return self.launch(backend, *args)

    def runnable(self, backend: str, *args, also: Optional[tuple] = None) -> list[str]:
        """Why `backend` cannot run `args` (and `also`, a second call on the same backend) now: its
        reasons, grad, its first-use self-check ([] if it can)."""
        if backend == "ref":
            return []
        why = self.reasons(backend, *args) + (self.reasons(backend, *also) if also is not None else [])
        why += grad_reasons(args)
        return why or selfcheck.reasons(self, backend, args[0].device, args[0].dtype)

    def pick(self, *args, also: Optional[tuple] = None) -> tuple[str, dict[str, list[str]]]:
        """The first backend of priority[device] that can run `args` (and `also`) and passed its
        self-check, and why each one before it could not."""
        skipped = {}
        for backend in self.priority.get(args[0].device.type, ("ref",)):
            why = self.runnable(backend, *args, also=also)
            if not why:
                return backend, skipped
            skipped[backend] = why
        raise AssertionError(f"{self.name}: priority must end with 'ref'")

    def choose(self, backend: Optional[str], *args) -> str:
        """The backend that runs `args`: the pick when `backend` is None; a pinned one only if it can
        (ValueError with the reasons otherwise; with grad its backward is the reference's); "ref" always."""
        if backend is None:
            return self.pick(*args)[0]
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend != "ref":
            why = self.reasons(backend, *args)
            if why:
                raise ValueError(f"{self.name}: backend {backend!r} cannot run: {'; '.join(why)}")
        return backend

    def dispatch(self, backend: Optional[str], *args):
        """Check the arguments, choose the backend (`backend` pins one; None: the pick), run: what
        the public function does. A native (C++) backend, pinned or first in the priority, whose
        self-check passed is called at once: the registered C++ op checks dtypes, shapes and
        layouts itself (and the values `check_values` reads, e.g. host-held level shapes), and the
        check and reasons run only after it refuses (a pinned call then raises the ValueError that
        names the argument; an unpinned one goes on to the next backend). Other decisions are kept
        per signature of the arguments, so a repeated call does no check and no reasons work."""
        x = args[0]
        try:
            direct = self._fast.get((backend, x.dtype, x.is_cuda, x.is_cpu))  # (no torch.device made)
        except (AttributeError, TypeError):  # not a tensor, or an unhashable backend: the check names it
            direct = None
        if direct is not None and not _OBSERVERS:
            if torch.is_grad_enabled():
                for a in args:  # a loop, not grad_reasons: no call or generator frame on the hot path
                    if getattr(a, "requires_grad", False):
                        return self._decide_and_run(backend, args)
            if torch.compiler.is_dynamo_compiling():  # (an export without Dynamo sees the C++ call)
                direct = self._traced
            try:
                return direct(*args)
            except Exception:  # noqa: BLE001 - the check names the argument, else the error stands
                if backend is not None:
                    self.check(*args)
                    self.choose(backend, *args)  # ValueError with the reasons, where there are some
                    raise
        return self._decide_and_run(backend, args)

    def passed_selfcheck(self, backend: str, device: torch.device, dtype: torch.dtype):
        """Called by the self-check: a native backend on its own device type may now be called at
        once by `dispatch`."""
        if self._traced is not None and backend in _NATIVE and device.type == backend:
            entry = self._fast[(backend, dtype, backend == "cuda", backend == "cpu")] = self._traced._op
            if self._native_first.get(backend) == backend:  # first in its priority: unpinned calls too
                self._fast[(None, dtype, backend == "cuda", backend == "cpu")] = entry

    def _decide_and_run(self, backend: Optional[str], args):
        try:
            key = (backend, torch.is_grad_enabled(), signature(args))
            chosen = self._decisions.get(key)
        except TypeError:  # an unhashable argument (a list of level shapes): decide for this call
            key = chosen = None
        if chosen is not None:
            if self.check_values is not None and args[0].is_cpu:
                self.check_values(*args)
        elif torch.compiler.is_compiling():  # traced once per compiled graph: no memo
            self.check(*args)
            return self.run(self.choose(backend, *args), *args)
        else:
            self.check(*args)
            chosen = self.choose(backend, *args)
            if chosen != "ref" and selfcheck.reasons(self, chosen, args[0].device, args[0].dtype):
                chosen = "ref"  # the pinned backend failed its self-check (warned once): the reference runs
            if key is not None:
                if len(self._decisions) >= _MAX_DECISIONS:
                    self._decisions.clear()
                self._decisions[key] = chosen
        return self.run(chosen, *args)


def typed_check(name: str, check: Callable, tensors: tuple, numbers: tuple = ()) -> Callable:
    """`check` preceded by a ValueError naming the first argument of `tensors` that is not a tensor
    or of `numbers` that is not an int or float (parameter names of `check`; "name?" may be None),
    where a check, a reference or the C++ op would otherwise fail with an error that does not
    name it."""
    params = list(inspect.signature(check).parameters)
    kinds = ((tensors, (Tensor, Like), "a torch.Tensor"), (numbers, (int, float), "a number"))
    spots = [(params.index(t.rstrip("?")), t.rstrip("?"), t.endswith("?"), types, what)
             for names, types, what in kinds for t in names]

    def checked(*args):
        for i, param, optional, types, what in spots:
            a = args[i] if i < len(args) else None
            if not isinstance(a, types) and not (optional and a is None):
                raise ValueError(f"{name}: {param} must be {what}{' or None' if optional else ''}, "
                                 f"got {type(a).__name__}")
        return check(*args)

    return checked


_MAX_DECISIONS = 4096
_OBSERVERS: list = []  # callables (op name, backend, args) that `Op.run` calls: see `observe`


@contextlib.contextmanager
def observe(callback: Callable[[str, str, tuple], None]):
    """Call `callback(op name, backend, args)` for every op run (fused modules and public
    functions) while the context is open; verify and the tests count the kernels that ran with it."""
    _OBSERVERS.append(callback)
    try:
        yield callback
    finally:
        _OBSERVERS.remove(callback)


def signature(args) -> tuple:
    """What the reasons read of `args`: per tensor (or `Like`) its device, dtype, shape, strides and
    whether it requires grad; other arguments as they are. Equal signatures get equal decisions."""
    return tuple([a.key if a.__class__ is Like else (a.device, a.dtype, a.shape, a.stride(), a.requires_grad)
                  if isinstance(a, Tensor) else a for a in args])


def signature_text(sig: tuple, grad: bool = True) -> str:
    """A signature as stable text (the timing cache's key): device type, dtype, shape, strides per
    tensor (and "+grad" where it requires grad and `grad`, the grad mode, is on); other arguments by
    their repr."""
    parts = []
    for a in sig:
        if isinstance(a, tuple) and len(a) == 5 and isinstance(a[0], torch.device):
            device, dtype, shape, stride, needs = a
            parts.append(f"{device.type}:{str(dtype).replace('torch.', '')}{list(shape)}"
                         f"s{list(stride)}{'+grad' if grad and needs else ''}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


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


def grad_reasons(args) -> list[str]:
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
        out = op.launch(backend, *args)
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
            out = ctx.op.launch("ref", *args)
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


def default_scale(q) -> Optional[float]:
    """Attention's default scale, head_dim ** -0.5 (None where q has no head dim: check says why)."""
    d = q.shape[-1] if isinstance(q, Tensor) and q.dim() else 0
    return 1.0 / math.sqrt(d) if d > 0 else None


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


def sample_generator() -> torch.Generator:
    """The fixed-seed generator of the ops' self-check problems (`Op.sample`)."""
    return torch.Generator().manual_seed(20261207)


def sample_tensor(g: torch.Generator, device, dtype: torch.dtype, *shape) -> Tensor:
    """Standard normal values drawn on the CPU (the same on every device), then moved."""
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
