"""ms_deform_attn: multi-scale deformable attention (Deformable DETR), forward.

    out[b, q, h*Dh:(h+1)*Dh] = sum_{l, p} attention_weights[b, q, h, l, p]
                               * bilinear(value_l[b, :, h], sampling_locations[b, q, h, l, p])

value (B, S, heads, Dh) holds the L levels' maps flattened and packed one after the other (level l
is the H_l * W_l rows after those of the levels before it, spatial_shapes[l] = (H_l, W_l)), as
every model lays them out. level_start_index, the models' argument, must hold those first rows:
it is checked where it lives on the CPU; the kernels and the reference derive the starts from
spatial_shapes and never read it, so they agree on one layout, and on CUDA tensors (no check
without a host synchronisation) no index and no shapes can make a kernel read outside value: rows
outside [0, S) are skipped. The reference reads the shapes on the host and raises where they do
not cover S. sampling_locations
(B, Lq, heads, L, P, 2) are (x, y) in [0, 1]; attention_weights (B, Lq, heads, L, P) are already
softmaxed. Bilinear sampling is F.grid_sample's (align_corners=False, zero padding): what the
dinov3 ViT-Adapter, its Mask2Former pixel decoder and transformers' Mask2Former compute with
grid_sample, in fp32. The kernels read value in fp32, fp16 or bf16, locations and weights in fp32
or value's dtype (fp32 keeps sub-pixel positions on large maps), accumulate in fp32 and return
(B, Lq, heads * Dh) in value's dtype. Level shapes stay on the device: no host synchronisation,
so a patched decoder can be captured in a CUDA graph.

NaN and Inf follow F.grid_sample on the CPU, on every backend and device: a sample whose location
is NaN or +-Inf makes its query-head's output NaN (whatever its weight), in-map corners are read
even at bilinear weight 0 (a NaN or Inf value there gives NaN), and a NaN weight gives NaN. (CUDA's
grid_sample differs for infinite locations: it skips them and gives 0; the reference applies the
CPU rule on every device.) Infinite attention weights, which no softmax gives, are outside the
rule: the kernels weight each corner by weight * bilinear weight, grid_sample the bilinear sum.

With ``reference_points`` (B or 1, Lq, L, 2 or 4) the two steps the modules run around the
sampling are fused into the kernels: ``sampling_locations`` then holds the raw output of the
module's ``sampling_offsets`` projection and ``attention_weights`` the raw output of its
``attention_weights`` projection (logits). The kernels compute the softmax over the L * P samples
of each query-head and the locations ``ref + offset / (W_l, H_l)`` (points) or
``ref[:2] + offset / P * ref[2:] * 0.5`` (boxes) in fp32, so neither the softmaxed weights nor
the (B, Lq, heads, L, P, 2) locations are written to memory.

Backends: ``cuda`` and ``cpu`` (fastdino._C, csrc/ms_deform_attn.*: one thread per query, head
and channel pack, vector loads, no atomics), ``triton`` (fastdino/kernels/ms_deform_attn.py: one program
per block of queries of one head), ``ref`` (softmax and locations in PyTorch, grid_sample per
level, in fp32). On CPU tensors the C++ kernel runs first: in the fused form it measured 2.2-5.2x
faster than the models' steps (softmax, locations, grid_sample) at the real ViT-S shapes, fp32,
batch 1, 2 threads (pixel decoder at 512^2, 16 heads, Dh 24: 87 vs 192 ms; Dh 128: 207 vs
1067 ms; adapter extractor, Dh 12: 16 vs 34 ms). Neither GPU kernel has been timed yet, so on
CUDA tensors the priority (cuda, triton, ref) follows the design: the C++ kernel's packed loads
against the Triton kernel's masked head-wide tiles. benchmarks/bench_ms_deform_attn.py measures
both. The C++ kernels index in 64 bits; the Triton kernel numbers query-heads and the rows of one
batch item of value in 32 bits, so dispatch passes it by where B * Lq * heads or S * heads * Dh
exceeds 2**31 - 1.
Forward kernels: with grad dispatch picks the reference; a pinned kernel backend recomputes the
reference for the backward (ops/_dispatch.py).
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels import INDEX_LIMIT, tiled_reasons
from ..kernels.ms_deform_attn import ms_deform_attn_fwd
from ._dispatch import Like, Op, kernel_reasons, sample_generator, sample_tensor

PRIORITY = {"cuda": ("cuda", "triton", "ref"), "cpu": ("cpu", "ref")}  # see the module docstring

Shapes = Union[Tensor, Sequence[Sequence[int]]]


def ms_deform_attn_ref(value: Tensor, spatial_shapes: Shapes, level_start_index: Optional[Tensor],
                       sampling_locations: Tensor, attention_weights: Tensor,
                       reference_points: Optional[Tensor] = None) -> Tensor:
    """Reference (and fallback): one F.grid_sample per level, in fp32 (float64 for float64
    inputs), as the models compute it; with `reference_points`, the models' softmax and location
    arithmetic first (`offset_locations`).

    `spatial_shapes` may be a list of (H, W) (no host synchronisation) or the (L, 2) tensor.
    """
    acc = torch.promote_types(value.dtype, torch.float32)
    B, S, Hh, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    if reference_points is not None:
        sampling_locations, attention_weights = offset_locations(
            reference_points.to(acc), sampling_locations.to(acc), attention_weights.to(acc),
            spatial_shapes.to(acc) if isinstance(spatial_shapes, Tensor) else value.new_tensor(shapes,
                                                                                               dtype=acc))
    check_levels(shapes, S)  # for CUDA-held shapes too, now read on the host
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    grids = 2 * sampling_locations.to(acc) - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + h * w].to(acc)  # (B, HW, Hh, Dh)
        v = v.permute(0, 2, 3, 1).reshape(B * Hh, Dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*Hh, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*Hh, Dh, Lq, L*P)
    weights = attention_weights.to(acc).transpose(1, 2).reshape(B * Hh, 1, Lq, L * P)
    out = (stacked * weights).sum(-1).view(B, Hh * Dh, Lq).transpose(1, 2)
    # grid_sample's CPU rule on every device: a non-finite location makes its query-head NaN
    lost = ~torch.isfinite(grids).all(-1).flatten(-2).all(-1)  # (B, Lq, Hh)
    out = out.reshape(B, Lq, Hh, Dh).masked_fill(lost[..., None], float("nan")).view(B, Lq, Hh * Dh)
    return out.to(value.dtype).contiguous()


def check_levels(shapes, S: int):
    """The level shapes, read on the host, against value's length S (ValueError naming spatial_shapes)."""
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive (H, W), got {shapes}")
    covered = sum(h * w for h, w in shapes)
    if covered != S:
        raise ValueError(f"ms_deform_attn: spatial_shapes cover {covered} rows but value has S={S} "
                         f"(the levels {shapes} flattened one after the other)")


def check_starts(shapes, level_start_index):
    """Host-held level starts against the packed levels of `shapes` (None: shapes on the device)."""
    if shapes is not None and level_start_index is not None and level_start_index.device.type == "cpu":
        packed = [0]
        for h, w in shapes[:-1]:
            packed.append(packed[-1] + h * w)
        starts = level_start_index.tolist()
        if starts != packed:
            raise ValueError(f"ms_deform_attn: level_start_index must be {packed}, where the levels of "
                             f"spatial_shapes start when packed in order, got {starts}")


def check_values(value, spatial_shapes, level_start_index, *rest):
    """What `check` reads of values, run on every call that dispatch decided before (it keeps the
    rest per signature): level shapes and starts held on the host. The C++ CPU op, which dispatch
    calls at once, checks them itself (csrc/ms_deform_attn.cpp: check_levels_cpu); on the device
    they are not read (no sync). The
    tensors last checked are held with their version counters: the same unchanged tensors (a
    pixel decoder passes one pair to every layer) are not read again."""
    global _LAST_LEVELS
    last = _LAST_LEVELS  # tensors compared by identity, their versions and S by value
    if (last is not None and last[0] is spatial_shapes and last[1] == spatial_shapes._version
            and last[2] is level_start_index and last[4] == value.shape[1]
            and (level_start_index is None or last[3] == level_start_index._version)):
        return
    if not (isinstance(spatial_shapes, Tensor) and spatial_shapes.device.type == "cpu"):
        return
    shapes = spatial_shapes.tolist()
    check_levels(shapes, value.shape[1])
    check_starts(shapes, level_start_index)
    # holding the tensors: their memory cannot be reused by other values while they are compared
    _LAST_LEVELS = (spatial_shapes, spatial_shapes._version, level_start_index,
                    None if level_start_index is None else level_start_index._version, value.shape[1])


_LAST_LEVELS = None


def offset_locations(reference_points: Tensor, sampling_offsets: Tensor, attention_logits: Tensor,
                     spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """What the deformable-attention modules compute before the sampling, in PyTorch: locations
    (B, Lq, heads, L, P, 2) from reference points (B or 1, Lq, L, 2) plus offsets scaled by each
    level's (W, H), or from boxes (B or 1, Lq, L, 4); the softmax of the logits over L * P."""
    B, Lq, Hh, L, P, _ = sampling_offsets.shape
    weights = attention_logits.flatten(-2).softmax(-1).view(B, Lq, Hh, L, P)
    if reference_points.shape[-1] == 2:
        normalizer = spatial_shapes.flip(-1)  # (W, H)
        return reference_points[:, :, None, :, None] + sampling_offsets / normalizer[:, None], weights
    if reference_points.shape[-1] == 4:
        return (reference_points[:, :, None, :, None, :2]
                + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5), weights
    raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")


def check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
          reference_points=None):
    """Shape and device errors every backend shares (ValueError naming the argument)."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (B, S, heads, Dh), got {tuple(value.shape)}")
    B, S, Hh, Dh = value.shape
    loc = sampling_locations
    if loc.dim() != 6 or loc.shape[0] != B or loc.shape[2] != Hh or loc.shape[5] != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations must be (B={B}, Lq, heads={Hh}, L, P, 2), "
                         f"got {tuple(loc.shape)}")
    if tuple(attention_weights.shape) != tuple(loc.shape[:5]):
        raise ValueError(f"ms_deform_attn: attention_weights must be {tuple(loc.shape[:5])}, "
                         f"got {tuple(attention_weights.shape)}")
    L = loc.shape[3]
    for name, t in (("value", value), ("sampling_locations", loc), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise ValueError(f"ms_deform_attn: {name} must be floating point, got {t.dtype}")
    if isinstance(spatial_shapes, Tensor):
        if tuple(spatial_shapes.shape) != (L, 2):
            raise ValueError(f"ms_deform_attn: spatial_shapes must be (L={L}, 2), "
                             f"got {tuple(spatial_shapes.shape)}")
        dt = spatial_shapes.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise ValueError(f"ms_deform_attn: spatial_shapes must hold integer (H, W) (int64 for the "
                             f"kernels), got {dt}")
        # read on the host only where they live there: no device sync
        shapes = spatial_shapes.tolist() if spatial_shapes.device.type == "cpu" else None
    else:
        shapes = [tuple(s) for s in spatial_shapes]
        integral = all(len(s) == 2 and all(hasattr(v, "__index__") for v in s) for s in shapes)
        if len(shapes) != L or not integral:
            raise ValueError(f"ms_deform_attn: spatial_shapes must be L={L} pairs of int (H, W), "
                             f"got {spatial_shapes!r}")
    if shapes is not None:
        check_levels(shapes, S)
    if level_start_index is not None:
        if tuple(level_start_index.shape) != (L,):
            raise ValueError(f"ms_deform_attn: level_start_index must be (L={L},), "
                             f"got {tuple(level_start_index.shape)}")
        if level_start_index.is_floating_point():
            raise ValueError(f"ms_deform_attn: level_start_index must hold integers, "
                             f"got {level_start_index.dtype}")
        check_starts(shapes, level_start_index)
    ref = reference_points
    if ref is not None and (ref.dim() != 4 or ref.shape[0] not in (1, B)
                            or tuple(ref.shape[1:3]) != (loc.shape[1], L) or ref.shape[3] not in (2, 4)):
        raise ValueError(f"ms_deform_attn: reference_points must be (B={B} or 1, Lq={loc.shape[1]}, L={L}, "
                         f"2 or 4), got {tuple(ref.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                    ("sampling_locations", loc), ("attention_weights", attention_weights),
                    ("reference_points", ref)):
        if isinstance(t, Tensor) and t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")


def reasons(backend, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            reference_points=None) -> list[str]:
    """Why `backend` cannot run ms_deform_attn on these tensors ([] if it can)."""
    if backend == "ref":
        return []
    # the kernels read contiguous tensors, int64 level tensors, fp32 or value-dtype locations (or
    # offsets and logits) and fp32 reference points
    why = kernel_reasons(backend, value.device, value.dtype)
    if not isinstance(spatial_shapes, (Tensor, Like)) or level_start_index is None:
        why.append("spatial_shapes and level_start_index must be tensors")
    else:
        why += [f"{n} is {t.dtype}, not torch.int64" for n, t in
                    (("spatial_shapes", spatial_shapes), ("level_start_index",
                                                          level_start_index)) if t.dtype != torch.int64]
    ldt = sampling_locations.dtype
    if ldt not in (torch.float32, value.dtype):
        why.append(f"sampling_locations is {ldt}, not float32 or value's {value.dtype}")
    if attention_weights.dtype != ldt:
        why.append(f"attention_weights is {attention_weights.dtype} but sampling_locations is {ldt}")
    if reference_points is not None and reference_points.dtype != torch.float32:
        why.append(f"reference_points is {reference_points.dtype}, not torch.float32")
    if backend == "triton" and value.dim() == 4 and sampling_locations.dim() == 6:
        # the Triton kernel's 32-bit indices: value rows within one batch item, query-heads
        B, S, Hh, Dh = value.shape
        if S * Hh * Dh > INDEX_LIMIT:
            why.append(f"value has {S * Hh * Dh} elements per batch item (S * heads * Dh); the Triton kernel "
                       "indexes them with 32-bit offsets (limit 2**31 - 1)")
        query_heads = B * sampling_locations.shape[1] * Hh
        if query_heads > INDEX_LIMIT:
            why.append(f"sampling_locations has {query_heads} query-heads (B * Lq * heads); the Triton "
                       "kernel numbers them with 32-bit integers (limit 2**31 - 1)")
        why += tiled_reasons((("sampling_locations", "queries (Lq)", sampling_locations.shape[1]),))
    elif backend in ("cuda", "cpu") and value.dim() == 4 and sampling_locations.dim() == 6:
        # the C++ kernels index in int64 but hold heads, channels and samples per query-head in int
        (Hh, Dh), (L, P) = value.shape[2:], sampling_locations.shape[3:5]
        if max(Hh, Dh, L * P) > INDEX_LIMIT:
            why.append(f"value has {Hh} heads of {Dh} channels, sampling_locations {L} * {P} samples per "
                       "query-head; the C++ kernels count each in 32 bits (limit 2**31 - 1)")
    named = {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
             "sampling_locations": sampling_locations, "attention_weights": attention_weights,
             "reference_points": reference_points}
    why += [f"{n} is not contiguous" for n, t in named.items()
            if isinstance(t, (Tensor, Like)) and not t.is_contiguous()]
    return why


def launch(backend, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        reference_points=None):
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, reference_points)
    if backend == "ref":
        return ms_deform_attn_ref(*args)
    if backend == "triton":
        triton = ms_deform_attn_triton if torch.compiler.is_compiling() else _ms_deform_attn_triton
        return triton(*args)
    return torch.ops.fastdino.ms_deform_attn(*args)


def example(device, dtype):
    """The Mask2Former pixel decoder at 512^2: 3 levels (1/8, 1/16, 1/32), 8 heads of 32, 4 points,
    from the offsets and logits."""
    Lq = 64 * 64 + 32 * 32 + 16 * 16
    levels = Like(device, torch.int64, (3, 2)), Like(device, torch.int64, (3,))
    return (Like(device, dtype, (1, Lq, 8, 32)), *levels, Like(device, torch.float32, (1, Lq, 8, 3, 4, 2)),
            Like(device, torch.float32, (1, Lq, 8, 3, 4)), Like(device, torch.float32, (1, Lq, 3, 2)))


def sample(device, dtype):
    """The self-check's problem, in the modules' form (offsets, logits and reference points): two
    levels (4x4, 2x2), 5 queries, 2 heads of 16, 2 points (fastdino/selfcheck.py)."""
    g = sample_generator()
    value = sample_tensor(g, device, dtype, 1, 20, 2, 16)
    shapes = torch.tensor([[4, 4], [2, 2]], device=device)
    starts = torch.tensor([0, 16], device=device)
    offsets = sample_tensor(g, device, torch.float32, 1, 5, 2, 2, 2, 2)
    logits = sample_tensor(g, device, torch.float32, 1, 5, 2, 2, 2)
    points = torch.rand(1, 5, 2, 2, generator=g, dtype=torch.float32).to(device)  # whatever the default dtype
    return value, shapes, starts, offsets, logits, points


OP = Op("ms_deform_attn", PRIORITY, check, reasons, launch, example, sample, check_values=check_values,
        native_args=True, tensors=("value", "level_start_index?", "sampling_locations", "attention_weights",
                                   "reference_points?"))


@torch.library.custom_op("fastdino::ms_deform_attn_triton", mutates_args=())
def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor,
                          reference_points: Optional[Tensor] = None) -> Tensor:
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, reference_points)
    # A registered op can be called directly, so it guards its own inputs.
    check(*args)
    errors = reasons("triton", *args)
    if errors:
        raise ValueError(f"ms_deform_attn (Triton kernel): {'; '.join(errors)}")
    return _ms_deform_attn_triton(*args)


def _ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           reference_points=None):
    """The Triton kernel on checked arguments (dispatch calls it outside torch.compile)."""
    B, S, Hh, Dh = value.shape
    out = torch.empty((B, sampling_locations.shape[1], Hh * Dh), dtype=value.dtype, device=value.device)
    ms_deform_attn_fwd(value, spatial_shapes, sampling_locations, attention_weights, out,
                       reference_points)
    return out


def _fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
          reference_points=None):
    B, S, Hh, Dh = value.shape
    return value.new_empty((B, sampling_locations.shape[1], Hh * Dh))


ms_deform_attn_triton.register_fake(_fake)
if _ext.HAS_EXT:
    torch.library.register_fake("fastdino::ms_deform_attn")(_fake)


def ms_deform_attn(value: Tensor, spatial_shapes: Shapes, level_start_index: Optional[Tensor],
                   sampling_locations: Tensor, attention_weights: Tensor,
                   reference_points: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """Multi-scale deformable attention; equivalent to `ms_deform_attn_ref`. Returns (B, Lq, heads * Dh).

    With `reference_points`, `sampling_locations` and `attention_weights` are the raw sampling
    offsets and attention logits (see the module docstring). `backend` pins one backend
    (ValueError with the reasons if it cannot run).
    """
    return OP.dispatch(backend, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, reference_points)
