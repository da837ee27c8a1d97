"""Modules that follow dinov3's segmentation code (dinov3/eval/segmentation/models): MSDeformAttn
(keys sampling_offsets, attention_weights, value_proj, output_proj; grid_sample core, forced to
fp32 under CUDA autocast), the ViT-Adapter (DINOv3_Adapter: spatial prior module, extractors with
ConvFFN/DWConv, no injector), the pixel decoder and the masked-attention transformer decoder,
written from their documented structure so that fastdino can be tested on
them without the dinov3 package."""

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
        per_level.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros",
                                       align_corners=False))
    w = weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)
    out = (torch.stack(per_level, dim=-2).flatten(-2) * w).sum(-1).view(B, M * D, Lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model=64, n_levels=3, n_heads=4, n_points=4, ratio=1.0):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads = d_model, n_levels, n_heads
        self.n_points, self.ratio = n_points, ratio
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
        self.linear2, self.dropout3 = nn.Linear(d_ffn, d_model), nn.Dropout(0.0)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                              padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


def reference_points(shapes, batch, device=None, n_levels=None):
    """Pixel-centre reference points of every level, normalised to [0, 1]: (B, S, L, 2), the same
    point for each of the L (default len(shapes)) levels it samples."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device),
                              torch.linspace(0.5, w - 0.5, w, device=device), indexing="ij")
        points.append(torch.stack((x.reshape(-1) / w, y.reshape(-1) / h), -1))
    ref = torch.cat(points)[None, :, None].expand(batch, -1, n_levels or len(shapes), -1)
    return ref.contiguous()


# The ViT-Adapter: a spatial prior module gives tokens at 1/8, 1/16, 1/32
# (21n tokens for a 1/16 grid of n = H_c * W_c), extractors pull the frozen ViT's taps into them
# with single-level deformable attention, and the four maps come out batch-normalised.


def deform_inputs(x, patch_size):
    """The extractors' inputs: the SPM tokens' reference points (one set for the batch: (1, 21n,
    1, 2)) over the ViT's one 1/patch level."""
    h, w = x.shape[-2:]
    shapes = torch.tensor([(h // patch_size, w // patch_size)], dtype=torch.long, device=x.device)
    starts = torch.zeros(1, dtype=torch.long, device=x.device)
    ref = reference_points([(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)], 1, x.device,
                           n_levels=1)
    return ref, shapes, starts


class DWConv(nn.Module):
    """3x3 depthwise conv applied to each of the three levels of the 21n tokens (16n / 4n / n)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        n = N // 21
        levels = [(x[:, :16 * n], 2 * H, 2 * W), (x[:, 16 * n:20 * n], H, W), (x[:, 20 * n:], H // 2, W // 2)]
        return torch.cat([self.dwconv(t.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
                          for t, h, w in levels], 1)


class ConvFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv = nn.Linear(dim, hidden), DWConv(hidden)
        self.act, self.fc2 = nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class Extractor(nn.Module):
    """c = c + MSDeformAttn(query_norm(c), ref, feat_norm(x)); c = c + ConvFFN(ffn_norm(c))."""

    def __init__(self, dim, n_heads, n_points=4, ratio=0.5, cffn_ratio=0.25):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(d_model=dim, n_levels=1, n_heads=n_heads, n_points=n_points, ratio=ratio)
        self.ffn, self.ffn_norm = ConvFFN(dim, int(dim * cffn_ratio)), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, query, reference_points, feat, spatial_shapes, level_start_index, H, W):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat),
                                  spatial_shapes,
                                  level_start_index, None)
        return query + self.ffn(self.ffn_norm(query), H, W)


class InteractionBlockWithCls(nn.Module):
    """dinov3's interaction block: an extractor (two more on the last block), no injector."""

    def __init__(self, dim, n_heads, extra_extractor=False):
        super().__init__()
        self.extractor = Extractor(dim, n_heads)
        self.extra_extractors = None
        if extra_extractor:
            self.extra_extractors = nn.Sequential(*(Extractor(dim, n_heads) for _ in range(2)))

    def forward(self, x, c, deform_inputs2, H_c, W_c):
        c = self.extractor(c, deform_inputs2[0], x, deform_inputs2[1], deform_inputs2[2], H_c, W_c)
        for extractor in self.extra_extractors or ():
            c = extractor(c, deform_inputs2[0], x, deform_inputs2[1], deform_inputs2[2], H_c, W_c)
        return c


def conv_bn_relu(cin, cout, stride):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SpatialPriorModule(nn.Module):
    """stem (3 x conv3x3 + BN + ReLU, the first strided, then max-pool: 1/4), conv2..4 (stride 2:
    1/8, 1/16, 1/32), fc1..4 (1x1 to the ViT width); c1 stays a map, c2..c4 become tokens."""

    def __init__(self, inplanes, dim):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(3, inplanes, 2), *conv_bn_relu(inplanes, inplanes, 1),
                                  *conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        widths = [inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes]
        for i in (2, 3, 4):
            setattr(self, f"conv{i}", nn.Sequential(*conv_bn_relu(widths[i - 2], widths[i - 1], 2)))
        for i in (1, 2, 3, 4):
            setattr(self, f"fc{i}", nn.Conv2d(widths[i - 1], dim, 1))

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c1 = self.fc1(c1)
        return c1, *(fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4,
                                                                                                     c4)))


class DINOv3_Adapter(nn.Module):  # noqa: N801 (dinov3's class name, which fastdino.patch matches)
    """The frozen ViT runs once under no_grad and a hard-coded CUDA bf16 autocast; its taps feed
    the extractors, then are resized onto the four maps (x1 -> 1/4, x2 -> 1/8, x3 -> 1/16,
    x4 -> 1/32). Returns {"1": 1/4, "2": 1/8, "3": 1/16, "4": 1/32} maps of the ViT width."""

    def __init__(self, backbone, interaction_indexes, n_heads=4, inplanes=16):
        super().__init__()
        dim = backbone.cls_token.shape[-1]
        self.backbone, self.interaction_indexes = backbone, interaction_indexes
        self.patch_size = backbone.patch_size
        self.level_embed = nn.Parameter(torch.randn(3, dim))
        self.spm = SpatialPriorModule(inplanes, dim)
        self.interactions = nn.Sequential(*(InteractionBlockWithCls(dim, n_heads,
                                                                    i == len(interaction_indexes) - 1)
                                            for i in range(len(interaction_indexes))))
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        for i in (1, 2, 3, 4):
            setattr(self, f"norm{i}", nn.BatchNorm2d(dim))

    def forward(self, x):
        deform_inputs2 = deform_inputs(x, self.patch_size)
        c1, c2, c3, c4 = self.spm(x)
        c2, c3, c4 = (c + self.level_embed[i] for i, c in enumerate((c2, c3, c4)))
        c = torch.cat([c2, c3, c4], 1)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda), torch.no_grad():
            taps = self.backbone.get_intermediate_layers(x, n=self.interaction_indexes,
                                                         return_class_token=True)
        B, dim = x.shape[0], c.shape[-1]
        H_c, W_c = x.shape[-2] // 16, x.shape[-1] // 16
        outs = []
        for layer, (tokens, _cls) in zip(self.interactions, taps):
            tokens = tokens.to(c.dtype)  # the taps come out of the autocast region in bf16 on a GPU
            c = layer(tokens, c, deform_inputs2, H_c, W_c)
            outs.append(tokens.transpose(1, 2).reshape(B, dim, H_c, W_c))
        n2, n3 = c2.shape[1], c3.shape[1]
        c2 = c[:, :n2].transpose(1, 2).reshape(B, dim, 2 * H_c, 2 * W_c)
        c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(B, dim, H_c, W_c)
        c4 = c[:, n2 + n3:].transpose(1, 2).reshape(B, dim, H_c // 2, W_c // 2)
        c1 = self.up(c2) + c1
        maps = [c1, c2, c3, c4]
        for i, (m, scale) in enumerate(zip(maps, (4, 2, 1, 0.5))):
            tap = outs[i] if scale == 1 else F.interpolate(outs[i], scale_factor=scale, mode="bilinear",
                                                           align_corners=False)
            maps[i] = m + tap
        return {str(i + 1): getattr(self, f"norm{i + 1}")(m) for i, m in enumerate(maps)}


class PixelDecoderEncoder(nn.Module):
    def __init__(self, d_model, d_ffn, n_heads, n_layers, n_levels=3):
        super().__init__()
        self.level_encoding = nn.Parameter(torch.randn(n_levels, d_model))
        self.layers = nn.ModuleList(MSDeformAttnTransformerEncoderLayer(d_model, d_ffn, n_levels, n_heads)
                                    for _ in range(n_layers))


class MSDeformAttnPixelDecoder(nn.Module):
    """The pixel decoder: features "4", "3", "2" (1/32, 1/16, 1/8) through
    1x1 conv + GroupNorm(32), sine position + level encoding, post-norm deformable encoder layers;
    one FPN level from feature "1" (1/4): lateral 1x1 + GN plus the upsampled 1/8 map, 3x3 conv +
    GN + ReLU; mask features by a 1x1 conv. forward_features runs in fp32 whatever the caller's
    autocast: the decorator and the .float() casts of the original."""

    def __init__(self, in_channels=64, conv_dim=64, mask_dim=64, n_heads=4, d_ffn=128, n_layers=2):
        super().__init__()
        self.input_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(in_channels, conv_dim, 1), nn.GroupNorm(32,
                                                                                                         conv_dim))
                                         for _ in range(3))
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.encoder = PixelDecoderEncoder(conv_dim, d_ffn, n_heads, n_layers)
        self.mask_feature = nn.Conv2d(conv_dim, mask_dim, 1)
        self.lateral_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, conv_dim, 1),
                                                          nn.GroupNorm(32, conv_dim))])
        self.output_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, padding=1),
                                                         nn.GroupNorm(32, conv_dim), nn.ReLU())])

    @torch.autocast("cuda", enabled=False)
    def forward_features(self, features):
        srcs, pos = [], []
        for i, name in enumerate(("4", "3", "2")):
            x = self.input_convs[i](features[name].float())
            srcs.append(x)
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2) + self.encoder.level_encoding[i])
        B, C = srcs[0].shape[:2]
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=srcs[0].device)
        sizes = [h * w for h, w in shapes]
        level_start = torch.tensor([0, sizes[0], sizes[0] + sizes[1]], device=srcs[0].device)
        out = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)
        pos_flat, ref = torch.cat(pos, 1), reference_points(shapes, B, srcs[0].device)
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, ref, spatial_shapes, level_start)
        maps = [o.transpose(1, 2).reshape(B, C, h, w) for o, (h, w) in zip(out.split(sizes, 1), shapes)]
        f1 = features["1"].float()
        y = self.lateral_convs[0](f1) + F.interpolate(maps[-1], size=f1.shape[-2:], mode="bilinear",
                                                       align_corners=False)
        maps.append(self.output_convs[0](y))
        return self.mask_feature(maps[-1]), maps[0], maps[:3]


# The masked-attention transformer decoder (heads/mask2former_transformer_decoder.py): sequence-first
# (Q x B x C, HW x B x C) layers around nn.MultiheadAttention, post-norm by default.


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine embedding of a (B, C, H, W) map: (B, 2 * num_pos_feats, H, W)."""

    def __init__(self, num_pos_feats=64, temperature=10000):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature

    def forward(self, x, mask=None):
        B, _, H, W = x.shape
        ones = torch.ones(B, H, W, device=x.device)
        y_embed, x_embed = ones.cumsum(1), ones.cumsum(2)
        eps, scale = 1e-6, 2 * torch.pi
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm, self.dropout = nn.LayerNorm(d_model), nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x if query_pos is None else x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, k, value=x, attn_mask=tgt_mask,
                                                key_padding_mask=tgt_key_padding_mask)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm, self.dropout = nn.LayerNorm(d_model), nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.multihead_attn(query=x if query_pos is None else x + query_pos,
                                                     key=memory if pos is None else memory + pos,
                                                     value=memory,
                                                     attn_mask=memory_mask,
                                                     key_padding_mask=memory_key_padding_mask)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__()
        self.linear1, self.dropout, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Dropout(dropout), \
            nn.Linear(dim_feedforward, d_model)
        self.norm, self.activation, self.normalize_before = nn.LayerNorm(d_model), F.relu, normalize_before

    def forward(self, tgt):
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    def __init__(self, in_channels=32, num_classes=5, hidden_dim=32, num_queries=10, nheads=4,
                 dim_feedforward=64,
                 dec_layers=5, pre_norm=False, mask_dim=32):
        super().__init__()
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.num_heads, self.num_layers, self.num_feature_levels = nheads, dec_layers, 3
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, normalize_before=pre_norm) for _ in range(dec_layers))
        self.post_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat, self.query_embed = nn.Embedding(num_queries, hidden_dim), nn.Embedding(num_queries,
                                                                                                hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Sequential() if in_channels == hidden_dim else nn.Conv2d(in_channels, hidden_dim, 1)
            for _ in range(self.num_feature_levels))
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x, mask_features, mask=None):
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            proj = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(proj.permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(output, mask_features,
                                                                               size_list[0])
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](output, src[level_index],
                                                                memory_mask=attn_mask,
                                                                memory_key_padding_mask=None,
                                                                pos=pos[level_index],
                                                                query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, tgt_mask=None,
                                                               tgt_key_padding_mask=None,
                                                               query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels])
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return {"pred_logits": predictions_class[-1], "pred_masks": predictions_mask[-1],
                "aux_outputs": [{"pred_logits": a, "pred_masks": b}
                                for a, b in zip(predictions_class[:-1], predictions_mask[:-1])]}

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        decoder_output = self.post_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear",
                                  align_corners=False)
        attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
                     < 0.5).bool().detach()
        return outputs_class, outputs_mask, attn_mask
