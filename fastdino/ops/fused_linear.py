"""fused_linear: an MLP Linear with its elementwise work in the GEMM epilogue.

    act=None      y = x @ W^T + b
    act="gelu"    y = gelu(x @ W^T + b)                       exact (erf) GELU, as nn.GELU()
    act="swiglu"  y = silu(x @ W^T + b) * (x @ W2^T + b2)      SwiGLU's two input projections
    residual=r    y = r + gamma * y                           fc2 + LayerScale + residual add
    cos, sin      y[..., :rope_cols] = rope(y[..., :rope_cols])  attention's q/k projection with
                                                               DINOv3's RoPE (act and residual None)

The RoPE epilogue takes x as (B, N, K) tokens and cos/sin as the model's (HW, D) tables: the output's
first rope_cols columns (default all; for a fused qkv projection the 2C of q and k) are heads of D
columns, each rotated on the trailing HW tokens of its image exactly as rope_attention's `rope_ref`
rotates q and k (the projection's output rounded, then rotated in fp32 and rounded once), so the
attention can then run on them as they are: F.scaled_dot_product_attention with no extra pass.

Replaces, in DINOv3 MLPs, fc1 + GELU (Mlp, HF DINOv3ViTMLP), w1/w2 + silu * (SwiGLUFFN, HF
DINOv3ViTGatedMLP gate/up) and fc2 + LayerScale + residual; the weights are the modules' own
tensors, never a copy. Accumulation and epilogue in fp32, one rounding.

Backends:
- ``triton`` (fastdino/kernels/fused_linear.py): one GEMM kernel with the epilogue in registers, so the
  wide hidden activation is written once;
- ``cuda`` and ``cpu`` (fastdino._C, csrc/fused_linear.*): ATen's GEMM (cuBLAS/cuBLASLt with its
  bias epilogue on the GPU), then one in-place epilogue pass, which replaces eager's separate
  GELU, or silu + mul, or mul + add passes. The GEMM output is rounded to the activation dtype
  before the epilogue, as in eager PyTorch;
- ``ref``: the unfused ops in fp32.
cuBLASLt's other epilogues are not used, because they compute something else: its GELU epilogue
(torch's ``_addmm_activation(use_gelu=True)`` on CUDA) is the tanh approximation, not the models'
exact erf GELU, and LayerScale scales each output channel, which the GEMM's scalar alpha/beta and
C input cannot express without folding gamma into a rounded copy of the weight. The bias epilogue
is the one that applies, and at::addmm already takes it.
Neither kernel form has been timed on a GPU yet against cuBLAS + eager epilogues, so dispatch does
not pick them: they run only when pinned (``backend=...``), and the patched MLP modules run their
original forward. benchmarks/bench_fused_linear.py is the measurement that will decide.

NaN and Inf: every backend computes GELU as 0.5 * y * (1 + erf(y / sqrt(2))), nn.GELU's formula on
CUDA, so GELU(+Inf) = +Inf and GELU(-Inf) = GELU(NaN) = NaN. torch's vectorised CPU GELU gives NaN
at +Inf (its scalar path, for the tail of a row, gives +Inf): there fastdino deliberately differs
and gives +Inf (tests/test_fused_linear.py pins it).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels import tiled_reasons
from ..kernels.fused_linear import ACTS, ROPE_HEAD_DIMS, fused_linear_fwd
from ._dispatch import Like, Op, kernel_reasons, layout_reasons, sample_generator, sample_tensor
from .rope_attention import rope_ref

PRIORITY = {"cuda": ("ref",), "cpu": ("ref",)}  # unmeasured kernel: see the module docstring


def fused_linear_ref(x, weight, bias=None, act=None, weight2=None, bias2=None, residual=None, gamma=None,
                     cos=None, sin=None, rope_cols=None):
    """Reference (and fallback): the unfused PyTorch ops, in fp32, rounded once to x.dtype; with
    cos/sin, the projection rounded, then rope_ref on its first rope_cols columns."""
    if cos is not None:
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
        cols = y.shape[-1] if rope_cols is None else rope_cols
        B, N, D = y.shape[0], y.shape[1], cos.shape[1]
        turned = rope_ref(y[..., :cols].reshape(B, N, cols // D, D), cos, sin).reshape(B, N, cols)
        return torch.cat((turned, y[..., cols:]), dim=-1)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if act == "gelu":  # F.gelu's formula, written out: its CPU vector path gives NaN at +Inf
        y = 0.5 * y * (1.0 + torch.erf(y * 0.7071067811865476))
    elif act == "swiglu":
        y = F.silu(y) * F.linear(x.float(), weight2.float(), None if bias2 is None else bias2.float())
    if residual is not None:
        y = residual.float() + (y if gamma is None else y * gamma.float())
    return y.to(x.dtype)


def check(x, weight, bias=None, act=None, weight2=None, bias2=None, residual=None, gamma=None, cos=None,
          sin=None, rope_cols=None):
    """Shape, device and argument errors of every backend (ValueError naming the argument)."""
    if act not in ACTS:
        raise ValueError(f"fused_linear: act must be one of {list(ACTS)}, got {act!r}")
    shape, wshape, device = x.shape, weight.shape, x.device  # read once: every tensor attribute costs a call
    if not shape or len(wshape) != 2 or wshape[1] != shape[-1]:
        raise ValueError(f"fused_linear: weight must be (N, {shape[-1] if shape else '?'}), got "
                         f"{tuple(wshape)} for x {tuple(shape)}")
    if not x.is_floating_point():
        raise ValueError(f"fused_linear: x must be floating point, got {x.dtype}")
    if shape[-1] == 0:
        raise ValueError(f"fused_linear: x has no input features (shape {tuple(shape)})")
    N = wshape[0]
    if (act == "swiglu") != (weight2 is not None):
        raise ValueError("fused_linear: weight2 is required by act='swiglu' and only by it")
    if weight2 is not None and weight2.shape != wshape:
        raise ValueError(f"fused_linear: weight2 has shape {tuple(weight2.shape)} but weight has "
                         f"{tuple(wshape)}")
    for name, t in (("bias", bias), ("bias2", bias2), ("gamma", gamma)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"fused_linear: {name} must have shape ({N},), got {tuple(t.shape)}")
    if gamma is not None and residual is None:
        raise ValueError("fused_linear: gamma scales the branch added to residual; residual is missing")
    if residual is not None and residual.shape != (*shape[:-1], N):
        raise ValueError(f"fused_linear: residual must have shape {(*shape[:-1], N)}, "
                         f"got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("weight2", weight2), ("bias2", bias2),
                    ("residual", residual), ("gamma", gamma), ("cos", cos), ("sin", sin)):
        if t is not None and t.device != device:
            raise ValueError(f"fused_linear: {name} is on {t.device} but x is on {device}")
    if cos is not None or sin is not None or rope_cols is not None:
        check_rope(shape, N, act, residual, cos, sin, rope_cols)


def check_rope(shape, N, act, residual, cos, sin, rope_cols):
    """The RoPE epilogue's arguments: tables (HW, D) for x (B, N, K) tokens, whole heads rotated."""
    if cos is None or sin is None:
        raise ValueError("fused_linear: cos and sin must be given together (rope_cols only with them)")
    if act is not None or residual is not None:
        raise ValueError("fused_linear: the RoPE epilogue follows a plain projection: act and residual "
                         "must be None")
    if len(shape) != 3:
        raise ValueError(f"fused_linear: with cos/sin x must be (B, N, K) tokens, got shape {tuple(shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] > shape[1] or t.shape[1] % 2 or t.shape[1] == 0:
            raise ValueError(f"fused_linear: {name} must be (HW, D) with HW <= N={shape[1]} tokens and D "
                             f"even, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"fused_linear: {name} must be floating point, got {t.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"fused_linear: cos has shape {tuple(cos.shape)} but sin has {tuple(sin.shape)}")
    cols, D = N if rope_cols is None else rope_cols, cos.shape[1]
    if not 0 <= cols <= N or cols % D:
        raise ValueError(f"fused_linear: rope_cols must be whole heads of D={D} columns within the {N} "
                         f"outputs, got {rope_cols}")


def reasons(backend, x, weight, bias=None, act=None, weight2=None, bias2=None, residual=None, gamma=None,
            cos=None, sin=None, rope_cols=None):
    """Why `backend` cannot run fused_linear on these tensors ([] if it can)."""
    if backend == "ref":
        return []
    why = kernel_reasons(backend, x.device, x.dtype) + layout_reasons(
        (("x", x), ("weight", weight), ("bias", bias), ("weight2", weight2), ("bias2", bias2),
         ("residual", residual), ("gamma", gamma)))
    if cos is not None:
        if backend != "triton":
            why.append("the RoPE epilogue is in the Triton kernel only")
        elif cos.shape[-1] not in ROPE_HEAD_DIMS:
            why.append(f"cos has head dim {cos.shape[-1]}; the Triton kernel's RoPE epilogue takes "
                       f"{', '.join(map(str, ROPE_HEAD_DIMS))}")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                why.append(f"{name} has stride {t.stride(-1)} along the head dim (needs 1)")
    if backend == "triton" and x.dim() >= 1 and weight.dim() == 2:
        # offsets are int64 (row * stride); row and column numbers are int32
        why += tiled_reasons((("x", "rows (its leading dims)", math.prod(x.shape[:-1])),
                              ("weight", "rows (output features)", weight.shape[0]),
                              ("x", "input features", x.shape[-1])))
    return why


def launch(backend, x, weight, bias=None, act=None, weight2=None, bias2=None, residual=None, gamma=None,
           cos=None, sin=None, rope_cols=None):
    if backend == "ref":
        return fused_linear_ref(x, weight, bias, act, weight2, bias2, residual, gamma, cos, sin, rope_cols)
    if backend == "triton":
        triton = fused_linear_triton if torch.compiler.is_compiling() else _fused_linear_triton
        return triton(x, weight, bias, act, weight2, bias2, residual, gamma, cos, sin, rope_cols)
    return torch.ops.fastdino.fused_linear(x, weight, bias, act, weight2, bias2, residual, gamma)


def example(device, dtype):
    """ViT-L/16's fc1 + GELU at 512^2 (1029 tokens, 1024 -> 4096)."""
    return (Like(device, dtype, (1029, 1024)), Like(device, dtype, (4096, 1024)),
            Like(device, dtype, (4096,)), "gelu")


def sample(device, dtype):
    """The self-check's problems (fastdino/selfcheck.py): 37 rows, 64 -> 96, exact GELU; and where a
    backend takes it, the RoPE epilogue: 2 x 21 tokens (16 rotated), 64 -> 3 x 2 heads of 16, q and k
    rotated."""
    g = sample_generator()
    x = sample_tensor(g, device, dtype, 37, 64)
    weight = sample_tensor(g, device, dtype, 96, 64) * 0.125
    gelu = (x, weight, sample_tensor(g, device, dtype, 96), "gelu", None, None, None, None)
    tokens = sample_tensor(g, device, dtype, 2, 21, 64)
    cos, sin = (sample_tensor(g, device, torch.float32, 16, 16) for _ in range(2))
    rope = (tokens, weight, sample_tensor(g, device, dtype, 96), None, None, None, None, None, cos, sin, 64)
    return [gelu, rope]


OP = Op("fused_linear", PRIORITY, check, reasons, launch, example, sample, native_args=True,
        tensors=("x", "weight", "bias?", "weight2?", "bias2?", "residual?", "gamma?", "cos?", "sin?"),
        numbers=("rope_cols?",))


@torch.library.custom_op("fastdino::fused_linear_triton", mutates_args=())
def fused_linear_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Optional[str], weight2: Optional[Tensor],
    bias2: Optional[Tensor], residual: Optional[Tensor], gamma: Optional[Tensor],
    cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, rope_cols: Optional[int] = None,
) -> Tensor:
    # A registered op can be called directly, so it guards its own inputs.
    check(x, weight, bias, act, weight2, bias2, residual, gamma, cos, sin, rope_cols)
    errors = reasons("triton", x, weight, bias, act, weight2, bias2, residual, gamma, cos, sin, rope_cols)
    if errors:
        raise ValueError(f"fused_linear (Triton kernel): {'; '.join(errors)}")
    return _fused_linear_triton(x, weight, bias, act, weight2, bias2, residual, gamma, cos, sin, rope_cols)


def _fused_linear_triton(x, weight, bias, act, weight2, bias2, residual, gamma, cos=None, sin=None,
                         rope_cols=None):
    """The Triton kernel on checked arguments (dispatch calls it outside torch.compile)."""
    N = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    r2 = residual.reshape(-1, N) if residual is not None else None
    fused_linear_fwd(x2, weight, bias, weight2, bias2, r2, gamma, act, out, interpret=_ext.INTERPRET, cos=cos,
                     sin=sin, ntok=x.shape[-2] if cos is not None else 1,
                     rope_cols=N if rope_cols is None else rope_cols)
    return out.view(*x.shape[:-1], N)


@fused_linear_triton.register_fake
def _(x, weight, bias, act, weight2, bias2, residual, gamma, cos=None, sin=None, rope_cols=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


if _ext.HAS_EXT:

    @torch.library.register_fake("fastdino::fused_linear")
    def _(x, weight, bias, act, weight2, bias2, residual, gamma):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fused_linear(x, weight, bias=None, act=None, weight2=None, bias2=None, residual=None, gamma=None,
                 cos=None, sin=None, rope_cols=None, *, backend: Optional[str] = None):
    """``[residual + gamma *] act(x @ weight^T + bias [, x @ weight2^T + bias2])``, or with cos/sin
    ``rope(x @ weight^T + bias)`` on the first rope_cols columns; see the module docstring.

    Equivalent to `fused_linear_ref`. `backend` pins one backend (ValueError with the reasons if it
    cannot run).
    """
    if cos is None and sin is None and rope_cols is None:  # the C++ op's arguments, as they are
        return OP.dispatch(backend, x, weight, bias, act, weight2, bias2, residual, gamma)
    return OP.dispatch(backend, x, weight, bias, act, weight2, bias2, residual, gamma, cos, sin, rope_cols)
