"""masked_attention: Mask2Former's masked cross-attention with the mask read from the mask logits.

    out = softmax(q k^T * scale, keys blocked by the mask) v      q, out: (B, Lq, H, D); k, v: (B, Lk, H, D)

mask_logits (B, Lq, Lk) are the predicted mask logits of the previous decoder layer at this
level's resolution, one mask for every head. A key is blocked for a query where sigmoid(logit),
in the logits' dtype, is below 0.5, and a query whose every key is blocked attends to all keys:
exactly what dinov3's MultiScaleMaskedTransformerDecoder and transformers'
Mask2FormerMaskedAttentionDecoder build as a (B * heads, Q, HW) boolean mask before
nn.MultiheadAttention, without that mask. Without mask_logits it is plain attention (the
decoder's self-attention over the queries). Token-major q, k, v with any strides, so the
projections' outputs are read in place; any head dim up to 128 (2, 24, 32 occur).

Backends: ``triton`` (fastdino/kernels/masked_attention.py: the mask packed once as bits, then
flash-style attention whose keys are split across programs where the queries alone leave SMs idle),
``cuda`` and ``cpu`` (fastdino._C, csrc/masked_attention.*: one warp per query row on the GPU, its
32 lanes scoring 32 keys at a time; a row loop on the CPU), ``ref`` (the models' own mask
construction, then nn.MultiheadAttention's math, which the decoders run: torch's CPU SDPA would give
0, not NaN, for a query row whose every score is NaN). On CUDA tensors the untuned priority is
(triton, ref): the Triton kernel runs its products on tensor cores (HGMMA on sm_90,
fastdino.kernels.profile); the C++ kernel runs them as scalar FMAs on CUDA cores, estimated an order
of magnitude slower at batch 32, so it runs only when pinned or when fastdino.tune measures it
fastest; neither is timed yet (benchmarks/bench_masked_attention.py). Both index in 64 bits and
launch along one grid axis, whose 2**31 - 1 programs bound B * H * Lq; the Triton kernels number
query and key rows in 32 bits. On CPU tensors the reference is picked, so a patched decoder runs its
own modules: with 2 threads, fp32, one cross-attention layer with its projections (Q 100, 16 heads)
took 4.5 / 18.8 / 561 ms against the C++ kernel's 12.8 / 59.0 / 1125 ms at (HW, C) = (1024, 256),
(4096, 256), (4096, 2048) (the kernel then skipped blocked keys; it now reads them, see below); the
C++ CPU kernel is kept as the compile-friendly form and runs when pinned. Forward kernels: with grad
dispatch picks the reference; a pinned kernel backend recomputes the reference for the backward
(ops/_dispatch.py).

NaN and Inf as in nn.MultiheadAttention with the decoders' mask, on every backend: a blocked key's
score gets -inf added (so a NaN or +Inf score stays NaN and poisons its row's softmax) and its
value row is weighted 0 (so a NaN or Inf value gives NaN in that channel); a NaN mask logit leaves
its key open (sigmoid(NaN) < 0.5 is False).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ..kernels import GRID_LIMIT, tiled_reasons
from ..kernels.masked_attention import MAX_HEAD_DIM, masked_attention_config, masked_attention_fwd
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

PRIORITY = {"cuda": ("triton", "ref"), "cpu": ("ref",)}  # see the module docstring
CUDA_ROWS_PER_BLOCK = 4  # csrc/cuda/masked_attention.cu: kWarps query rows of one (batch, head) per block


def blocked_keys(mask_logits: Tensor) -> Tensor:
    """The decoders' boolean mask, (B, Lq, Lk), True = blocked: sigmoid < 0.5, all-blocked rows lifted."""
    blocked = mask_logits.sigmoid() < 0.5
    return blocked & ~blocked.all(-1, keepdim=True)


def masked_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask_logits: Optional[Tensor] = None,
                         scale: Optional[float] = None) -> Tensor:
    """Reference (and fallback): the models' mask construction, then nn.MultiheadAttention's math
    path (what the decoders run: they ask for the attention weights) in q's dtype: scores plus an
    additive -inf mask, softmax, product with v. Returns (B, Lq, H, D)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    scores = qh @ kh.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask_logits is not None:
        blocked = blocked_keys(mask_logits)[:, None]
        scores = scores + torch.zeros(blocked.shape, dtype=scores.dtype, device=q.device).masked_fill(
            blocked, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2)


def check(q, k, v, mask_logits=None, scale=None):
    """Shape and device errors every backend shares (ValueError naming the argument)."""
    B, Lq, H, D = check_queries("masked_attention", q, "(B, Lq, H, D)")
    kshape, device = k.shape, q.device  # read once: every tensor attribute costs a call
    if len(kshape) != 4 or (kshape[0], kshape[2], kshape[3]) != (B, H, D):
        raise ValueError(f"masked_attention: k must be (B={B}, Lk, H={H}, D={D}), got shape {tuple(kshape)}")
    if v.shape != kshape:
        raise ValueError(f"masked_attention: v has shape {tuple(v.shape)} but k has {tuple(kshape)}")
    if kshape[1] == 0:
        raise ValueError("masked_attention: k and v have no keys (Lk = 0)")
    if mask_logits is not None and mask_logits.shape != (B, Lq, kshape[1]):
        raise ValueError(f"masked_attention: mask_logits must be (B={B}, Lq={Lq}, Lk={kshape[1]}), "
                         f"got shape {tuple(mask_logits.shape)}")
    if mask_logits is not None and not mask_logits.is_floating_point():
        raise ValueError(f"masked_attention: mask_logits must be the floating-point mask logits (a key is "
                         f"blocked where sigmoid(logit) < 0.5), got {mask_logits.dtype}")
    for name, t in (("k", k), ("v", v), ("mask_logits", mask_logits)):
        if t is not None and t.device != device:
            raise ValueError(f"masked_attention: {name} is on {t.device} but q is on {device}")


def reasons(backend, q, k, v, mask_logits=None, scale=None) -> list[str]:
    """Why `backend` cannot run masked_attention on these tensors ([] if it can)."""
    if backend == "ref":
        return []
    D = q.shape[-1]
    why = kernel_reasons(backend, q.device, q.dtype)
    if not 1 <= D <= MAX_HEAD_DIM:
        why.append(f"head dim {D} is not in 1..{MAX_HEAD_DIM}")
    why += layout_reasons((("q", q), ("k", k), ("v", v)), stride_along="the head dim")
    if mask_logits is not None:
        if mask_logits.dtype not in (torch.float32, q.dtype):
            why.append(f"mask_logits has dtype {mask_logits.dtype}, not float32 or q's {q.dtype}")
        if mask_logits.stride(-1) != 1 and mask_logits.shape[-1] > 1:
            why.append(f"mask_logits has stride {mask_logits.stride(-1)} along the keys (needs 1)")
    return why + size_reasons(backend, q, k, mask_logits)


def size_reasons(backend, q, k, mask_logits) -> list[str]:
    """The kernels' offsets are int64; what bounds them is the grid (its one axis holds 2**31 - 1
    programs) and, in the Triton kernels, the int32 numbering of query and key rows."""
    if q.dim() != 4:
        return []
    B, Lq, H, D = q.shape
    rows = B * H * Lq
    if backend == "cuda":  # (the bound on blocks bounds H, which the kernel holds in an int, too)
        blocks = B * H * -(-Lq // CUDA_ROWS_PER_BLOCK)
        if blocks > GRID_LIMIT:
            return [f"q has {rows} query rows (B * H * Lq); the CUDA kernel takes {CUDA_ROWS_PER_BLOCK} per "
                    f"block: {blocks} blocks, more than a grid holds (limit 2**31 - 1)"]
    elif backend == "triton":
        Lk = k.shape[1] if k.dim() == 4 else 0
        why = tiled_reasons((("q", "queries (Lq)", Lq), ("k", "keys (Lk)", Lk)))
        if mask_logits is not None and B * Lq > GRID_LIMIT:
            why.append(f"mask_logits has {B * Lq} rows (B * Lq); the Triton kernel that packs the mask "
                       "runs one program per row, more than a grid holds (limit 2**31 - 1)")
        block_m, _, _, _, splits = masked_attention_config(B, H, Lq, Lk, D, q.dtype.itemsize)
        programs = B * H * -(-Lq // block_m) * splits
        if programs > GRID_LIMIT:
            why.append(f"q has {rows} query rows (B * H * Lq); the Triton kernel takes {block_m} per "
                       f"program: {programs} programs, more than a grid holds (limit 2**31 - 1)")
        return why
    return []


def launch(backend, q, k, v, mask_logits=None, scale=None):
    scale = default_scale(q) if scale is None else float(scale)
    if backend == "ref":
        return masked_attention_ref(q, k, v, mask_logits, scale)
    if backend == "triton":
        triton = masked_attention_triton if torch.compiler.is_compiling() else _masked_attention_triton
        return triton(q, k, v, mask_logits, scale)
    return torch.ops.fastdino.masked_attention(q, k, v, mask_logits, scale)


def example(device, dtype):
    """A Mask2Former decoder's cross-attention: 100 queries over a 32x32 level, 8 heads of 32."""
    kv = Like(device, dtype, (1, 1024, 8, 32))
    return Like(device, dtype, (1, 100, 8, 32)), kv, kv, Like(device, dtype, (1, 100, 1024))


def sample(device, dtype):
    """The self-check's problem: 7 queries over 19 keys, 2 heads of 32, with mask logits (some query
    rows fully blocked) (fastdino/selfcheck.py)."""
    g = sample_generator()
    q = sample_tensor(g, device, dtype, 1, 7, 2, 32)
    k, v = (sample_tensor(g, device, dtype, 1, 19, 2, 32) for _ in range(2))
    logits = sample_tensor(g, device, dtype, 1, 7, 19)
    logits[:, 0] = -1.0
    return q, k, v, logits, None


OP = Op("masked_attention", PRIORITY, check, reasons, launch, example, sample, native_args=True,
        tensors=("q", "k", "v", "mask_logits?"), numbers=("scale?",))


@torch.library.custom_op("fastdino::masked_attention_triton", mutates_args=())
def masked_attention_triton(q: Tensor, k: Tensor, v: Tensor, mask_logits: Optional[Tensor],
                            scale: float) -> Tensor:
    # A registered op can be called directly, so it guards its own inputs.
    check(q, k, v, mask_logits)
    errors = reasons("triton", q, k, v, mask_logits)
    if errors:
        raise ValueError(f"masked_attention (Triton kernel): {'; '.join(errors)}")
    return _masked_attention_triton(q, k, v, mask_logits, scale)


def _masked_attention_triton(q, k, v, mask_logits, scale):
    """The Triton kernel on checked arguments (dispatch calls it outside torch.compile)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    masked_attention_fwd(q, k, v, mask_logits, scale, out, interpret=_ext.INTERPRET)
    return out


def _fake(q, k, v, mask_logits, scale):
    return q.new_empty(q.shape)


masked_attention_triton.register_fake(_fake)
if _ext.HAS_EXT:
    torch.library.register_fake("fastdino::masked_attention")(_fake)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask_logits: Optional[Tensor] = None,
                     scale: Optional[float] = None, *, backend: Optional[str] = None) -> Tensor:
    """Attention of (B, Lq, H, D) queries over (B, Lk, H, D) keys/values, keys blocked by the
    (B, Lq, Lk) mask logits as Mask2Former's decoder blocks them; equivalent to `masked_attention_ref`.

    Returns (B, Lq, H, D). `scale` defaults to D**-0.5. `backend` pins one backend (ValueError
    with the reasons if it cannot run).
    """
    # the default scale resolved here: the call then matches the C++ schema (native_args)
    return OP.dispatch(backend, q, k, v, mask_logits, default_scale(q) if scale is None else scale)
