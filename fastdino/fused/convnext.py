"""DINOv3 ConvNeXt blocks of all three libraries, and dinov3's linear segmentation head.

The block (dwconv 7x7 -> channels-last LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> gamma ->
residual) runs as dwconv_layer_norm, which reads the NCHW or channels-last input in place and
writes (B, H, W, C) tokens, then the MLP on fused_linear with gamma and the residual in the second
GEMM's epilogue (where fused_linear runs; the block's own Linears otherwise). The residual is the
input seen as NHWC, so the block returns an NCHW-shaped tensor in channels-last memory: from the
second block of a stage on, nothing is permuted or copied between blocks.

facebookresearch/dinov3: `Block` (dinov3/models/convnext.py; a generic name, recognised by its
structure) with its own channels_last `LayerNorm`; transformers: `DINOv3ConvNextLayer`; timm:
`ConvNeXtBlock` (its `mlp` is timm's Mlp, swapped by the MLP family). dinov3's `LinearHead`
(BatchNorm + 1x1 conv over the concatenated taps) runs with its BatchNorm folded into the conv.
"""

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._dispatch import Like
from ..ops.dwconv_layer_norm import OP as DWCONV_LAYER_NORM
from .common import (
    ForwardCache,
    Rule,
    _is_plain_layer_norm,
    autocast_on,
    buffer_key,
    children_reasons,
    decide,
    picked,
)
from .mlp import fused_mlp, is_exact_gelu, mlp_residual
from .sources import dinov3, is_from, timm, transformers

DINOV3_CONVNEXT = dinov3("models.convnext")
HF_CONVNEXT = transformers("dinov3_convnext")

# Channels-last LayerNorms of the three libraries: dinov3's own class (weight, bias, eps,
# data_format; runs F.layer_norm) and transformers' nn.LayerNorm subclass; timm's is checked by
# _is_plain_layer_norm.
_DATA_FORMAT_NORMS = (("LayerNorm", DINOV3_CONVNEXT), ("DINOv3ConvNextLayerNorm", HF_CONVNEXT))


def dwconv_reasons(conv: nn.Module, name: str) -> list[str]:
    """A depthwise 7x7 nn.Conv2d, stride 1, padding 3, zero padding: what dwconv_layer_norm computes."""
    if type(conv) is not nn.Conv2d:
        return [f"{name} is {type(conv).__name__}, not nn.Conv2d"]
    C = conv.in_channels
    if not (conv.out_channels == conv.groups == C):
        return [f"{name} is not depthwise (in {C}, out {conv.out_channels}, groups {conv.groups})"]
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation) != ((7, 7), (1, 1), (3, 3), (1, 1)):
        return [f"{name} is not a 7x7 stride-1 conv with padding 3 (kernel {conv.kernel_size}, stride "
                f"{conv.stride}, padding {conv.padding}, dilation {conv.dilation})"]
    if conv.padding_mode != "zeros":
        return [f"{name} pads with {conv.padding_mode!r}"]
    return []


def channels_norm_reasons(norm: nn.Module, name: str, C: int) -> list[str]:
    """A LayerNorm over the last dim of (B, H, W, C) tokens, with affine weight and bias."""
    known = any(is_from(norm, n, source) for n, source in _DATA_FORMAT_NORMS)
    if not known and not _is_plain_layer_norm(norm):
        return [f"{name} is {type(norm).__module__}.{type(norm).__name__}, not a LayerNorm fastdino knows"]
    if getattr(norm, "data_format", "channels_last") != "channels_last":
        return [f"{name} normalizes {norm.data_format}"]
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        return [f"{name} has no affine weight and bias"]
    if tuple(norm.normalized_shape) != (C,) or weight.shape != (C,) or bias.shape != (C,):
        return [f"{name} does not normalize {C} channels"]
    return []


def gamma_reasons(gamma, C: int) -> list[str]:
    if gamma is not None and (not isinstance(gamma, Tensor) or gamma.shape != (C,)):
        return [f"gamma is not a ({C},) tensor"]
    return []


class _FusedConvNextBlock:
    """A ConvNeXt block on dwconv_layer_norm + fused_linear. Subclasses name the parts
    (`_fastdino_parts()`: dwconv, norm, gamma) and give `_fastdino_mlp_residual(z, residual, gamma)`.
    The original forward runs where dwconv_layer_norm would pick its reference (also a pinned
    "ref"), under autocast, for parameters in another dtype than the input (promotion), and in
    training with drop path active."""

    _fastdino_op = "dwconv_layer_norm"  # what the patch report names
    _fastdino_more_ops = ("fused_linear",)  # also run (the MLP): patch self-checks them ahead

    def _fastdino_block(self, x: Tensor) -> Optional[Tensor]:
        if x.dim() != 4 or autocast_on(x.device.type):
            return None
        if self.training and getattr(self.drop_path, "drop_prob", 0.0):
            return None
        conv, norm, gamma = self._fastdino_parts()
        if any(t is not None and t.dtype != x.dtype
               for t in (conv.weight, conv.bias, norm.weight, norm.bias, gamma)):
            return None
        backend = decide(self, DWCONV_LAYER_NORM, x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)
        if backend is None:
            return None
        z = DWCONV_LAYER_NORM.run(backend, x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)
        y = self._fastdino_mlp_residual(z, x.permute(0, 2, 3, 1), gamma)
        return y.permute(0, 3, 1, 2)

    def forward(self, x):
        y = self._fastdino_block(x)
        return super().forward(x) if y is None else y


class _LinearMlp:
    """The MLP as two nn.Linear children of the block (dinov3 and transformers)."""

    def _fastdino_mlp_residual(self, z: Tensor, residual: Tensor, gamma: Optional[Tensor]) -> Tensor:
        fc1, act, fc2 = self._fastdino_mlp_parts()
        y = fused_mlp(self, z, fc1.weight, fc1.bias, "gelu", None, None, fc2, residual, gamma)
        if y is not None:
            return y
        m = fc2(act(fc1(z)))
        return residual + (m if gamma is None else m * gamma)


class FusedConvNeXtOfficialBlock(_LinearMlp, _FusedConvNextBlock):
    """dinov3's ConvNeXt `Block`: dwconv, norm, pwconv1, act, pwconv2, gamma (or None), drop_path."""

    def _fastdino_parts(self):
        return self.dwconv, self.norm, self.gamma

    def _fastdino_mlp_parts(self):
        return self.pwconv1, self.act, self.pwconv2


class FusedDINOv3ConvNextLayer(_LinearMlp, _FusedConvNextBlock):
    """transformers' DINOv3ConvNextLayer: depthwise_conv, layer_norm, pointwise_conv1, activation_fn,
    pointwise_conv2, gamma, drop_path."""

    def _fastdino_parts(self):
        return self.depthwise_conv, self.layer_norm, self.gamma

    def _fastdino_mlp_parts(self):
        return self.pointwise_conv1, self.activation_fn, self.pointwise_conv2


class FusedConvNeXtBlock(_FusedConvNextBlock):
    """timm's ConvNeXtBlock (Linear MLP, no shortcut projection): conv_dw, norm, mlp, gamma."""

    def _fastdino_parts(self):
        return self.conv_dw, self.norm, self.gamma

    def _fastdino_mlp_residual(self, z: Tensor, residual: Tensor, gamma: Optional[Tensor]) -> Tensor:
        return mlp_residual(self.mlp, z, residual, gamma)


def block_reasons(conv: str, norm: str, fc1: str, act: Optional[str], fc2: str, mlp: Optional[str] = None):
    """Reasons function for a ConvNeXt block whose parts have these names; `mlp` names the child
    that holds fc1, act and fc2 where they are not the block's own (timm's `mlp`)."""

    def reasons(module: nn.Module) -> list[str]:
        names = (conv, norm, *((mlp,) if mlp else (fc1, act, fc2)), "gamma", "drop_path")
        missing = children_reasons(module, names)
        if missing:
            return missing
        c = getattr(module, conv)
        why = dwconv_reasons(c, conv)
        if why:
            return why
        C = c.in_channels
        why = channels_norm_reasons(getattr(module, norm), norm, C) + gamma_reasons(module.gamma, C)
        owner, prefix = (getattr(module, mlp), f"{mlp}.") if mlp else (module, "")
        missing = children_reasons(owner, (fc1, act, fc2))
        if missing:
            return why + [f"{mlp}: {m}" for m in missing]
        first, activation, second = getattr(owner, fc1), getattr(owner, act), getattr(owner, fc2)
        if type(first) is not nn.Linear or type(second) is not nn.Linear:
            why.append(f"{prefix}{fc1} or {prefix}{fc2} is not an nn.Linear")
        elif first.in_features != C or second.out_features != C:
            why.append(f"{prefix}{fc1} -> {prefix}{fc2} does not map {C} channels to {C}")
        if not is_exact_gelu(activation):
            why.append(f"{prefix}{act} is {type(activation).__name__}, not exact GELU")
        return why

    return reasons


def timm_block_reasons(module: nn.Module) -> list[str]:
    missing = children_reasons(module, ("conv_dw", "norm", "mlp", "gamma", "shortcut", "use_conv_mlp"))
    if missing:
        return missing
    why = [] if isinstance(module.shortcut, nn.Identity) else ["shortcut is a projection"]
    if module.use_conv_mlp:
        why.append("the MLP is 1x1 convs (conv_mlp=True)")
    if not isinstance(getattr(module.mlp, "norm", nn.Identity()), nn.Identity):
        why.append("mlp.norm is active")
    return why + block_reasons("conv_dw", "norm", "fc1", "act", "fc2", mlp="mlp")(module)


def block_backend(conv: str):
    """The report's backend: dwconv_layer_norm's pick for the block's parameters."""

    def backend(module: nn.Module) -> str:
        w = getattr(module, conv).weight
        vec = Like(w.device, w.dtype, (w.shape[0],))
        x = Like(w.device, w.dtype, (1, w.shape[0], 8, 8))
        return picked(DWCONV_LAYER_NORM, x, w, vec, vec, vec, 1e-6)

    return backend


# -- dinov3's LinearHead: BatchNorm folded into the 1x1 conv --------------------------------------


class FoldedLinearHead(ForwardCache):
    """dinov3's LinearHead in eval: ``conv(batchnorm(features))`` as one conv whose weight and bias
    have the BatchNorm's running statistics and affine parameters folded in (in fp32, then the
    conv's dtype), computed once per parameter version: load_state_dict, .to() or an optimizer
    step on any of them makes a new fold. The parameters themselves are untouched. In training
    (batch statistics, Dropout2d) the original forward runs."""

    def _fastdino_folded(self) -> tuple[Tensor, Tensor]:
        bn, conv = self.batchnorm_layer, self.conv
        tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias, conv.weight, conv.bias)
        return self._cached(lambda: tuple(None if t is None else buffer_key(t) for t in tensors) + (bn.eps,),
                            lambda: fold_batchnorm(bn, conv))

    def _fastdino_runs(self) -> bool:
        bn = self.batchnorm_layer
        return not (self.training or bn.training) and bn.running_mean is not None

    def forward(self, inputs):
        if not self._fastdino_runs():
            return super().forward(inputs)
        return F.conv2d(self._forward_feature(inputs), *self._fastdino_folded())

    def predict(self, x, rescale_to=(512, 512)):
        if not self._fastdino_runs():
            return super().predict(x, rescale_to)
        x = F.conv2d(self._forward_feature(x), *self._fastdino_folded())
        return F.interpolate(input=x, size=rescale_to, mode="bilinear")


def fold_batchnorm(bn: nn.Module, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the 1x1 conv equal to ``conv(bn(x))`` with bn's running statistics."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    shift = -bn.running_mean.float() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.float()
        shift = shift * bn.weight.float() + bn.bias.float()
    w = conv.weight.float()  # (O, C, 1, 1)
    bias = w[:, :, 0, 0] @ shift + (conv.bias.float() if conv.bias is not None else 0.0)
    return (w * scale[None, :, None, None]).to(conv.weight.dtype), bias.to(conv.weight.dtype)


def linear_head_reasons(module: nn.Module) -> list[str]:
    missing = children_reasons(module, ("batchnorm_layer", "conv", "dropout", "_forward_feature"))
    if missing:
        return missing
    bn, conv = module.batchnorm_layer, module.conv
    if type(bn).__name__ not in ("SyncBatchNorm", "BatchNorm2d"):
        return [f"batchnorm_layer is {type(bn).__name__}: no BatchNorm to fold"]
    if bn.running_mean is None:
        return ["batchnorm_layer keeps no running statistics"]
    if type(conv) is not nn.Conv2d or conv.groups != 1 or (conv.kernel_size, conv.stride, conv.padding,
                                                           conv.dilation) != ((1, 1), (1, 1), (0, 0), (1, 1)):
        return ["conv is not a plain 1x1 nn.Conv2d"]
    if conv.in_channels != bn.num_features:
        return [f"conv reads {conv.in_channels} channels, batchnorm_layer normalizes {bn.num_features}"]
    return []


RULES = (
    Rule("Block", FusedConvNeXtOfficialBlock,
         block_reasons("dwconv", "norm", "pwconv1", "act", "pwconv2"), block_backend("dwconv"),
         DINOV3_CONVNEXT,
         parts=("dwconv", "norm", "pwconv1", "act", "pwconv2", "drop_path"), params=("gamma",)),
    Rule("DINOv3ConvNextLayer", FusedDINOv3ConvNextLayer,
         block_reasons("depthwise_conv", "layer_norm", "pointwise_conv1", "activation_fn", "pointwise_conv2"),
         block_backend("depthwise_conv"), HF_CONVNEXT,
         parts=("depthwise_conv", "layer_norm", "pointwise_conv1", "activation_fn", "pointwise_conv2",
                "drop_path"), params=("gamma",)),
    # timm's block: its mlp is called as a module where it is not fused (fused.mlp's Mlp rule)
    Rule("ConvNeXtBlock", FusedConvNeXtBlock, timm_block_reasons, block_backend("conv_dw"),
         timm("models.convnext"), parts=("conv_dw", "norm", "mlp", "shortcut", "drop_path"),
         params=("gamma",),
         calls=("mlp",)),
    # fastdino.bench.models: the benchmarks' copy of the head
    Rule("LinearHead", FoldedLinearHead, linear_head_reasons, lambda module: "fold",
         replace(dinov3("eval.segmentation.models.heads.linear_head"),
                 modules=("dinov3.eval.segmentation.models.heads.linear_head", "fastdino.bench.models")),
         parts=("batchnorm_layer", "conv", "dropout"),
         pinnable=False),
)
