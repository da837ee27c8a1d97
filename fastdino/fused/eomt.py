"""EoMT (transformers' EomtForUniversalSegmentation and EomtDinov3ForUniversalSegmentation):
queries prepended to the last num_blocks layers, masked to their predicted patches. The fused model
passes the interpolated mask logits to its layers' rope_attention instead of a dense N x N mask;
its layers, attention and MLPs are the ViT ones (fused.vit, fused.mlp)."""

import torch
from torch import nn

from ..ops._dispatch import Like
from ..ops.rope_attention import OP as ROPE_ATTENTION
from .common import Rule, children_reasons, is_fused, linear_reasons, picked, seam_backend, sibling_class
from .sources import transformers
from .vit import (
    HF_ATTENTION_BACKEND,
    HF_ATTENTION_PARTS,
    HF_LAYER_CALLS,
    HF_LAYER_PARTS,
    LAYER_REASONS,
    FusedDINOv3ViTAttention,
    FusedDINOv3ViTLayer,
    hf_attention_reasons,
)


def eomt_reasons(module: nn.Module) -> list[str]:
    """transformers' EomtForUniversalSegmentation / EomtDinov3ForUniversalSegmentation."""
    reasons = children_reasons(module, ("embeddings", "layers", "layernorm", "query", "predict",
                                        "attn_mask_probs",
                                        "grid_size", "num_hidden_layers", "config"))
    if reasons:
        return reasons
    missing = [n for n in ("num_blocks", "num_queries") if not hasattr(module.config, n)]
    if missing or not hasattr(module.embeddings, "num_prefix_tokens"):
        return [f"config has no {', '.join(missing) or 'embeddings.num_prefix_tokens'}"]
    return []


class FusedEomtForUniversalSegmentation:
    """EoMT's forward without the dense (B, heads, N, N) attention mask.

    The original builds, for every masked block, a boolean N x N mask, writes the query-to-patch
    part from the interpolated mask logits, expands it over the heads and turns it into an
    additive float mask. Here the interpolated logits (B, Q, HW) go to the patched layers'
    attention as they are (rope_attention's `mask_logits`, rule logit > 0). Everything else is the
    original's sequence: queries prepended at layer L - num_blocks, a prediction from the
    layernormed tokens before each masked block while its attn_mask_probs entry is > 0, a mask
    kept for the following layers, random queries unmasked with probability 1 - p (the same
    torch.rand call, so the same draw), the final prediction. Outputs are the original's output
    class with the same fields. The original forward runs in training, with labels (the loss),
    with any extra argument (output_hidden_states, return_dict, ...), or when a masked layer or its
    attention was left unpatched.

    Which blocks predict a mask depends on the values of attn_mask_probs, which a torch.compile or
    torch.export trace cannot read: a trace uses the values read by the last eager forward, or at
    patch time (the exported program has those blocks' structure baked in).
    """

    _fastdino_op = "rope_attention"  # what the patch report names

    def _fastdino_runs(self, mask_labels, class_labels, kwargs) -> bool:
        cfg = self.config
        if self.training or mask_labels is not None or class_labels is not None or kwargs:
            return False
        if getattr(cfg, "output_hidden_states", False) or getattr(cfg, "output_attentions", False):
            return False
        if getattr(cfg, "return_dict", True) is False:
            return False
        first = self.num_hidden_layers - cfg.num_blocks
        return all(is_fused(layer) and is_fused(layer.attention) for layer in self.layers[first:])

    def _fastdino_refresh(self) -> tuple:
        """attn_mask_probs as floats: read now, or under a trace the values read last."""
        if torch.compiler.is_compiling():  # (no dict.setdefault or bool(dict): torch 2.11's compiler cannot)
            cache = self.__dict__.get("_fastdino_cache")
            probs = None if cache is None else cache.get("attn_mask_probs")
            if probs is None:
                raise RuntimeError("EoMT: attn_mask_probs decide which blocks predict masks and a trace "
                                   "cannot read their values: run the patched model once before compiling "
                                   "or exporting it")
            return probs
        cache = self.__dict__.setdefault("_fastdino_cache", {})
        if self.attn_mask_probs.device.type == "meta":  # no values: a shape-only forward masks every block
            return cache.get("attn_mask_probs", (1.0,) * self.attn_mask_probs.numel())
        cache["attn_mask_probs"] = tuple(self.attn_mask_probs.tolist())
        return cache["attn_mask_probs"]

    def forward(self, pixel_values, mask_labels=None, class_labels=None, patch_offsets=None, **kwargs):
        if not self._fastdino_runs(mask_labels, class_labels, kwargs):
            return super().forward(pixel_values, mask_labels=mask_labels, class_labels=class_labels,
                                   patch_offsets=patch_offsets, **kwargs)
        cfg = self.config
        hidden = self.embeddings(pixel_values)
        rope = getattr(self, "rope_embeddings", None)  # EoMT-DINOv3; EoMT on DINOv2 has none
        extra = {} if rope is None else {"position_embeddings": rope(pixel_values.to(hidden.dtype))}
        first = self.num_hidden_layers - cfg.num_blocks
        queries = cfg.num_queries
        probs = self._fastdino_refresh()  # one host read per forward, not two per masked block
        logits = None
        for idx, layer in enumerate(self.layers):
            if idx == first:
                query = self.query.weight[None].expand(hidden.shape[0], -1, -1).to(hidden.device)
                hidden = torch.cat((query, hidden), dim=1)
            if idx >= first and probs[idx - first] > 0:
                masks, _ = self.predict(self.layernorm(hidden))
                logits = nn.functional.interpolate(masks, size=self.grid_size, mode="bilinear").flatten(2)
                patches = hidden.shape[1] - queries - self.embeddings.num_prefix_tokens
                if logits.shape[2] != patches:
                    raise ValueError(f"EoMT: the mask grid {tuple(self.grid_size)} has {logits.shape[2]} "
                                     f"cells but the image gives {patches} patches (pixel_values must be "
                                     "config.image_size)")
                prob = probs[idx - first]
                if prob < 1:  # the original's _disable_attention_mask, same draw
                    unmasked = torch.rand(hidden.shape[0], queries, device=hidden.device) > prob
                    logits = logits.masked_fill(unmasked[..., None], 1.0)
            if logits is None:
                hidden = layer(hidden, **extra)
            else:
                hidden = layer(hidden, fastdino_mask_logits=logits, **extra)
        sequence_output = self.layernorm(hidden)
        masks, classes = self.predict(sequence_output)
        # e.g. EomtForUniversalSegmentationOutput
        output_class = self._fastdino_original_class.__name__ + "Output"
        return sibling_class(self, output_class)(
            loss=None, masks_queries_logits=masks, class_queries_logits=classes,
            last_hidden_state=sequence_output,
            patch_offsets=patch_offsets)


def eomt_attention_reasons(module: nn.Module) -> list[str]:
    """transformers' EomtAttention (EoMT on DINOv2: no RoPE, so any head dim)."""
    return children_reasons(module, ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim",
                                     "scale",
                                     "dropout")) or linear_reasons(module, EOMT_ATTENTION_PARTS)


class FusedEomtAttention(FusedDINOv3ViTAttention):
    """transformers' EomtAttention (EoMT on DINOv2): the same without RoPE, out_proj and scale."""

    _fastdino_out = "out_proj"
    _fastdino_scale = "scale"
    _fastdino_rope = False


def _backend(module: nn.Module) -> str:
    """The report's backend: rope_attention's pick for the last layer's attention."""
    w = module.layers[-1].attention.q_proj.weight
    qkv = Like(w.device, w.dtype, (1, 1, 1, module.layers[-1].attention.head_dim))
    return picked(ROPE_ATTENTION, qkv, qkv, qkv)


EOMT, EOMT_DINOV3 = transformers("eomt"), transformers("eomt_dinov3")
EOMT_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
# what the fused EoMT forward calls as modules: all but `query` (it reads its weight)
EOMT_CALLS = ("embeddings", "layers", "layernorm", "upscale_block", "mask_head", "class_predictor",
              "criterion",
              "dropout", "rope_embeddings")

RULES = (
    # The models: composites (their parts are checked by their own rules; the fused forward
    # requires its masked layers and their attention swapped).
    Rule("EomtDinov3ForUniversalSegmentation", FusedEomtForUniversalSegmentation, eomt_reasons, _backend,
         EOMT_DINOV3, calls=EOMT_CALLS),
    Rule("EomtForUniversalSegmentation", FusedEomtForUniversalSegmentation, eomt_reasons, _backend, EOMT,
         calls=EOMT_CALLS),
    # EoMT-DINOv3 layers are DINOv3ViT layers; EoMT on DINOv2 has no RoPE. The MLPs: fused.mlp
    Rule("EomtDinov3Layer", FusedDINOv3ViTLayer, LAYER_REASONS, seam_backend("norm2"), EOMT_DINOV3,
         parts=HF_LAYER_PARTS, calls=HF_LAYER_CALLS),
    Rule("EomtLayer", FusedDINOv3ViTLayer, LAYER_REASONS, seam_backend("norm2"), EOMT, parts=HF_LAYER_PARTS,
         calls=HF_LAYER_CALLS),
    Rule("EomtDinov3Attention", FusedDINOv3ViTAttention, hf_attention_reasons, HF_ATTENTION_BACKEND,
         EOMT_DINOV3, parts=HF_ATTENTION_PARTS, calls=HF_ATTENTION_PARTS),
    Rule("EomtAttention", FusedEomtAttention, eomt_attention_reasons, HF_ATTENTION_BACKEND, EOMT,
         parts=EOMT_ATTENTION_PARTS, calls=EOMT_ATTENTION_PARTS),
)
