"""Multi-scale deformable attention on ms_deform_attn: dinov3's MSDeformAttn (ViT-Adapter
extractors, Mask2Former pixel decoder) and transformers' Mask2Former, OneFormer and Deformable DETR
attention. The modules' projections run as they are; the softmax of the attention logits, the
offset -> location arithmetic and the grid_sample core run in one kernel."""

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._dispatch import Like
from ..ops.ms_deform_attn import OP as MS_DEFORM_ATTN
from .common import (
    ForwardCache,
    Rule,
    activation_dtype,
    autocast_on,
    children_reasons,
    decide,
    linear_reasons,
    needs_grad,
    picked,
)
from .sources import dinov3, is_from, transformers


def ms_deform_attn_reasons(module: nn.Module) -> list[str]:
    """The deformable-attention modules: their four Linears and a value width that splits into heads."""
    reasons = children_reasons(module, ("sampling_offsets", "attention_weights", "value_proj", "output_proj",
                                        "n_heads", "n_levels", "n_points"))
    if reasons:
        return reasons
    reasons = linear_reasons(module, ("sampling_offsets", "attention_weights", "value_proj", "output_proj"))
    if not reasons and module.value_proj.out_features % module.n_heads:
        reasons.append(f"value_proj width {module.value_proj.out_features} does not split into "
                       f"{module.n_heads} heads")
    core = getattr(module, "attn", None)
    if core is not None and not is_from(core, "MultiScaleDeformableAttention", DEFORMABLE_DETR):
        reasons.append(f"attn is {type(core).__module__}.{type(core).__name__}, not Deformable DETR's "
                       "MultiScaleDeformableAttention")
    return reasons


class _FusedMSDeformAttn(ForwardCache):
    """The deformable-attention modules' projections as they are, the rest in one ms_deform_attn
    kernel. The original forward runs where ms_deform_attn would pick its reference (inputs that
    require grad, no kernel for the device or the inputs' layout) or a pinned "ref"."""

    _fastdino_op = "ms_deform_attn"  # what the patch report names

    def _fastdino_choose(self, query: Tensor, value_input: Tensor, shapes, level_start_index,
                         reference_points: Tensor, fp32: bool, bf16: bool) -> Optional[str]:
        """ms_deform_attn's backend for this call, decided before anything is computed: `Like` stands
        for the values, the raw offsets and logits in the dtypes `_fastdino_forward` gives them, the
        fp32 reference points and level shapes not made yet (`shapes` a function)."""
        B, Lq, _ = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        act = activation_dtype(query)
        values = torch.bfloat16 if bf16 else torch.float32 if fp32 else act
        offsets = torch.float32 if bf16 or act != values else act
        grad = needs_grad(query, value_input, self.value_proj.weight, self.sampling_offsets.weight)
        backend = decide(
            self, MS_DEFORM_ATTN,
            Like(query.device, values, (B, value_input.shape[1], H, self.value_proj.out_features // H), grad),
            Like(query.device, torch.int64, (L, 2)) if callable(shapes) else shapes, level_start_index,
            Like(query.device, offsets, (B, Lq, H, L, P, 2), grad),
            Like(query.device, offsets, (B, Lq, H, L, P), grad),
            Like(reference_points.device, torch.float32, reference_points.shape))
        return None if backend == "ref" else backend

    def _fastdino_bf16(self, x: Tensor) -> bool:
        """The bf16 precision policy (patch(..., precision="bf16")) under an enabled autocast."""
        policy = getattr(self, "_fastdino_precision", None)
        return policy == "bf16" and autocast_on(x.device.type)

    def _fastdino_forward(self, query, value_input, reference_points, shapes, level_start_index, padding_mask,
                          fp32=False, need_weights=False):
        """(output, softmaxed attention weights if `need_weights` else None) as the module computes
        them, or None where the original forward must run. The projections run here; ms_deform_attn
        takes their raw offsets and logits and does the softmax and the location arithmetic in its
        kernel. `fp32`: the original's fp32 cast under CUDA autocast; under the bf16 policy values
        are sampled in bf16, the offset and logit projections run in fp32 (softmax and locations are
        fp32 inside the kernel either way). `shapes`: the (L, 2) level shapes, or a function that makes
        them, called only where the kernel runs."""
        bf16 = self._fastdino_bf16(query)
        fp32 = fp32 and not bf16
        backend = self._fastdino_choose(query, value_input, shapes, level_start_index, reference_points,
                                        fp32, bf16)
        if backend is None:
            return None
        shapes = shapes() if callable(shapes) else shapes
        reference_points = reference_points.float().contiguous()
        B, Lq, _ = query.shape
        S = value_input.shape[1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], float(0))
        value = value.view(B, S, H, -1)
        if bf16:  # the two small projections in fp32: bf16 offsets of a few pixels lose sub-pixel steps
            with torch.autocast(query.device.type, enabled=False):
                q32 = query.float()
                offsets, logits = self.sampling_offsets(q32), self.attention_weights(q32)
            value = value.bfloat16()
        else:
            offsets, logits = self.sampling_offsets(query), self.attention_weights(query)
        offsets, logits = offsets.view(B, Lq, H, L, P, 2), logits.view(B, Lq, H, L, P)
        if fp32:  # what the original's custom_fwd(cast_inputs=torch.float32) does under autocast
            value = value.float()
        if offsets.dtype not in (torch.float32, value.dtype) or logits.dtype != offsets.dtype:
            # the kernels read them in fp32 or value's dtype
            offsets, logits = offsets.float(), logits.float()
        out = MS_DEFORM_ATTN.run(backend, value, shapes, level_start_index, offsets, logits, reference_points)
        weights = logits.float().flatten(-2).softmax(-1).view(B, Lq, H, L, P) if need_weights else None
        return self.output_proj(out), weights


class FusedMSDeformAttn(_FusedMSDeformAttn):
    """dinov3's MSDeformAttn (ViT-Adapter extractors, Mask2Former pixel decoder)."""

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        fp32 = torch.is_autocast_enabled("cuda") and query.is_cuda
        out = self._fastdino_forward(query, input_flatten, reference_points, input_spatial_shapes,
                                     input_level_start_index, input_padding_mask, fp32)
        if out is None:
            return super().forward(query, reference_points, input_flatten, input_spatial_shapes,
                                   input_level_start_index, input_padding_mask)
        return out[0]


class FusedMask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(_FusedMSDeformAttn):
    """transformers' Mask2Former pixel-decoder deformable attention; returns (output, weights)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, position_embeddings=None, reference_points=None,
                spatial_shapes_list=None, level_start_index=None, output_attentions=False):
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings

        def shapes():  # the (L, 2) shapes on the device, copied there once per pyramid
            sizes = tuple(tuple(int(v) for v in s) for s in spatial_shapes_list)
            return self._cached(lambda: (sizes, query.device),
                                lambda: torch.tensor(sizes, dtype=torch.int64, device=query.device))

        out = self._fastdino_forward(query, encoder_hidden_states, reference_points, shapes,
                                     level_start_index, attention_mask, need_weights=output_attentions)
        if out is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes_list,
                                   level_start_index,
                                   output_attentions)
        return out


class FusedDeformableDetrMultiscaleDeformableAttention(_FusedMSDeformAttn):
    """transformers' DeformableDetrMultiscaleDeformableAttention (encoder and decoder of Deformable
    DETR): level shapes as a device tensor, attention_mask True where a pixel is valid; returns
    (output, weights). Reference points of 2 (points) or 4 (boxes) coordinates."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes=None,
                spatial_shapes_list=None,
                level_start_index=None, **kwargs):
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        padding = None if attention_mask is None else ~attention_mask
        # Its callers drop the weights (transformers computes them for no output).
        out = self._fastdino_forward(query, encoder_hidden_states, reference_points, spatial_shapes,
                                     level_start_index, padding)
        if out is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes, spatial_shapes_list,
                                   level_start_index, **kwargs)
        return out


class FusedOneFormerPixelDecoderEncoderMultiscaleDeformableAttention(_FusedMSDeformAttn):
    """transformers' OneFormer pixel-decoder deformable attention: Mask2Former's, with the level
    shapes also as a device tensor; attention_mask True where a pixel is padding."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes=None, level_start_index=None,
                output_attentions=False, spatial_shapes_list=None):
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        out = self._fastdino_forward(query, encoder_hidden_states, reference_points, spatial_shapes,
                                     level_start_index, attention_mask, need_weights=output_attentions)
        if out is None:
            # spatial_shapes_list only where it was given: transformers 4.x's forward has no such argument
            extra = {} if spatial_shapes_list is None else {"spatial_shapes_list": spatial_shapes_list}
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes, level_start_index,
                                   output_attentions, **extra)
        return out


def _backend(module: nn.Module) -> str:
    """The report's backend: ms_deform_attn's pick for the module's parameter device and dtype."""
    w = module.value_proj.weight
    H, L, P = module.n_heads, module.n_levels, module.n_points
    levels = Like(w.device, torch.int64, (L, 2)), Like(w.device, torch.int64, (L,))
    return picked(MS_DEFORM_ATTN, Like(w.device, w.dtype, (1, 1, H, w.shape[0] // H)), *levels,
                   Like(w.device, w.dtype, (1, 1, H, L, P, 2)), Like(w.device, w.dtype, (1, 1, H, L, P)),
                   Like(w.device, torch.float32, (1, 1, L, 2)))


DEFORMABLE_DETR = transformers("deformable_detr")
MS_DEFORM_ATTN_PARTS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")

RULES = tuple(Rule(name, mixin, ms_deform_attn_reasons, _backend, source, parts=MS_DEFORM_ATTN_PARTS + extra,
                   calls=("value_proj", "sampling_offsets", "attention_weights", "output_proj"))
              for name, mixin, source, extra in (
    # dinov3's ViT-Adapter and Mask2Former pixel decoder
    ("MSDeformAttn", FusedMSDeformAttn, dinov3("eval.segmentation.models.utils.ms_deform_attn"), ()),
    ("Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention",
     FusedMask2FormerPixelDecoderEncoderMultiscaleDeformableAttention, transformers("mask2former"), ()),
    # `attn`: the sampling core (MultiScaleDeformableAttention), which the kernel replaces
    ("DeformableDetrMultiscaleDeformableAttention", FusedDeformableDetrMultiscaleDeformableAttention,
     DEFORMABLE_DETR, ("attn",)),
    ("OneFormerPixelDecoderEncoderMultiscaleDeformableAttention",
     FusedOneFormerPixelDecoderEncoderMultiscaleDeformableAttention, transformers("oneformer"), ()),
))
