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
Forward kernels: with grad dispatch picks the reference; a pinned kernel backend recomputes the
reference for the backward (ops/_dispatch.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels.add_layer_norm import MAX_C as TRITON_MAX_C
from ..kernels.add_layer_norm import add_layer_norm_fwd
from ._dispatch import Like, Op, kernel_reasons, layout_reasons, sample_generator, sample_tensor

PRIORITY = {"cuda": ("cuda", "triton", "ref"), "cpu": ("ref",)}  # see the module docstring
CUDA_MAX_C = 32768  # csrc/cuda/add_layer_norm.cu: 32 values per thread, 1024 threads per row


def add_layer_norm_ref(x, branch, gamma, weight, bias, eps):
    """Reference (and fallback): fp32 math, y rounded to x.dtype before the LayerNorm."""
    b = branch.float() if gamma is None else branch.float() * gamma.float()
    y = (x.float() + b).to(x.dtype)
    z = F.layer_norm(y.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
    return y, z


def check(x, branch, gamma, weight, bias, eps=None):
    """Shape and device errors of every backend (ValueError naming the argument)."""
    shape, device = x.shape, x.device
    if not shape or shape[-1] == 0:
        raise ValueError(f"add_layer_norm: x must have a non-empty last dim, got shape {tuple(shape)}")
    if branch.shape != shape:
        raise ValueError(f"add_layer_norm: branch has shape {tuple(branch.shape)} but x has {tuple(shape)}")
    if not x.is_floating_point():
        raise ValueError(f"add_layer_norm: x must be floating point, got {x.dtype}")
    C = shape[-1]
    for name, t in (("branch", branch), ("gamma", gamma), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if name != "branch" and t.shape != (C,):
            raise ValueError(f"add_layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"add_layer_norm: {name} is on {t.device} but x is on {device}")


def reasons(backend, x, branch, gamma, weight, bias, eps=None) -> list[str]:
    """Why `backend` cannot run add_layer_norm on these tensors ([] if it can)."""
    if backend == "ref":
        return []
    why = kernel_reasons(backend, x.device, x.dtype)
    limit = CUDA_MAX_C if backend == "cuda" else TRITON_MAX_C if backend == "triton" else None
    if limit is not None and x.shape[-1] > limit:
        why.append(f"C={x.shape[-1]} > {limit}")
    return why + layout_reasons((("x", x), ("branch", branch), ("gamma", gamma), ("weight", weight),
                                 ("bias", bias)))


def launch(backend, x, branch, gamma, weight, bias, eps):
    if backend == "ref":
        return add_layer_norm_ref(x, branch, gamma, weight, bias, eps)
    if backend == "triton":
        triton = add_layer_norm_triton if torch.compiler.is_compiling() else _add_layer_norm_triton
        return triton(x, branch, gamma, weight, bias, eps)
    return torch.ops.fastdino.add_layer_norm(x, branch, gamma, weight, bias, eps)


def example(device, dtype):
    """A ViT-L/16 seam at 512^2 (1029 tokens, C 1024)."""
    x, vec = Like(device, dtype, (1029, 1024)), Like(device, dtype, (1024,))
    return x, x, vec, vec, vec, 1e-6


def sample(device, dtype):
    """The self-check's problem: 2 x 7 tokens of width 96 (fastdino/selfcheck.py)."""
    g = sample_generator()
    x, branch = (sample_tensor(g, device, dtype, 2, 7, 96) for _ in range(2))
    gamma, weight, bias = (sample_tensor(g, device, dtype, 96) for _ in range(3))
    return x, branch, gamma, weight, bias, 1e-6


OP = Op("add_layer_norm", PRIORITY, check, reasons, launch, example, sample, native_args=True,
        tensors=("x", "branch", "gamma?", "weight", "bias"), numbers=("eps",))


@torch.library.custom_op("fastdino::add_layer_norm_triton", mutates_args=())
def add_layer_norm_triton(
    x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    # custom_op (not triton_op): the same registration works on GPU and under TRITON_INTERPRET=1
    # on CPU tensors, and passes opcheck in both (triton_op's tracing needs a GPU driver).
    # A registered op can be called directly, so it guards its own inputs.
    check(x, branch, gamma, weight, bias)
    errors = reasons("triton", x, branch, gamma, weight, bias)
    if errors:
        raise ValueError(f"add_layer_norm (Triton kernel): {'; '.join(errors)}")
    return _add_layer_norm_triton(x, branch, gamma, weight, bias, eps)


def _add_layer_norm_triton(x, branch, gamma, weight, bias, eps):
    """The Triton kernel on checked arguments (dispatch calls it outside torch.compile)."""
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


def add_layer_norm(x, branch, gamma, weight, bias, eps: float = 1e-5, *, backend: Optional[str] = None):
    """Fused ``y = x + gamma * branch; z = layer_norm(y, weight, bias, eps)``; returns ``(y, z)``.

    Equivalent to `add_layer_norm_ref`. Shapes: x, branch (..., C); gamma (C,) or None; weight,
    bias (C,). `backend` pins one backend (ValueError with the reasons if it cannot run).
    """
    return OP.dispatch(backend, x, branch, gamma, weight, bias, eps)
