"""add_layer_norm: the DINOv3 block seam, residual add of a LayerScale'd branch then LayerNorm.

    y = x + gamma * branch ;  z = LayerNorm(y)      (returns both: y is the next residual)

Replaces, inside DINOv3 ViT blocks, ``x + ls1(attn_out)`` followed by ``norm2(...)``: three
elementwise kernels and a LayerNorm (x, branch read; y written, re-read; z written) become one
pass. Statistics are fp32; y is rounded to the storage dtype before LayerNorm reads it, exactly as
in the unfused model.

Backends: ``cuda`` and ``cpu`` (fastdino._C), ``triton``, ``ref``. On CUDA tensors the priority
is cuda, triton, ref. On CPU tensors the reference runs unless a backend is pinned: measured on a
2-core x86 machine, the C++ CPU kernel (a portable build with no AVX2/AVX-512 dispatch) is 1.6-6x
slower than PyTorch's vectorised eager ops, so it serves as the CPU check of the shared kernel
math and as a pinned backend (``backend="cpu"``; ``"triton"`` under TRITON_INTERPRET=1).
The CUDA kernel goes before Triton because its C++ launch costs a few microseconds against
Triton's Python launch; the GPU benchmark (benchmarks/bench_add_layer_norm.py) is what decides.
Kernels are forward-only: when an input requires grad the reference runs (autograd through it).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels.add_layer_norm import MAX_C as TRITON_MAX_C
from ..kernels.add_layer_norm import add_layer_norm_fwd
from ._dispatch import BACKENDS, first_backend, kernel_reasons, requires_grad, resolve_backend
PRIORITY = {"cuda": ("cuda", "triton", "ref"), "cpu": ("ref",)}  # see the module docstring
CUDA_MAX_C = 32768  # csrc/cuda/add_layer_norm.cu: 32 values per thread, 1024 threads per row


def add_layer_norm_ref(x, branch, gamma, weight, bias, eps):
    """Reference (and fallback): fp32 math, y rounded to x.dtype before the LayerNorm."""
    b = branch.float() if gamma is None else branch.float() * gamma.float()
    y = (x.float() + b).to(x.dtype)
    z = F.layer_norm(y.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
    return y, z


@torch.library.custom_op("fastdino::add_layer_norm_triton", mutates_args=())
def add_layer_norm_triton(
    x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    # custom_op (not triton_op): the same registration works on GPU and under TRITON_INTERPRET=1
    # on CPU tensors, and passes opcheck in both (triton_op's tracing needs a GPU driver).
    _check_args(x, branch, gamma, weight, bias)
    errors = _layout_reasons(x, branch, gamma, weight, bias) + _ext.dtype_reasons(x.dtype)
    if x.shape[-1] > TRITON_MAX_C:
        errors.append(f"x.shape[-1]={x.shape[-1]} > {TRITON_MAX_C}")
    if errors:
        raise ValueError(f"add_layer_norm (Triton kernel): {'; '.join(errors)}")
    y = torch.empty_like(x)
    z = torch.empty_like(x)
    add_layer_norm_fwd(x, branch, gamma, weight, bias, eps, y, z)
    return y, z


@add_layer_norm_triton.register_fake
def _(x, branch, gamma, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


if _ext.HAS_EXT:

    @torch.library.register_fake("fastdino::add_layer_norm")
    def _(x, branch, gamma, weight, bias, eps):
        return torch.empty_like(x), torch.empty_like(x)


def backend_reasons(backend: str, device: torch.device, dtype: torch.dtype, C: int) -> list[str]:
    """Why `backend` cannot run add_layer_norm for rows of C elements of `dtype` on `device`."""
    reasons = kernel_reasons("add_layer_norm", backend, device, dtype)
    limit = {"cuda": CUDA_MAX_C, "triton": TRITON_MAX_C}.get(backend)
    if limit is not None and C > limit:
        reasons.append(f"C={C} > {limit}")
    return reasons


def _layout_reasons(x, branch, gamma, weight, bias) -> list[str]:
    """What the kernels need of the tensors: one dtype, contiguous memory."""
    tensors = {"x": x, "branch": branch, "gamma": gamma, "weight": weight, "bias": bias}
    reasons = [f"{n} has dtype {t.dtype} != x.dtype" for n, t in tensors.items() if t is not None and t.dtype != x.dtype]
    return reasons + [f"{n} is not contiguous" for n, t in tensors.items() if t is not None and not t.is_contiguous()]


def _input_reasons(x, branch, gamma, weight, bias) -> list[str]:
    """Reasons that depend on the tensors themselves, not only on device/dtype/C."""
    return _layout_reasons(x, branch, gamma, weight, bias) + requires_grad(x, branch, gamma, weight, bias)


def _check_args(x, branch, gamma, weight, bias):
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"add_layer_norm: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if branch.shape != x.shape:
        raise ValueError(f"add_layer_norm: branch has shape {tuple(branch.shape)} but x has {tuple(x.shape)}")
    C = x.shape[-1]
    for name, t in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"add_layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    for name, t in (("branch", branch), ("gamma", gamma), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"add_layer_norm: {name} is on {t.device} but x is on {x.device}")


def preferred_backend(device, dtype, C, input_reasons=()) -> tuple[str, dict[str, list[str]]]:
    """The first backend of PRIORITY[device] that applies, and why each one before it did not."""
    return first_backend(PRIORITY, device, lambda b: backend_reasons(b, device, dtype, C), input_reasons)


def select_backend(x, branch, gamma, weight, bias) -> tuple[str, dict[str, list[str]]]:
    """preferred_backend for these tensors."""
    return preferred_backend(x.device, x.dtype, x.shape[-1], _input_reasons(x, branch, gamma, weight, bias))


def add_layer_norm(x, branch, gamma, weight, bias, eps: float = 1e-5, backend: Optional[str] = None):
    """Fused ``y = x + gamma * branch; z = layer_norm(y, weight, bias, eps)``; returns ``(y, z)``.

    Equivalent to `add_layer_norm_ref`. Shapes: x, branch (..., C); gamma (C,) or None; weight,
    bias (C,). `backend` pins one backend (ValueError with the reasons if it cannot run).
    """
    _check_args(x, branch, gamma, weight, bias)
    backend = resolve_backend(
        "add_layer_norm", backend, lambda: select_backend(x, branch, gamma, weight, bias),
        lambda: backend_reasons(backend, x.device, x.dtype, x.shape[-1]) + _input_reasons(x, branch, gamma, weight, bias),
    )
    if backend == "ref":
        return add_layer_norm_ref(x, branch, gamma, weight, bias, eps)
    if backend == "triton":
        return add_layer_norm_triton(x, branch, gamma, weight, bias, eps)
    return torch.ops.fastdino.add_layer_norm(x, branch, gamma, weight, bias, eps)
