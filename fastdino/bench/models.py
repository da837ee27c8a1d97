"""The models `fastdino bench` builds by name, random init: DINOv3 ViT backbones, transformers'
Mask2Former on a DINOv3 ViT, EoMT-DINOv3, DINOv3 ConvNeXt + dinov3's linear head, and the official
ViT-Adapter + Mask2Former segmentor built by dinov3's own code from a local checkout.

Each builder returns a `Built`: the model (fp32 parameters, eval mode), its inputs, the parts the
breakdown times (module paths; a part that contains another is timed without it) and what one
timed call covers.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# DINOv3 ViT/16 sizes (all with 4 registers) and ConvNeXt depths and widths as published
# (github.com/facebookresearch/dinov3, arXiv 2508.10104).
VIT = {"s": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
       "b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
       "l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)}
CONVNEXT = {"t": ([3, 3, 9, 3], [96, 192, 384, 768]), "s": ([3, 3, 27, 3], [96, 192, 384, 768]),
            "b": ([3, 3, 27, 3], [128, 256, 512, 1024]), "l": ([3, 3, 27, 3], [192, 384, 768, 1536])}
ADE20K_CLASSES = 150
TIMED = "from the pixel tensor on the device to the model's outputs (no pre- or post-processing)"


@dataclass
class Built:
    model: nn.Module
    inputs: Any  # a tensor, a tuple of positional arguments or a dict of keyword arguments
    # part -> module paths; "path.*": the module's children (those of its ModuleLists and
    # Sequentials too), for a module its parent calls by method rather than through __call__
    components: dict[str, list[str]] = field(default_factory=dict)
    timed: str = TIMED
    bf16_weights: bool = True  # fastdino-bf16 on bf16 weights (False: a model that casts to fp32 itself)


@dataclass(frozen=True)
class Spec:
    build: Callable[..., Built]  # (resolution, batch, device, dinov3_repo) -> Built
    about: str
    needs_repo: bool = False


def _vit_config(size: str, **kw):
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(**VIT[size], num_register_tokens=4, patch_size=16, layerscale_value=1.0, **kw)


def _pixels(resolution, batch, device, channels_last=False):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def vit(size: str) -> Spec:
    def build(resolution, batch, device, dinov3_repo=None):
        from transformers import DINOv3ViTModel

        torch.manual_seed(0)
        model = DINOv3ViTModel(_vit_config(size, image_size=resolution)).to(device).eval()
        blocks = "model.layer" if hasattr(model, "model") else "layer"  # transformers 5.x : 4.x
        layers = [f"{blocks}.{i}" for i in range(len(model.get_submodule(blocks)))]
        return Built(model, {"pixel_values": _pixels(resolution, batch, device)},
                     {"patch embedding": ["embeddings", "rope_embeddings"], "backbone blocks": layers,
                      "norm": ["norm"]})

    return Spec(build, f"transformers DINOv3ViTModel, ViT-{size.upper()}/16 backbone")


def mask2former(size: str) -> Spec:
    def build(resolution, batch, device, dinov3_repo=None):
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        layers = VIT[size]["num_hidden_layers"]
        backbone = _vit_config(size, image_size=resolution, reshape_hidden_states=True,
                               out_indices=[layers // 4 * i for i in range(1, 5)])
        torch.manual_seed(0)
        model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone,
                                                                      num_labels=ADE20K_CLASSES))
        return Built(model.to(device).eval(), {"pixel_values": _pixels(resolution, batch, device)},
                     {"backbone": ["model.pixel_level_module.encoder"],
                      "pixel decoder": ["model.pixel_level_module.decoder"],
                      "transformer decoder": ["model.transformer_module"], "head": ["class_predictor"]})

    return Spec(build, f"transformers Mask2FormerForUniversalSegmentation (hidden 256, 100 queries) on a "
                       f"DINOv3 ViT-{size.upper()}/16 (4 taps)")


def eomt(size: str) -> Spec:
    def build(resolution, batch, device, dinov3_repo=None):
        from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

        cfg = EomtDinov3Config(**VIT[size], image_size=resolution, patch_size=16, num_queries=200,
                               num_blocks=4, num_labels=133)
        torch.manual_seed(0)
        model = EomtDinov3ForUniversalSegmentation(cfg).to(device).eval()
        model.attn_mask_probs.fill_(0.0)  # the inference setting: masks annealed off in training
        n = len(model.layers)
        return Built(model, {"pixel_values": _pixels(resolution, batch, device)},
                     {"patch embedding": ["embeddings", "rope_embeddings"],
                      "backbone blocks": [f"layers.{i}" for i in range(n - 4)],
                      "query blocks": [f"layers.{i}" for i in range(n - 4, n)],
                      "head": ["layernorm", "upscale_block", "mask_head", "class_predictor"]})

    return Spec(build, f"transformers EomtDinov3ForUniversalSegmentation, ViT-{size.upper()}/16, 200 "
                       "queries, 4 query blocks (COCO panoptic setting), attention masks off (inference)")


class LinearHead(nn.Module):
    """dinov3's linear segmentation head, with its attribute names (so fastdino.patch folds its
    BatchNorm as it does dinov3's): taps resized to the first's size and concatenated, Dropout2d,
    BatchNorm, 1x1 conv to the classes."""

    def __init__(self, in_channels, n_output_channels, dropout=0.1):
        super().__init__()
        self.channels = sum(in_channels)
        self.batchnorm_layer = nn.BatchNorm2d(self.channels)
        self.conv = nn.Conv2d(self.channels, n_output_channels, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def _forward_feature(self, inputs):
        size = inputs[0].shape[2:]
        maps = [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in inputs]
        return torch.cat(maps, 1)

    def forward(self, inputs):
        return self.conv(self.batchnorm_layer(self.dropout(self._forward_feature(inputs))))


class ConvNeXtLinear(nn.Module):
    """A DINOv3 ConvNeXt (transformers' DINOv3ConvNextBackbone, last stage) + the linear head, the
    logits upsampled x8 to a quarter of the input, as dinov3's linear segmentor returns them."""

    def __init__(self, size: str, classes: int = ADE20K_CLASSES):
        super().__init__()
        import transformers

        depths, dims = CONVNEXT[size]
        config = transformers.DINOv3ConvNextConfig(hidden_sizes=dims, depths=depths, out_features=["stage4"])
        # transformers 4.56 has no DINOv3ConvNextBackbone: its model's last hidden state is the same map
        backbone = getattr(transformers, "DINOv3ConvNextBackbone", None)
        self.backbone = (backbone or transformers.DINOv3ConvNextModel)(config)
        self.head = LinearHead([dims[-1]], classes)

    def forward(self, pixel_values):
        if hasattr(self.backbone, "model"):
            maps = self.backbone(pixel_values).feature_maps
        else:
            maps = self.backbone(pixel_values, output_hidden_states=True).hidden_states[-1:]
        logits = self.head(maps)
        return F.interpolate(logits, scale_factor=8, mode="bilinear")


def convnext(size: str) -> Spec:
    def build(resolution, batch, device, dinov3_repo=None):
        torch.manual_seed(0)
        model = ConvNeXtLinear(size).to(device, memory_format=torch.channels_last).eval()
        with torch.no_grad():  # running statistics a trained head would have: the fold is then not a no-op
            model.head.batchnorm_layer.running_mean.normal_(0, 0.5)
            model.head.batchnorm_layer.running_var.uniform_(0.5, 2.0)
        return Built(model, {"pixel_values": _pixels(resolution, batch, device, channels_last=True)},
                     {"backbone": ["backbone"], "head": ["head"]})

    return Spec(build, f"DINOv3 ConvNeXt-{size.upper()} (transformers, last stage) + dinov3's linear head "
                       "(BatchNorm + 1x1 conv, 150 classes), channels-last model and input")


def official_m2f(size: str, hidden_dim: int) -> Spec:
    def build(resolution, batch, device, dinov3_repo=None):
        if not dinov3_repo:
            raise ValueError("the official segmentor is built by dinov3's own code: give a local checkout of "
                             "facebookresearch/dinov3 with --dinov3-repo PATH (dinov3_repo=)")
        if not os.path.isdir(os.path.join(dinov3_repo, "dinov3")):
            raise ValueError(f"{dinov3_repo} is not a facebookresearch/dinov3 checkout (no dinov3/ package)")
        if dinov3_repo not in sys.path:
            sys.path.insert(0, dinov3_repo)
        try:
            from dinov3.eval.segmentation.models import build_segmentation_decoder
            from dinov3.hub import backbones
        except ImportError as e:
            raise ValueError(f"dinov3 at {dinov3_repo} does not import here: {type(e).__name__}: {e}") from e
        torch.manual_seed(0)
        backbone = getattr(backbones, f"dinov3_vit{size}16")(pretrained=False)
        model = build_segmentation_decoder(backbone, decoder_type="m2f", hidden_dim=hidden_dim,
                                           num_classes=ADE20K_CLASSES)
        # FeatureDecoder calls its parts' forward methods, the adapter the ViT's
        # get_intermediate_layers, the head its pixel decoder's forward_features: hooks go on what
        # those call
        adapter = ["spm", "interactions.*", "up", "norm1", "norm2", "norm3", "norm4"]
        components = {"backbone": ["segmentation_model.0.backbone.*"],
                      "adapter": [f"segmentation_model.0.{p}" for p in adapter],
                      "pixel decoder": ["segmentation_model.1.pixel_decoder.*"],
                      "transformer decoder": ["segmentation_model.1.predictor"]}
        # its pixel decoder casts to fp32 itself: fastdino-bf16 keeps fp32 weights, the bf16 policy
        # runs that region in bf16 (and the adapter runs the ViT under bf16 autocast on CUDA)
        return Built(model.to(device).eval(), _pixels(resolution, batch, device), components,
                     bf16_weights=False)

    return Spec(build, f"official dinov3 ViT-{size.upper()}/16 + ViT-Adapter + Mask2Former (hidden_dim "
                       f"{hidden_dim}), built with dinov3's build_segmentation_decoder (--dinov3-repo)",
                needs_repo=True)


MODELS: dict[str, Spec] = {
    **{f"vit{s}16": vit(s) for s in ("s", "b", "l")},
    **{f"m2f-vit{s}16": mask2former(s) for s in ("s", "l")},
    **{f"eomt-{s}": eomt(s) for s in ("s", "l")},
    **{f"convnext-{s}+linear": convnext(s) for s in ("t", "s", "b", "l")},
    **{f"official-m2f-vit{s}16-h{h}": official_m2f(s, h) for s in ("s", "l") for h in (384, 32)},
}


def build(name: str, resolution: int, batch: int, device, dinov3_repo: Optional[str] = None) -> Built:
    """The named model (see MODELS) at this resolution and batch, on `device`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; fastdino bench knows: {', '.join(MODELS)}")
    return MODELS[name].build(resolution, batch, torch.device(device), dinov3_repo)
