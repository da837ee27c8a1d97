"""A small DINOv3 ConvNeXt and linear segmentation head whose module tree, class names, attribute
names and state_dict keys follow the official facebookresearch/dinov3 code
(dinov3/models/convnext.py, dinov3/eval/segmentation/models/heads/linear_head.py), written from
their documented structure so that fastdino can be tested on them without the dinov3 package."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """dinov3's own LayerNorm: weight, bias, eps and a data_format ("channels_last" runs
    F.layer_norm on (..., C); "channels_first" normalises dim 1 of (B, C, H, W) by hand)."""

    def __init__(self, dim, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.eps, self.data_format, self.normalized_shape = eps, data_format, (dim,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


class Block(nn.Module):
    """dwconv 7x7 (NCHW) -> to NHWC -> norm -> pwconv1 -> GELU -> pwconv2 -> gamma -> to NCHW -> residual."""

    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        scale = layer_scale_init_value
        self.gamma = nn.Parameter(torch.full((dim,), scale)) if scale > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """Stem (4x4 stride-4 conv + channels_first LayerNorm), downsamplers (LayerNorm + 2x2 stride-2
    conv), stages of Blocks, a final nn.LayerNorm. `get_intermediate_layers` returns the per-stage
    maps (B, C_i, H_i, W_i) of the last `n` stages."""

    def __init__(self, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), drop_path_rate=0.0,
                 layer_scale_init_value=1e-6):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                             LayerNorm(dims[0], data_format="channels_first"))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            norm = LayerNorm(dims[i], data_format="channels_first")
            self.downsample_layers.append(nn.Sequential(norm, nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages, at = nn.ModuleList(), 0
        for i, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*(Block(dims[i], rates[at + j], layer_scale_init_value)
                                               for j in range(depth))))
            at += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.embed_dim = dims[-1]

    def get_intermediate_layers(self, x, n=1):
        outs = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            outs.append(x)
        return outs[-n:]

    def forward(self, x):
        x = self.get_intermediate_layers(x)[0]
        return self.norm(x.mean((-2, -1)))


class LinearHead(nn.Module):
    """dinov3's linear segmentation head: the taps resized (bilinear) to the first tap's size and
    concatenated, Dropout2d, BatchNorm (nn.SyncBatchNorm in dinov3), 1x1 conv to the classes."""

    def __init__(self, in_channels, n_output_channels, use_batchnorm=True, dropout=0.1,
                 batchnorm=nn.SyncBatchNorm):
        super().__init__()
        self.in_channels, self.channels = in_channels, sum(in_channels)
        self.n_output_channels = n_output_channels
        self.batchnorm_layer = batchnorm(self.channels) if use_batchnorm else nn.Identity()
        self.conv = nn.Conv2d(self.channels, n_output_channels, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def _forward_feature(self, inputs):
        maps = [x[:, :, None, None] if x.dim() == 2 else x for x in inputs]
        size = maps[0].shape[2:]
        return torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in maps], 1)

    def forward(self, inputs):
        return self.conv(self.batchnorm_layer(self.dropout(self._forward_feature(inputs))))

    def predict(self, x, rescale_to=(512, 512)):
        x = self.conv(self.batchnorm_layer(self._forward_feature(x)))
        return F.interpolate(x, size=rescale_to, mode="bilinear")


class ConvNeXtLinearSegmentor(nn.Module):
    """ConvNeXt backbone (last stage) + LinearHead, as dinov3's linear segmentation setup."""

    def __init__(self, n_classes=7, **kw):
        super().__init__()
        self.backbone = ConvNeXt(**kw)
        self.head = LinearHead([self.backbone.embed_dim], n_classes)

    def forward(self, x):
        return self.head(self.backbone.get_intermediate_layers(x, n=1))
