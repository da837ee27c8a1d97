"""dwconv_layer_norm: the head of a ConvNeXt block, depthwise conv + bias then LayerNorm over channels.

    y = conv2d(x, weight, bias, padding=K // 2, groups=C)      x: (B, C, H, W), weight: (C, 1, K, K)
    z = LayerNorm_C(y).permute(0, 2, 3, 1)                     z: (B, H, W, C), contiguous

Replaces ``dwconv -> permute(0, 2, 3, 1) -> norm`` of the official ConvNeXt ``Block``, transformers'
``DINOv3ConvNextLayer`` and timm's ``ConvNeXtBlock``. Unfused, the conv writes y, the LayerNorm of
the permuted y first makes it contiguous (a copy), then writes z: six passes over the activation.
Fused: x is read once (through its strides, so NCHW and channels-last inputs take the same kernels)
and z written once, in the token layout the block's MLP reads. y is rounded to the storage dtype
before the statistics, as the unfused conv stores it; statistics are fp32.

Backends: ``triton`` (fastdino/kernels/dwconv_layer_norm.py: a row of pixels with all its channels per
program, the halo re-read through the caches), ``cuda`` (csrc/cuda/dwconv_layer_norm.cu: a tile
of pixels per block with its halo staged in shared memory, channel chunk by channel chunk) and
``cpu`` (csrc/dwconv_layer_norm.cpp), ``ref``. The kernels take the 7x7 kernel of ConvNeXt; the
reference any odd K. On CUDA tensors the priority (cuda, triton, ref) follows the design (the
pass count above; the C++ launch costs a few microseconds less than Triton's): neither kernel is
timed yet, benchmarks/bench_dwconv_layer_norm.py is what decides. On CPU tensors the reference
runs unless a backend is pinned: the C++ CPU kernel is the CPU check of the kernel math. Every
kernel indexes x and z with 64-bit offsets (H and W up to 2**30) and launches along one grid axis
(axes 1 and 2 stop at 65535).
Forward kernels: with grad dispatch picks the reference; a pinned kernel backend recomputes the
reference for the backward (ops/_dispatch.py).

NaN and Inf as the unfused modules: a NaN or Inf input reaches every output pixel whose KxK window
holds it (Inf times a zero weight is NaN), and makes that pixel's whole row of channels NaN
through the LayerNorm statistics. The zero padding is multiplied like any input, so a NaN or Inf
weight makes every pixel of its channel non-finite, at the border too: PyTorch's NCHW CPU conv
does the same, its channels-last CPU conv skips the padded taps (there fastdino differs).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels.dwconv_layer_norm import K_SUPPORTED, dwconv_layer_norm_fwd
from ..kernels.dwconv_layer_norm import MAX_C as TRITON_MAX_C
from ._dispatch import Like, Op, kernel_reasons, sample_generator, sample_tensor

PRIORITY = {"cuda": ("cuda", "triton", "ref"), "cpu": ("ref",)}  # see the module docstring
CUDA_MAX_C = 2048  # csrc/cuda/dwconv_layer_norm.cu: a tile's conv outputs stay in 64 KB of shared memory
NAMES = ("weight", "bias", "norm_weight", "norm_bias")  # the arguments after x
# Offsets are int64, but the kernels hold a pixel's row and column (and their halo and tile
# arithmetic) in int32: H and W stay well inside that (csrc/dwconv_layer_norm.h checks the same).
MAX_SIDE = 2**30


def dwconv_layer_norm_ref(x, weight, bias, norm_weight, norm_bias, eps):
    """Reference (and fallback): fp32 math, the conv output rounded to x.dtype before the LayerNorm."""
    C, K = x.shape[1], weight.shape[-1]
    if x.numel() == 0:  # conv2d refuses an empty map (its padded size is below the kernel's)
        return _tokens(x)
    # explicit zero padding: PyTorch's own convs disagree on whether a padded tap is multiplied
    # (its NCHW CPU conv gives NaN there for a NaN weight, its channels-last one skips the tap)
    xp = F.pad(x.float(), (K // 2,) * 4)
    y = F.conv2d(xp, weight.float(), None if bias is None else bias.float(), groups=C)
    y = y.to(x.dtype).float().permute(0, 2, 3, 1)
    z = F.layer_norm(y, (C,), norm_weight.float(), norm_bias.float(), eps)
    return z.to(x.dtype).contiguous()


def check(x, weight, bias, norm_weight, norm_bias, eps=None):
    """Shape and device errors of every backend (ValueError naming the argument)."""
    shape, device = x.shape, x.device
    if len(shape) != 4:
        raise ValueError(f"dwconv_layer_norm: x must be (B, C, H, W), got shape {tuple(shape)}")
    if not x.is_floating_point():
        raise ValueError(f"dwconv_layer_norm: x must be floating point, got {x.dtype}")
    C = shape[1]
    if C == 0:
        raise ValueError(f"dwconv_layer_norm: x has no channels (shape {tuple(shape)})")
    wshape = tuple(weight.shape)
    if len(wshape) != 4 or wshape[:2] != (C, 1) or wshape[2] != wshape[3] or wshape[2] % 2 == 0:
        raise ValueError(f"dwconv_layer_norm: weight must be ({C}, 1, K, K) with K odd (a depthwise conv "
                         f"of x's {C} channels), got {wshape}")
    for name, t in zip(NAMES, (weight, bias, norm_weight, norm_bias)):
        if t is None:
            continue
        if name != "weight" and tuple(t.shape) != (C,):
            raise ValueError(f"dwconv_layer_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"dwconv_layer_norm: {name} is on {t.device} but x is on {device}")


def reasons(backend, x, weight, bias, norm_weight, norm_bias, eps=None) -> list[str]:
    """Why `backend` cannot run dwconv_layer_norm on these tensors ([] if it can)."""
    if backend == "ref":
        return []
    why = kernel_reasons(backend, x.device, x.dtype)
    K, C = weight.shape[-1], x.shape[1]
    if K != K_SUPPORTED:
        why.append(f"kernel size {K} (the kernels take {K_SUPPORTED}x{K_SUPPORTED})")
    limit = CUDA_MAX_C if backend == "cuda" else TRITON_MAX_C if backend == "triton" else None
    if limit is not None and C > limit:
        why.append(f"C={C} > {limit}")
    if len(x.shape) == 4 and max(x.shape[2:]) > MAX_SIDE:
        why.append(f"x has H={x.shape[2]}, W={x.shape[3]}; the kernels index rows and columns in 32 bits "
                   "(limit 2**30 each)")
    for name, t in zip(NAMES, (weight, bias, norm_weight, norm_bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            why.append(f"{name} has dtype {t.dtype} != x.dtype")
        if not t.is_contiguous():
            why.append(f"{name} is not contiguous")
    return why


def launch(backend, x, weight, bias, norm_weight, norm_bias, eps):
    if backend == "ref":
        return dwconv_layer_norm_ref(x, weight, bias, norm_weight, norm_bias, eps)
    if backend == "triton":
        triton = dwconv_layer_norm_triton if torch.compiler.is_compiling() else _dwconv_layer_norm_triton
        return triton(x, weight, bias, norm_weight, norm_bias, eps)
    return torch.ops.fastdino.dwconv_layer_norm(x, weight, bias, norm_weight, norm_bias, eps)


def example(device, dtype):
    """ConvNeXt-T's first stage at 512^2: C 96 on a 128 x 128 map."""
    vec = Like(device, dtype, (96,))
    return Like(device, dtype, (1, 96, 128, 128)), Like(device, dtype, (96, 1, 7, 7)), vec, vec, vec, 1e-6


def sample(device, dtype):
    """The self-check's problem: 16 channels on a 5 x 6 map, channels-last (fastdino/selfcheck.py)."""
    g = sample_generator()
    x = sample_tensor(g, device, dtype, 1, 16, 5, 6).to(memory_format=torch.channels_last)
    weight = sample_tensor(g, device, dtype, 16, 1, 7, 7) * 0.2
    bias, norm_weight, norm_bias = (sample_tensor(g, device, dtype, 16) for _ in range(3))
    return x, weight, bias, norm_weight, norm_bias, 1e-6


OP = Op("dwconv_layer_norm", PRIORITY, check, reasons, launch, example, sample, native_args=True,
        tensors=("x", "weight", "bias?", "norm_weight", "norm_bias"), numbers=("eps",))


def _tokens(x: Tensor) -> Tensor:
    B, C, H, W = x.shape
    return x.new_empty((B, H, W, C))


@torch.library.custom_op("fastdino::dwconv_layer_norm_triton", mutates_args=())
def dwconv_layer_norm_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_weight: Tensor, norm_bias: Tensor, eps: float
) -> Tensor:
    # A registered op can be called directly, so it guards its own inputs.
    check(x, weight, bias, norm_weight, norm_bias)
    errors = reasons("triton", x, weight, bias, norm_weight, norm_bias)
    if errors:
        raise ValueError(f"dwconv_layer_norm (Triton kernel): {'; '.join(errors)}")
    return _dwconv_layer_norm_triton(x, weight, bias, norm_weight, norm_bias, eps)


def _dwconv_layer_norm_triton(x, weight, bias, norm_weight, norm_bias, eps):
    """The Triton kernel on checked arguments (dispatch calls it outside torch.compile)."""
    z = _tokens(x)
    dwconv_layer_norm_fwd(x, weight, bias, norm_weight, norm_bias, eps, z)
    return z


@dwconv_layer_norm_triton.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps):
    return _tokens(x)


if _ext.HAS_EXT:

    @torch.library.register_fake("fastdino::dwconv_layer_norm")
    def _(x, weight, bias, norm_weight, norm_bias, eps):
        return _tokens(x)


def dwconv_layer_norm(x, weight, bias, norm_weight, norm_bias, eps: float = 1e-6, *,
                      backend: Optional[str] = None):
    """Depthwise conv (``weight`` (C, 1, K, K), ``bias`` (C,) or None, padding K // 2) of x (B, C, H, W),
    then LayerNorm over channels; returns the (B, H, W, C) tokens, contiguous.

    Equivalent to `dwconv_layer_norm_ref`. x may be NCHW or channels-last. `backend` pins one
    backend (ValueError with the reasons if it cannot run).
    """
    return OP.dispatch(backend, x, weight, bias, norm_weight, norm_bias, eps)
