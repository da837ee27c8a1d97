"""Fused forms of DINOv3 modules, written as mixins placed in front of the original class.

`fastdino.patch` turns a recognised module's class into ``Fused<Name>(mixin, original class)``:
the instance keeps its children, parameters, buffers and hooks, so state_dict keys and values are
untouched and only ``forward`` changes; `fastdino.unpatch` sets the original class back.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from .ops import add_layer_norm

# LayerScale classes and the name of their (C,) scale parameter.
LAYER_SCALE_PARAM = {"LayerScale": "gamma", "DINOv3ViTLayerScale": "lambda1"}


def layer_scale_reasons(module: nn.Module, name: str) -> list[str]:
    if isinstance(module, nn.Identity):
        return []
    param = LAYER_SCALE_PARAM.get(type(module).__name__)
    if param is None:
        return [f"{name} is {type(module).__name__}, not a known LayerScale"]
    gamma = getattr(module, param, None)
    if not isinstance(gamma, Tensor) or gamma.dim() != 1:
        return [f"{name}.{param} is not a 1-D tensor"]
    return []


def layer_norm_reasons(module: nn.Module, name: str) -> list[str]:
    if type(module) is not nn.LayerNorm:
        return [f"{name} is {type(module).__name__}, not nn.LayerNorm"]
    if module.weight is None or module.bias is None:
        return [f"{name} has no affine weight and bias"]
    if len(module.normalized_shape) != 1:
        return [f"{name} normalizes over {len(module.normalized_shape)} dims"]
    return []


def _layer_scale_gamma(module: nn.Module) -> Optional[Tensor]:
    if isinstance(module, nn.Identity):
        return None
    return getattr(module, LAYER_SCALE_PARAM[type(module).__name__])


def _keeps_dtype(x: Tensor, branch: Tensor, gamma: Optional[Tensor], norm: nn.LayerNorm) -> bool:
    """True when the unfused `y = x + ls(branch); z = norm(y)` gives y and z in x.dtype.

    Then casting branch and the parameters to x.dtype is exact (an upcast) and the fused op
    returns what the model would. Otherwise the original modules run: e.g. bf16 activations with
    an fp32 LayerScale (y promotes to fp32) or fp32 LayerNorm parameters (layer_norm keeps bf16
    but uses the fp32 values, which the one-dtype kernels would have to round).
    """
    dt = x.dtype
    t = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    if torch.promote_types(dt, t) != dt:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return dt == torch.float32  # autocast runs layer_norm in fp32 and returns fp32
    return torch.promote_types(dt, torch.promote_types(norm.weight.dtype, norm.bias.dtype)) == dt


def residual_layer_norm(x, branch, layer_scale, norm, backend=None):
    """``y = x + layer_scale(branch); z = norm(y)``, fused with add_layer_norm where dtypes allow."""
    gamma = _layer_scale_gamma(layer_scale)
    if not _keeps_dtype(x, branch, gamma, norm):
        y = x + layer_scale(branch)
        return y, norm(y)
    dt = x.dtype

    def cast(t):
        return t if t is None or t.dtype == dt else t.to(dt)

    return add_layer_norm(x, cast(branch), cast(gamma), cast(norm.weight), cast(norm.bias), norm.eps, backend)


class FusedDINOv3ViTLayer:
    """transformers' DINOv3ViTLayer with the attention -> MLP seam through add_layer_norm."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return super().forward(
                hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
            )
        h, _ = self.attention(
            self.norm1(hidden_states), attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )
        y, z = residual_layer_norm(hidden_states, h, self.layer_scale1, self.norm2, self._fastdino_backend)
        return self.layer_scale2(self.mlp(z)) + y


class FusedSelfAttentionBlock:
    """dinov3's SelfAttentionBlock with the attention -> MLP seam through add_layer_norm."""

    def _forward_list(self, x_list, rope_list=None):
        if self.training and self.sample_drop_ratio > 0.0:
            return super()._forward_list(x_list, rope_list=rope_list)
        out = []
        for x, rope in zip(x_list, rope_list):
            h = self.attn(self.norm1(x), rope=rope)
            y, z = residual_layer_norm(x, h, self.ls1, self.norm2, self._fastdino_backend)
            out.append(y + self.ls2(self.mlp(z)))
        return out

    def _forward(self, x, rope=None):
        return self._forward_list([x], rope_list=[rope])[0]
