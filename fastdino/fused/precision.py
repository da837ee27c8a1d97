"""The bf16 precision policy (patch(model, precision="bf16")): whole regions a segmentor keeps in
fp32 (dinov3's Mask2Former pixel decoder, which forces fp32, its ViT-Adapter, transformers'
Mask2Former pixel decoder) run under bf16 autocast; their outputs come back in fp32."""

import torch
from torch import Tensor, nn

from .common import Rule
from .sources import dinov3, transformers


def _unwrap_autocast(fn):
    """The function under torch's autocast decorator (dinov3's pixel decoder wraps forward_features
    in autocast(enabled=False) to force fp32), or fn itself. Other decorators are kept."""
    inner = getattr(fn, "__wrapped__", None)
    return inner if inner is not None and fn.__code__.co_name == "decorate_autocast" else fn


def _to_dtype(out, dtype: torch.dtype):
    """`out` with every floating tensor in it (tensors, tuples, lists, dicts, ModelOutputs) cast to dtype."""
    if isinstance(out, Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, dict):  # also transformers' ModelOutput, an OrderedDict kept in its own class
        for key in list(out.keys()):
            out[key] = _to_dtype(out[key], dtype)
        return out
    if isinstance(out, (tuple, list)):
        items = [_to_dtype(o, dtype) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    return out


class _Bf16Region:
    """Runs the original `_fastdino_method` under bf16 autocast: matmuls and convolutions in bf16,
    softmax, normalisation statistics and (in the fused deformable attention) sampling locations
    and weights in fp32. Floating outputs come back in the module's parameter dtype, so the rest of
    the model sees what it saw before."""

    _fastdino_method = "forward"

    def _fastdino_bf16_call(self, *args, **kwargs):
        original = _unwrap_autocast(getattr(self._fastdino_original_class, self._fastdino_method))
        param = next(self.parameters())
        with torch.autocast(param.device.type, dtype=torch.bfloat16):
            out = original(self, *args, **kwargs)
        return _to_dtype(out, param.dtype)


class Bf16Forward(_Bf16Region):
    """A region whose forward runs under the bf16 policy (transformers' Mask2FormerPixelDecoder,
    dinov3's DINOv3_Adapter)."""

    def forward(self, *args, **kwargs):
        return self._fastdino_bf16_call(*args, **kwargs)


class Bf16MSDeformAttnPixelDecoder(_Bf16Region):
    """dinov3's MSDeformAttnPixelDecoder: forward_features, which the original forces to fp32
    (autocast disabled, inputs cast with .float()), runs under the bf16 policy."""

    _fastdino_method = "forward_features"

    def forward_features(self, *args, **kwargs):
        return self._fastdino_bf16_call(*args, **kwargs)


def bf16_region_reasons(module: nn.Module) -> list[str]:
    params = list(module.parameters())
    if not params:
        return ["no parameters"]
    if any(p.dtype != torch.float32 for p in params):
        return ["parameters are not all float32 (the policy lowers an fp32 region)"]
    return []


# The regions run their original forward under autocast: every part is called as a module.
RULES = tuple(Rule(name, mixin, bf16_region_reasons, lambda m: "bf16", source, calls=("*",), pinnable=False,
                   precision="bf16")
              for name, mixin, source in (
                  ("MSDeformAttnPixelDecoder", Bf16MSDeformAttnPixelDecoder,
                   dinov3("eval.segmentation.models.heads.pixel_decoder")),
                  ("DINOv3_Adapter", Bf16Forward, dinov3("eval.segmentation.models.backbone.dinov3_adapter")),
                  ("Mask2FormerPixelDecoder", Bf16Forward, transformers("mask2former"))))
