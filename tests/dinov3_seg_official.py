"""Modules that follow dinov3's segmentation code (dinov3/eval/segmentation/models): MSDeformAttn
(keys sampling_offsets, attention_weights, value_proj, output_proj; grid_sample core, forced to
fp32 under CUDA autocast) and the pixel decoder's post-norm encoder layer, written from their
documented structure so that fastdino can be tested on them without the dinov3 package."""

import torch
import torch.nn.functional as F
from torch import nn


def deform_core(value, shapes, locations, weights):
    """Per level grid_sample (bilinear, zeros, align_corners=False) of (B*heads, Dh, H, W) maps,
    weighted and summed over levels and points: (B, Lq, heads * Dh)."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    sizes = [int(h) * int(w) for h, w in shapes.tolist()]
    grids = 2 * locations - 1
    per_level = []
    for lvl, v in enumerate(value.split(sizes, dim=1)):
        h, w = (int(t) for t in shapes[lvl])
        maps = v.flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        per_level.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    w = weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)
    out = (torch.stack(per_level, dim=-2).flatten(-2) * w).sum(-1).view(B, M * D, Lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model=64, n_levels=3, n_heads=4, n_points=4, ratio=1.0):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = d_model, n_levels, n_heads, n_points, ratio
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, int(d_model * ratio))
        self.output_proj = nn.Linear(int(d_model * ratio), d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, int(self.ratio * self.d_model) // self.n_heads)
        offsets = self.sampling_offsets(query).view(N, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(N, Lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(N, Lq, self.n_heads, self.n_levels, self.n_points)
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        if torch.is_autocast_enabled("cuda") and value.is_cuda:  # custom_fwd(cast_inputs=torch.float32)
            with torch.autocast("cuda", enabled=False):
                out = deform_core(value.float(), input_spatial_shapes, loc.float(), weights.float())
        else:
            out = deform_core(value, input_spatial_shapes, loc, weights)
        return self.output_proj(out)


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm: src = norm1(src + attn(src + pos, ...)); src = norm2(src + linear2(relu(linear1(src))))."""

    def __init__(self, d_model=64, d_ffn=128, n_levels=3, n_heads=4, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(0.0), nn.LayerNorm(d_model)
        self.linear1, self.activation, self.dropout2 = nn.Linear(d_model, d_ffn), nn.ReLU(), nn.Dropout(0.0)
        self.linear2, self.dropout3, self.norm2 = nn.Linear(d_ffn, d_model), nn.Dropout(0.0), nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


def reference_points(shapes, batch, device=None):
    """Pixel-centre reference points of every level, normalised to [0, 1]: (B, S, L, 2)."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device),
                              torch.linspace(0.5, w - 0.5, w, device=device), indexing="ij")
        points.append(torch.stack((x.reshape(-1) / w, y.reshape(-1) / h), -1))
    ref = torch.cat(points)[None, :, None].expand(batch, -1, len(shapes), -1)
    return ref.contiguous()
