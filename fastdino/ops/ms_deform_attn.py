"""ms_deform_attn: multi-scale deformable attention (Deformable DETR), forward.

    out[b, q, h*Dh:(h+1)*Dh] = sum_{l, p} attention_weights[b, q, h, l, p]
                               * bilinear(value_l[b, :, h], sampling_locations[b, q, h, l, p])

value (B, S, heads, Dh) holds the L levels' maps flattened one after the other (level l is
rows level_start_index[l] .. + H_l * W_l, spatial_shapes[l] = (H_l, W_l)); sampling_locations
(B, Lq, heads, L, P, 2) are (x, y) in [0, 1]; attention_weights (B, Lq, heads, L, P) are already
softmaxed. Bilinear sampling is F.grid_sample's (align_corners=False, zero padding): what the
dinov3 ViT-Adapter, its Mask2Former pixel decoder and transformers' Mask2Former compute with
grid_sample, in fp32. The kernels read value in fp32, fp16 or bf16, locations and weights in fp32
or value's dtype (fp32 keeps sub-pixel positions on large maps), accumulate in fp32 and return
(B, Lq, heads * Dh) in value's dtype. Level shapes stay on the device: no host synchronisation,
so a patched decoder can be captured in a CUDA graph.

Backends: ``cuda`` and ``cpu`` (fastdino._C, csrc/ms_deform_attn.*: one thread per query, head
and channel pack, vector loads, no atomics), ``triton`` (kernels/ms_deform_attn.py: one program
per block of queries of one head), ``ref`` (grid_sample per level, in fp32). On CPU tensors the
C++ kernel runs first: it measured 1.5-4.7x faster than the grid_sample reference at the real
ViT-S shapes, fp32, 2 threads (pixel decoder at 512^2, Dh 24: 66 vs 175 ms; Dh 128: 188 vs
894 ms; adapter extractor, Dh 12: 14 vs 22 ms). Neither GPU kernel has been timed yet, so on
CUDA tensors the priority (cuda, triton, ref) follows the design: the C++ kernel's packed loads
against the Triton kernel's masked head-wide tiles. benchmarks/bench_ms_deform_attn.py measures
both. Forward only: with grad the reference runs.
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..kernels.ms_deform_attn import ms_deform_attn_fwd
from ._dispatch import BACKENDS, first_backend, kernel_reasons, requires_grad, resolve_backend

PRIORITY = {"cuda": ("cuda", "triton", "ref"), "cpu": ("cpu", "ref")}  # see the module docstring

Shapes = Union[Tensor, Sequence[Sequence[int]]]


def ms_deform_attn_ref(value: Tensor, spatial_shapes: Shapes, level_start_index: Optional[Tensor],
                       sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Reference (and fallback): one F.grid_sample per level, in fp32 (float64 for float64
    inputs), as the models compute it.

    `spatial_shapes` may be a list of (H, W) (no host synchronisation) or the (L, 2) tensor.
    """
    acc = torch.promote_types(value.dtype, torch.float32)
    B, S, Hh, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
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
    return out.to(value.dtype).contiguous()


@torch.library.custom_op("fastdino::ms_deform_attn_triton", mutates_args=())
def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    errors = _layout_reasons(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    errors += _ext.dtype_reasons(value.dtype)
    if errors:
        raise ValueError(f"ms_deform_attn (Triton kernel): {'; '.join(errors)}")
    B, S, Hh, Dh = value.shape
    out = torch.empty((B, sampling_locations.shape[1], Hh * Dh), dtype=value.dtype, device=value.device)
    ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out)
    return out


def _fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, S, Hh, Dh = value.shape
    return value.new_empty((B, sampling_locations.shape[1], Hh * Dh))


ms_deform_attn_triton.register_fake(_fake)
if _ext.HAS_EXT:
    torch.library.register_fake("fastdino::ms_deform_attn")(_fake)


def backend_reasons(backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why `backend` cannot run ms_deform_attn on `dtype` values on `device`."""
    return kernel_reasons("ms_deform_attn", backend, device, dtype)


def _check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
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
    if isinstance(spatial_shapes, Tensor):
        if tuple(spatial_shapes.shape) != (L, 2):
            raise ValueError(f"ms_deform_attn: spatial_shapes must be (L={L}, 2), got {tuple(spatial_shapes.shape)}")
        covered = int(spatial_shapes.prod(-1).sum()) if spatial_shapes.device.type == "cpu" else S  # no device sync
        if covered != S:
            raise ValueError(f"ms_deform_attn: spatial_shapes cover {covered} rows but value has S={S}")
    if level_start_index is not None and tuple(level_start_index.shape) != (L,):
        raise ValueError(f"ms_deform_attn: level_start_index must be (L={L},), got {tuple(level_start_index.shape)}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                    ("sampling_locations", loc), ("attention_weights", attention_weights)):
        if isinstance(t, Tensor) and t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")


def _layout_reasons(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> list[str]:
    """What the kernels need: contiguous tensors, int64 level tensors, fp32 or value-dtype locations."""
    reasons = []
    if not isinstance(spatial_shapes, Tensor) or level_start_index is None:
        reasons.append("spatial_shapes and level_start_index must be tensors")
    else:
        reasons += [f"{n} is {t.dtype}, not torch.int64" for n, t in
                    (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)) if t.dtype != torch.int64]
    ldt = sampling_locations.dtype
    if ldt not in (torch.float32, value.dtype):
        reasons.append(f"sampling_locations is {ldt}, not float32 or value's {value.dtype}")
    if attention_weights.dtype != ldt:
        reasons.append(f"attention_weights is {attention_weights.dtype} but sampling_locations is {ldt}")
    named = {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
             "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    reasons += [f"{n} is not contiguous" for n, t in named.items() if isinstance(t, Tensor) and not t.is_contiguous()]
    return reasons


def _input_reasons(*args) -> list[str]:
    return _layout_reasons(*args) + requires_grad(args[0], args[3], args[4])


def preferred_backend(device, dtype, input_reasons=()) -> tuple[str, dict[str, list[str]]]:
    """The first backend of PRIORITY[device] that applies, and why each one before it did not."""
    return first_backend(PRIORITY, device, lambda b: backend_reasons(b, device, dtype), input_reasons)


def select_backend(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return preferred_backend(value.device, value.dtype, _input_reasons(*args))


def ms_deform_attn(value: Tensor, spatial_shapes: Shapes, level_start_index: Optional[Tensor],
                   sampling_locations: Tensor, attention_weights: Tensor, backend: Optional[str] = None) -> Tensor:
    """Multi-scale deformable attention; equivalent to `ms_deform_attn_ref`. Returns (B, Lq, heads * Dh).

    `backend` pins one backend (ValueError with the reasons if it cannot run).
    """
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_args(*args)
    backend = resolve_backend(
        "ms_deform_attn", backend, lambda: select_backend(*args),
        lambda: backend_reasons(backend, value.device, value.dtype) + _input_reasons(*args),
    )
    if backend == "ref":
        return ms_deform_attn_ref(*args)
    if backend in ("cuda", "cpu"):
        return torch.ops.fastdino.ms_deform_attn(*args)
    return ms_deform_attn_triton(*args)


__all__ = ["BACKENDS", "ms_deform_attn", "ms_deform_attn_ref"]
