"""Public functionals: each dispatches to the fastest backend that applies, else the reference."""

from .add_layer_norm import add_layer_norm, add_layer_norm_ref
from .fused_linear import fused_linear, fused_linear_ref
from .masked_attention import masked_attention, masked_attention_ref
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_ref
from .rope_attention import rope_attention, rope_attention_ref

OPS = {"add_layer_norm": add_layer_norm, "rope_attention": rope_attention, "fused_linear": fused_linear,
       "ms_deform_attn": ms_deform_attn, "masked_attention": masked_attention}

__all__ = ["add_layer_norm", "add_layer_norm_ref", "fused_linear", "fused_linear_ref", "masked_attention",
           "masked_attention_ref", "ms_deform_attn", "ms_deform_attn_ref", "rope_attention", "rope_attention_ref",
           "OPS"]
