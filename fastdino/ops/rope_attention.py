"""rope_attention: DINOv3 self-attention with its 2D RoPE fused in.

    out = softmax(rope(q) rope(k)^T * scale) v        q, k, v, out: (B, N, H, D), token-major

``rope`` turns the trailing HW = cos.shape[0] tokens with the half-split layout
(x * cos + rotate_half(x) * sin, in fp32, rounded once to the storage type, as the official
dinov3 code does); the first N - HW tokens (cls, registers, prepended queries) are left as they
are. cos/sin are the model's own tables, (HW, D), computed once per forward. Without cos/sin it is
plain attention. Token-major layout is what the projections produce and consume, so a fused qkv
output is passed as three strided views and nothing is transposed or copied.

``mask_logits`` (B, M, K) is EoMT's query-to-patch mask: the first M query rows (the prepended
queries) see each of the trailing K keys (the patches) only where its logit is > 0, the models'
``interpolated_logits > 0`` in the logits' own dtype (NaN blocks). Every other entry is open, and
M + K <= N is required, so each masked row keeps its N - K >= M open prefix keys and no row is
ever empty: unlike Mask2Former (masked_attention) there is no fully-blocked-row rule. The dense
(B, heads, N, N) additive mask the models build is never made: the Triton kernel reads the logits
tile next to each key block, the C++ form runs the M masked rows as a second ATen attention with a
(B, 1, M, N) boolean mask. A blocked key's score gets -inf added, as the models' additive mask:
a NaN or +Inf score there stays NaN, and its value row is weighted 0 (0 * Inf = NaN), on every
backend.
The C++ form and the reference call torch's SDPA, as the models do; the Triton kernel computes
eager attention's NaN for a query row whose every score is NaN (a NaN in q), where torch's CPU
SDPA gives 0: there, on CPU tensors only (the Triton interpreter), the two differ by design
(tests/test_nan_inf.py pins it).

Backends: ``cuda`` and ``cpu`` (fastdino._C: one C++ pass that rotates q and k, then ATen's
scaled_dot_product_attention, i.e. flash attention on the GPU), ``triton`` (the flash-style kernel
in fastdino/kernels/rope_attention.py, RoPE applied on load), ``ref``. On CUDA tensors the priority is
cuda, triton, ref, by measurement (benchmarks/bench_rope_attention.py, H100, bf16, ViT-S/L shapes):
the C++ form ran at 0.66-0.90x of SDPA without RoPE and 2-12x of SDPA with eager RoPE, the Triton
kernel at 0.24-0.41x of SDPA (157 TFLOP/s at most against SDPA's 390). On CPU tensors the
reference runs unless a backend is pinned. Offsets are 64-bit except the Triton kernel's into one
batch item of mask_logits; it numbers tokens, and the CUDA kernel tokens and heads, in 32 bits:
beyond those limits dispatch passes the backend by.
In a patched ViT block the Triton form leaves this op where there is no mask: fused_linear's RoPE
epilogue rotates q and k inside the qkv projection's GEMM, and F.scaled_dot_product_attention
(flash/cuDNN) then reads them as they are, one pass over q and k fewer than the C++ form
(fastdino/fused/vit.py; benchmarks/bench_rope_attention.py's projection benchmark times it).
Forward kernels: with grad dispatch picks the reference; a pinned kernel backend recomputes the
reference for the backward (ops/_dispatch.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels import INDEX_LIMIT, tiled_reasons
from ..kernels.rope_attention import FP32_MAX_HEAD_DIM, HEAD_DIMS, rope_attention_fwd
from ._dispatch import (
    Like,
    Op,
    check_queries,
    default_scale,
    kernel_reasons,
    layout_reasons,
    sample_generator,
    sample_tensor,
)

PRIORITY = {"cuda": ("cuda", "triton", "ref"), "cpu": ("ref",)}  # see the module docstring


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the trailing cos.shape[0] tokens of x (B, N, H, D) in fp32; the prefix is untouched."""
    prefix = x.shape[1] - cos.shape[0]
    t = x[:, prefix:].float()
    t1, t2 = t.chunk(2, dim=-1)
    turned = t * cos.float()[None, :, None] + torch.cat((-t2, t1), dim=-1) * sin.float()[None, :, None]
    return torch.cat((x[:, :prefix], turned.to(x.dtype)), dim=1)


def query_key_mask(mask_logits: Tensor, N: int) -> Tensor:
    """EoMT's rule as a boolean (B, 1, M, N) mask, True = attend: the first M query rows see the
    trailing K = mask_logits.shape[2] keys where the logit is > 0, and every other key."""
    B, M, K = mask_logits.shape
    open_ = torch.ones(B, 1, M, N, dtype=torch.bool, device=mask_logits.device)
    open_[:, 0, :, N - K:] = mask_logits > 0
    return open_


def rope_attention_ref(q, k, v, cos=None, sin=None, mask_logits=None, scale=None):
    """Reference (and fallback): rope_ref on q and k, then F.scaled_dot_product_attention; with
    mask_logits, the first M rows again with query_key_mask."""
    if q.numel() == 0:  # nothing to attend (torch 2.11's CPU SDPA dies of SIGFPE on zero heads)
        return q.new_empty(q.shape)
    if cos is not None:
        q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, scale=scale).transpose(1, 2)
    if mask_logits is None:
        return out
    M = mask_logits.shape[1]
    masked = F.scaled_dot_product_attention(q[:, :M].transpose(1, 2), kt, vt,
                                            attn_mask=query_key_mask(mask_logits, q.shape[1]), scale=scale)
    return torch.cat((masked.transpose(1, 2), out[:, M:]), dim=1)


def check(q, k, v, cos=None, sin=None, mask_logits=None, scale=None):
    """Shape and device errors of every backend (ValueError naming the argument)."""
    shape = check_queries("rope_attention", q, "(B, N, H, D)")
    B, N, _, D = shape
    device = q.device  # read once: every tensor attribute costs a call
    for name, t in (("k", k), ("v", v)):
        if t.shape != shape:
            raise ValueError(f"rope_attention: {name} has shape {tuple(t.shape)} but q has {tuple(shape)}")
        if t.device != device:
            raise ValueError(f"rope_attention: {name} is on {t.device} but q is on {device}")
    if (cos is None) != (sin is None):
        raise ValueError("rope_attention: cos and sin must be given together")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            table = t.shape
            if len(table) != 2 or table[1] != D or table[0] > N:
                raise ValueError(f"rope_attention: {name} must be (HW, {D}) with HW <= N={N}, got "
                                 f"{tuple(table)} (q, k, v are token-major (B, N, H, D); SDPA's (B, H, N, D) "
                                 "is q.transpose(1, 2))")
            if t.device != device:
                raise ValueError(f"rope_attention: {name} is on {t.device} but q is on {device}")
        if cos.shape != sin.shape:
            raise ValueError(f"rope_attention: cos has shape {tuple(cos.shape)} but sin has "
                             f"{tuple(sin.shape)}")
        if D % 2:
            raise ValueError(f"rope_attention: RoPE needs an even head dim, got {D}")
    if mask_logits is not None:
        m = mask_logits.shape
        if len(m) != 3 or m[0] != B or m[1] + m[2] > N:
            raise ValueError(f"rope_attention: mask_logits must be (B={B}, M, K) with M + K <= N={N}, "
                             f"got {tuple(m)}")
        if mask_logits.device != device:
            raise ValueError(f"rope_attention: mask_logits is on {mask_logits.device} but q is on {device}")
        if not mask_logits.is_floating_point():
            raise ValueError(f"rope_attention: mask_logits must be floating point, got {mask_logits.dtype}")


def reasons(backend, q, k, v, cos=None, sin=None, mask_logits=None, scale=None) -> list[str]:
    """Why `backend` cannot run rope_attention on these tensors ([] if it can)."""
    if backend == "ref":
        return []
    D = q.shape[-1]
    why = kernel_reasons(backend, q.device, q.dtype)
    if backend == "triton":
        if q.dtype == torch.float32 and D > FP32_MAX_HEAD_DIM:
            why.append(f"float32 with head dim {D} > {FP32_MAX_HEAD_DIM} (would spill registers)")
        elif D not in HEAD_DIMS:
            why.append(f"head dim {D} is not a multiple of 16 in 16..128")
    elif D % 2:  # ATen attention takes any head dim; RoPE pairs need an even one
        why.append(f"head dim {D} is odd")
    why += layout_reasons((("q", q), ("k", k), ("v", v)), stride_along="the head dim")
    if cos is not None:
        why += [f"{n} has stride {t.stride(-1)} along the head dim (needs 1)"
                for n, t in (("cos", cos), ("sin", sin)) if t.stride(-1) != 1]
        if cos.dtype != sin.dtype:
            why.append(f"cos has dtype {cos.dtype} but sin has {sin.dtype}")
        if cos.dtype not in _ext.KERNEL_DTYPES:
            why.append(f"cos has dtype {cos.dtype}")
    if mask_logits is not None and mask_logits.dtype not in _ext.KERNEL_DTYPES:
        why.append(f"mask_logits has dtype {mask_logits.dtype}")
    if q.dim() != 4:
        return why
    if backend == "triton":
        why += tiled_reasons((("q", "tokens (N)", q.shape[1]),))
        if mask_logits is not None and mask_logits.dim() == 3:
            # the Triton kernel reads one batch item's logits with int32 offsets
            m = mask_logits
            span = sum((n - 1) * m.stride(d) for d, n in enumerate(m.shape) if d > 0 and n > 0)
            if span > INDEX_LIMIT:
                why.append(f"mask_logits reaches offset {span} within one batch item; the Triton kernel "
                           "indexes it with 32-bit offsets (limit 2**31 - 1)")
    elif backend == "cuda" and max(q.shape[1], q.shape[2]) > INDEX_LIMIT:
        why.append(f"q has N={q.shape[1]} tokens, H={q.shape[2]} heads; the CUDA kernel that rotates q and k "
                   "counts each in 32 bits (limit 2**31 - 1)")
    return why


def launch(backend, q, k, v, cos=None, sin=None, mask_logits=None, scale=None):
    scale = default_scale(q) if scale is None else float(scale)
    if backend == "ref":
        return rope_attention_ref(q, k, v, cos, sin, mask_logits, scale)
    if backend == "triton":
        triton = rope_attention_triton if torch.compiler.is_compiling() else _rope_attention_triton
        return triton(q, k, v, cos, sin, mask_logits, scale)
    return torch.ops.fastdino.rope_attention(q, k, v, cos, sin, mask_logits, scale)


def example(device, dtype):
    """ViT-L/16's attention at 512^2: 1029 tokens (1024 patches), 16 heads of 64."""
    qkv, table = Like(device, dtype, (1, 1029, 16, 64)), Like(device, dtype, (1024, 64))
    return qkv, qkv, qkv, table, table


def sample(device, dtype):
    """The self-check's problem: 21 tokens (5 prefix + a 4x4 grid), 2 heads of 32 (fastdino/selfcheck.py)."""
    g = sample_generator()
    q, k, v = (sample_tensor(g, device, dtype, 1, 21, 2, 32) for _ in range(3))
    angles = sample_tensor(g, device, torch.float32, 16, 32) * 3
    return q, k, v, angles.cos().to(dtype), angles.sin().to(dtype), None, None


OP = Op("rope_attention", PRIORITY, check, reasons, launch, example, sample, native_args=True,
        tensors=("q", "k", "v", "cos?", "sin?", "mask_logits?"), numbers=("scale?",))


@torch.library.custom_op("fastdino::rope_attention_triton", mutates_args=())
def rope_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
    mask_logits: Optional[Tensor],
    scale: float,
) -> Tensor:
    # A registered op can be called directly, so it guards its own inputs.
    check(q, k, v, cos, sin, mask_logits)
    errors = reasons("triton", q, k, v, cos, sin, mask_logits)
    if errors:
        raise ValueError(f"rope_attention (Triton kernel): {'; '.join(errors)}")
    return _rope_attention_triton(q, k, v, cos, sin, mask_logits, scale)


def _rope_attention_triton(q, k, v, cos, sin, mask_logits, scale):
    """The Triton kernel on checked arguments (dispatch calls it outside torch.compile)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rope_attention_fwd(q, k, v, cos, sin, scale, out, mask_logits=mask_logits, interpret=_ext.INTERPRET)
    return out


@rope_attention_triton.register_fake
def _(q, k, v, cos, sin, mask_logits, scale):
    return q.new_empty(q.shape)


if _ext.HAS_EXT:

    @torch.library.register_fake("fastdino::rope_attention")
    def _(q, k, v, cos, sin, mask_logits, scale):
        return q.new_empty(q.shape)


def rope_attention(q, k, v, cos=None, sin=None, mask_logits: Optional[Tensor] = None,
                   scale: Optional[float] = None, *, backend: Optional[str] = None):
    """Attention over (B, N, H, D) q, k, v with DINOv3's RoPE on the trailing cos.shape[0] tokens.

    Equivalent to `rope_attention_ref`; returns (B, N, H, D). `scale` defaults to D**-0.5.
    `mask_logits` (B, M, K): EoMT's query-to-patch mask (see the module docstring).
    `backend` pins one backend (ValueError with the reasons if it cannot run).
    """
    # the default scale resolved here: the call then matches the C++ schema (native_args)
    return OP.dispatch(backend, q, k, v, cos, sin, mask_logits, default_scale(q) if scale is None else scale)
