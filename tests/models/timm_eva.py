"""A small DINOv3 ViT whose module tree, attribute names and forward follow timm's Eva port
(timm/models/eva.py: Eva, EvaBlock, EvaAttention; timm/layers: LayerNorm, RotaryEmbeddingDinoV3),
written from its documented structure so that fastdino can be tested on it where timm does not
install (timm needs torchvision). tests/test_patch.py also runs the real timm model when present."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """timm.layers.LayerNorm with its fast-norm path off."""

    _fast_norm = False

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RotaryEmbeddingDinoV3(nn.Module):
    def __init__(self, dim, temperature=100.0):
        super().__init__()
        self.dim = dim
        periods = temperature ** (2.0 * torch.arange(dim // 4, dtype=torch.float32) / (dim // 2))
        self.register_buffer("periods", periods, persistent=False)

    def get_embed(self, shape):  # -> (HW, 2 * dim): cat([sin, cos]), half-split layout
        H, W = shape
        dev = self.periods.device
        ch = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5) / H
        cw = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5) / W
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :]).flatten(1).tile(2)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def rotate(x, emb):
    sin, cos = emb.chunk(2, -1)
    x1, x2 = x.chunk(2, -1)
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class EvaAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, num_prefix_tokens=5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv_bias_separate = False
        self.rotate_half = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.gate = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias)) if self.q_bias is not None else None
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rope is not None:
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], rotate(q[:, :, npt:], rope)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], rotate(k[:, :, npt:], rope)], dim=2).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C))))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class SwiGLU(nn.Module):
    """timm.layers.SwiGLU as the DINOv3 S+/H+/7B ports use it (separate fc1_g / fc1_x, hidden aligned)."""

    def __init__(self, dim, hidden, align_to=8):
        super().__init__()
        hidden += -hidden % align_to
        self.fc1_g, self.fc1_x = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.act, self.drop1, self.norm = nn.SiLU(), nn.Dropout(0.0), nn.Identity()
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class EvaBlock(nn.Module):
    def __init__(self, dim, num_heads, init_values=0.5, qkv_bias=True, num_prefix_tokens=5, swiglu_mlp=False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = EvaAttention(dim, num_heads, qkv_bias, num_prefix_tokens)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values)) if init_values is not None else None
        self.drop_path1 = nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.mlp = SwiGLU(dim, int(dim * 4 * 2 / 3)) if swiglu_mlp else Mlp(dim, 4 * dim)
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values)) if init_values is not None else None
        self.drop_path2 = nn.Identity()

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)


class Eva(nn.Module):
    def __init__(self, embed_dim=64, depth=2, num_heads=4, patch_size=16, num_reg_tokens=4, **block_kw):
        super().__init__()
        self.num_prefix_tokens = 1 + num_reg_tokens
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, num_reg_tokens, embed_dim) * 0.02)
        self.rope = RotaryEmbeddingDinoV3(embed_dim // num_heads)
        self.blocks = nn.ModuleList(EvaBlock(embed_dim, num_heads, num_prefix_tokens=self.num_prefix_tokens,
                                             **block_kw)
                                    for _ in range(depth))
        self.norm = LayerNorm(embed_dim, eps=1e-5)

    def forward_features(self, x):
        x = self.patch_embed(x)
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.reg_token.expand(B, -1, -1), x], dim=1)
        rope = self.rope.get_embed(shape=(H, W))
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return self.norm(x)
