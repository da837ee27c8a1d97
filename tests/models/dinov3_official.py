"""A small DINOv3 ViT whose module tree, attribute names and state_dict keys follow the official
facebookresearch/dinov3 code (dinov3/layers/*, dinov3/models/vision_transformer.py), written from
its documented structure so that fastdino can be tested on it without the dinov3 package."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):  # (B, 3, H, W) -> (B, h, w, D): flatten_embedding=False
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class RopePositionEmbedding(nn.Module):
    def __init__(self, embed_dim, num_heads, base=100.0, dtype=torch.float32):
        super().__init__()
        head_dim = embed_dim // num_heads
        assert embed_dim % (4 * num_heads) == 0
        self.dtype = dtype
        periods = base ** (2 * torch.arange(head_dim // 4, dtype=dtype) / (head_dim // 2))
        self.register_buffer("periods", periods, persistent=True)

    def forward(self, *, H, W):  # -> (sin, cos), each (H*W, head_dim)
        dev = self.periods.device
        ch = torch.arange(0.5, H, device=dev, dtype=self.dtype) / H
        cw = torch.arange(0.5, W, device=dev, dtype=self.dtype) / W
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def rope_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LinearKMaskedBias(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            mask = torch.ones_like(self.bias)
            mask[self.out_features // 3 : 2 * self.out_features // 3] = 0  # the K bias is forced to 0
            self.register_buffer("bias_mask", mask)

    def forward(self, x):
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, mask_k_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = (LinearKMaskedBias if mask_k_bias else nn.Linear)(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def apply_rope(self, q, k, rope):
        sin, cos = rope
        dtype = q.dtype
        q, k = q.to(sin.dtype), k.to(sin.dtype)
        prefix = q.shape[-2] - sin.shape[-2]  # cls + storage tokens stay un-rotated

        def rot(t):
            turned = t[:, :, prefix:] * cos + rope_rotate_half(t[:, :, prefix:]) * sin
            return torch.cat((t[:, :, :prefix], turned), -2)

        return rot(q).to(dtype), rot(k).to(dtype)

    def forward(self, x, attn_bias=None, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = self.apply_rope(q, k, rope)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim, hidden, align_to=8):
        super().__init__()
        d = int(hidden * 2 / 3)
        d = d + (-d % align_to)
        self.w1, self.w2, self.w3 = nn.Linear(dim, d), nn.Linear(dim, d), nn.Linear(d, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, ffn_ratio=4.0, init_values=1e-5, drop_path=0.0, ffn="mlp", eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = (Mlp if ffn == "mlp" else SwiGLUFFN)(dim, int(dim * ffn_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def _forward_list(self, x_list, rope_list=None):
        if self.training and self.sample_drop_ratio > 0.0:  # stochastic depth on a batch subset
            out = []
            for x, rope in zip(x_list, rope_list):
                keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.sample_drop_ratio
                x = x + keep * self.ls1(self.attn(self.norm1(x), rope=rope))
                out.append(x + keep * self.ls2(self.mlp(self.norm2(x))))
            return out
        out = []
        for x, rope in zip(x_list, rope_list):
            x_attn = x + self.ls1(self.attn(self.norm1(x), rope=rope))
            out.append(x_attn + self.ls2(self.mlp(self.norm2(x_attn))))
        return out

    def forward(self, x_or_x_list, rope_or_rope_list=None):
        if isinstance(x_or_x_list, Tensor):
            return self._forward_list([x_or_x_list], rope_list=[rope_or_rope_list])[0]
        rope = rope_or_rope_list if rope_or_rope_list is not None else [None] * len(x_or_x_list)
        return self._forward_list(x_or_x_list, rope_list=rope)


class DinoVisionTransformer(nn.Module):
    def __init__(self, embed_dim=64, depth=2, num_heads=4, patch_size=16, n_storage_tokens=4, ffn="mlp",
                 ffn_ratio=4.0, layerscale_init=1e-5, drop_path_rate=0.0):
        super().__init__()
        self.patch_size, self.n_storage_tokens = patch_size, n_storage_tokens
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.storage_tokens = nn.Parameter(torch.randn(1, n_storage_tokens, embed_dim) * 0.02)
        self.rope_embed = RopePositionEmbedding(embed_dim, num_heads)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(embed_dim, num_heads, ffn_ratio, layerscale_init, drop_path_rate,
                               ffn) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def prepare_tokens_with_masks(self, x):
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        cls = self.cls_token + 0 * self.mask_token
        tokens = torch.cat([cls.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), x.flatten(1, 2)],
                           dim=1)
        return tokens, (H, W)

    def get_intermediate_layers(self, x, *, n=1, norm=True, return_class_token=False):
        x, (H, W) = self.prepare_tokens_with_masks(x)
        take = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope_embed(H=H, W=W))
            if i in take:
                outputs.append(self.norm(x) if norm else x)
        patches = tuple(o[:, self.n_storage_tokens + 1 :] for o in outputs)
        return tuple(zip(patches, (o[:, 0] for o in outputs))) if return_class_token else patches

    def forward_features(self, x):
        x, (H, W) = self.prepare_tokens_with_masks(x)
        for blk in self.blocks:
            x = blk(x, self.rope_embed(H=H, W=W))
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_storage_tokens": x_norm[:, 1 : self.n_storage_tokens + 1],
                "x_norm_patchtokens": x_norm[:, self.n_storage_tokens + 1 :], "x_prenorm": x}

    def forward(self, x):
        return self.head(self.forward_features(x)["x_norm_clstoken"])
