"""Mask2Former's masked-attention transformer decoders on masked_attention: transformers'
Mask2FormerMaskedAttentionDecoder and dinov3's MultiScaleMaskedTransformerDecoder. The predicted
mask logits go to the kernel as they are (no sigmoid, no per-head boolean mask, no all-blocked-row
pass); the queries' self-attention runs on the same op without a mask, the post-norm seams on
add_layer_norm."""

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._dispatch import Like
from ..ops.masked_attention import OP as MASKED_ATTENTION
from .common import (
    Rule,
    activation_dtype,
    children_reasons,
    decide,
    linear_reasons,
    needs_grad,
    picked,
    residual_layer_norm,
    sibling_class,
)
from .sources import dinov3, transformers


def _multihead_attention_reasons(attn: nn.Module, name: str) -> list[str]:
    """nn.MultiheadAttention as the Mask2Former decoders build it: sequence-first, one packed
    in_proj with bias, no bias_k/bias_v or zero_attn."""
    if type(attn) is not nn.MultiheadAttention:
        return [f"{name} is {type(attn).__name__}, not nn.MultiheadAttention"]
    if attn.batch_first or not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
        return [f"{name} is batch-first, has separate q/k/v weights or no in_proj bias"]
    if attn.bias_k is not None or attn.add_zero_attn:
        return [f"{name} has bias_k/bias_v or add_zero_attn"]
    return []


def mask2former_decoder_reasons(module: nn.Module) -> list[str]:
    """transformers' Mask2FormerMaskedAttentionDecoder: its layers, their attentions, norms and ReLU FFN."""
    reasons = children_reasons(module, ("layers", "layernorm", "mask_predictor", "num_feature_levels"))
    if reasons:
        return reasons
    reasons += children_reasons(module.mask_predictor, ("mask_embedder",))
    for i, layer in enumerate(module.layers):
        missing = children_reasons(layer, ("self_attn", "cross_attn", "fc1", "fc2", "activation_fn",
                                           "pre_norm",
                                           "self_attn_layer_norm", "cross_attn_layer_norm",
                                           "final_layer_norm"))
        if missing:
            return [f"layers.{i}: {r}" for r in missing]
        reasons += _multihead_attention_reasons(layer.cross_attn, f"layers.{i}.cross_attn")
        reasons += [f"layers.{i}.self_attn: {r}" for r in
                    children_reasons(layer.self_attn, ("q_proj", "k_proj", "v_proj", "out_proj",
                                                       "num_heads"))]
        reasons += linear_reasons(layer, ("fc1", "fc2"))
        if not _is_relu(layer.activation_fn):
            reasons.append(f"layers.{i}.activation_fn is {type(layer.activation_fn).__name__}, not ReLU")
    return reasons


def _sequence_first_heads(x: Tensor, heads: int) -> Tensor:
    """(L, B, C) -> (B, L, heads, C // heads), a view: the kernels take any token and batch stride."""
    L, B, C = x.shape
    return x.view(L, B, heads, C // heads).transpose(0, 1)


def _post_or_pre_norm(residual: Tensor, branch: Tensor, norm: nn.LayerNorm, pre_norm: bool, owner) -> Tensor:
    """Post-norm `norm(residual + branch)` (fused add + LayerNorm), or pre-norm `residual + branch`."""
    if pre_norm:
        return residual + branch
    return residual_layer_norm(residual, branch, None, norm, owner)[1]


def _mha_block(attn: nn.MultiheadAttention, norm, pre_norm: bool, tgt: Tensor, memory: Optional[Tensor], pos,
               query_pos, mask_logits: Optional[Tensor], backend: str, owner) -> Tensor:
    """One sequence-first attention layer around nn.MultiheadAttention on masked_attention's
    `backend`: queries tgt (+ query_pos), keys memory (+ pos), values memory (memory None:
    self-attention, keys tgt + query_pos, values tgt), the mask from mask_logits; residual, then
    post-norm (or the pre-norm form; the seam decides its own backend for `owner`, the decoder)."""
    Q, B, C = tgt.shape
    x = norm(tgt) if pre_norm else tgt
    query = x if query_pos is None else x + query_pos
    key, value = (query, x) if memory is None else (memory if pos is None else memory + pos, memory)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    heads = attn.num_heads
    q = _sequence_first_heads(nn.functional.linear(query, w_q, b_q), heads)
    k = _sequence_first_heads(nn.functional.linear(key, w_k, b_k), heads)
    v = _sequence_first_heads(nn.functional.linear(value, w_v, b_v), heads)
    out = MASKED_ATTENTION.run(backend, q, k, v, mask_logits)
    out = attn.out_proj(out.transpose(0, 1).reshape(Q, B, C))
    return _post_or_pre_norm(tgt, out, norm, pre_norm, owner)


def _ffn_block(linear1: nn.Linear, linear2: nn.Linear, norm, pre_norm: bool, tgt: Tensor, owner) -> Tensor:
    """The decoders' ReLU FFN with its residual and (post- or pre-) LayerNorm."""
    x = norm(tgt) if pre_norm else tgt
    return _post_or_pre_norm(tgt, linear2(torch.relu_(linear1(x))), norm, pre_norm, owner)


def _is_relu(act) -> bool:
    return act is nn.functional.relu or type(act) is nn.ReLU or type(act).__name__ == "ReLUActivation"


def _dropout_active(module: nn.Module) -> bool:
    return module.training and any((isinstance(m, nn.Dropout) and m.p > 0)
                                   or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
                                   for m in module.modules())


def _attention_like(x: Tensor, norm_weight: Tensor, heads: int, grad: bool = False, sizes=(1, 1, 1)) -> tuple:
    """masked_attention's arguments in a decoder of this width and head count, as `Like`: q, k, v
    from the projections of x, the mask logits in x's activation dtype. `sizes`: (batch, queries,
    keys of the first level), so that a decision (and a tuned choice) is per problem size."""
    dt = activation_dtype(x)
    B, Q, K = sizes
    D = norm_weight.shape[0] // heads
    kv = Like(x.device, dt, (B, K, heads, D), grad)
    return Like(x.device, dt, (B, Q, heads, D), grad), kv, kv, Like(x.device, dt, (B, Q, K), grad)


def _decoder_backend(decoder: nn.Module, x: Tensor, norm_weight: Tensor, heads: int, sizes) -> Optional[str]:
    """masked_attention's backend for every attention of one decoder forward, decided once: a
    pinned kernel backend, or (no grad) the kernel masked_attention picks; None: the original
    forward runs (for a pinned "ref", and with dropout in training, pinned or not)."""
    if _dropout_active(decoder):  # transformers' cross_attn carries config.dropout
        return None
    args = _attention_like(x, norm_weight, heads, needs_grad(x, norm_weight), sizes)
    backend = decide(decoder, MASKED_ATTENTION, *args)
    return None if backend == "ref" else backend


def decoder_backend(norm: str, heads):
    """The report's backend: masked_attention's pick for the decoder's width and head count."""

    def backend(module: nn.Module) -> str:
        w = getattr(module, norm).weight
        return picked(MASKED_ATTENTION, *_attention_like(w, w, heads(module)))

    return backend


class FusedMask2FormerMaskedAttentionDecoder:
    """transformers' Mask2FormerMaskedAttentionDecoder with the masked cross-attention on
    masked_attention: the mask predictor's logits, resized to the next level, go to the kernel as
    they are; no sigmoid, no (B * heads, Q, HW) boolean mask, no all-blocked-row fix-up pass (the
    kernel applies the rule). The queries' self-attention runs on masked_attention without a mask,
    the residual + LayerNorm seams on add_layer_norm. Returns what the original returns.

    The original forward runs for attention weights (output_attentions), dropout or layer drop in
    training, inputs that require grad, or where masked_attention would pick its reference.
    """

    _fastdino_op = "masked_attention"  # what the patch report names
    _fastdino_more_ops = ("add_layer_norm",)  # also run (the seams): patch self-checks them ahead

    def _fastdino_predict(self, output: Tensor, pixel_embeddings: Tensor, size) -> tuple[Tensor, Tensor]:
        """The mask predictor's (mask logits at 1/4, logits resized to `size` as (B, Q, HW))."""
        mask_embeddings = self.mask_predictor.mask_embedder(output.transpose(0, 1))
        outputs_mask = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, pixel_embeddings)
        resized = nn.functional.interpolate(outputs_mask, size=size, mode="bilinear", align_corners=False)
        return outputs_mask, resized.flatten(2)

    def _fastdino_layer(self, layer, hidden, level, pos, query_pos, features, mask_logits, backend) -> Tensor:
        Q, B, C = hidden.shape
        hidden = _mha_block(layer.cross_attn, layer.cross_attn_layer_norm, layer.pre_norm, hidden,
                            features[level],
                            None if pos is None else pos[level], query_pos, mask_logits, backend, self)
        # self-attention over the queries (Mask2FormerAttention: q pre-scaled by head_dim**-0.5)
        sa = layer.self_attn
        x = layer.self_attn_layer_norm(hidden) if layer.pre_norm else hidden
        x_pos = x if query_pos is None else x + query_pos
        q, k, v = sa.q_proj(x_pos), sa.k_proj(x_pos), sa.v_proj(x)
        out = MASKED_ATTENTION.run(backend, _sequence_first_heads(q, sa.num_heads),
                                   _sequence_first_heads(k, sa.num_heads),
                                   _sequence_first_heads(v, sa.num_heads),
                                   None, sa.scaling)
        out = sa.out_proj(out.transpose(0, 1).reshape(Q, B, C))
        hidden = _post_or_pre_norm(hidden, out, layer.self_attn_layer_norm, layer.pre_norm, self)
        return _ffn_block(layer.fc1, layer.fc2, layer.final_layer_norm, layer.pre_norm, hidden, self)

    def forward(self, inputs_embeds=None, multi_stage_positional_embeddings=None, pixel_embeddings=None,
                encoder_hidden_states=None, query_position_embeddings=None, feature_size_list=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        first = feature_size_list[0] if feature_size_list else (1, 1)
        sizes = (inputs_embeds.shape[1], inputs_embeds.shape[0], int(first[0]) * int(first[1]))
        backend = None if output_attentions else _decoder_backend(self, inputs_embeds, self.layernorm.weight,
                                                                  self.mask_predictor.num_heads, sizes)
        if backend is None:
            return super().forward(inputs_embeds, multi_stage_positional_embeddings, pixel_embeddings,
                                   encoder_hidden_states, query_position_embeddings, feature_size_list,
                                   output_attentions, output_hidden_states, return_dict)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        normed = self.layernorm(hidden)
        intermediate = (normed,)
        predicted_mask, mask_logits = self._fastdino_predict(normed, pixel_embeddings, feature_size_list[0])
        masks = (predicted_mask,)
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden,)
            level = idx % self.num_feature_levels
            hidden = self._fastdino_layer(layer, hidden, level, multi_stage_positional_embeddings,
                                          query_position_embeddings, encoder_hidden_states, mask_logits,
                                          backend)
            normed = self.layernorm(hidden)
            predicted_mask, mask_logits = self._fastdino_predict(
                normed, pixel_embeddings, feature_size_list[(idx + 1) % self.num_feature_levels])
            masks += (predicted_mask,)
            intermediate += (normed,)
        if output_hidden_states:
            all_hidden_states += (hidden,)
        hidden = hidden.transpose(1, 0)
        if not return_dict:
            return tuple(v for v in (hidden, all_hidden_states, None, intermediate, masks) if v is not None)
        return sibling_class(self, "Mask2FormerMaskedAttentionDecoderOutput")(
            last_hidden_state=hidden, hidden_states=all_hidden_states, attentions=None,
            intermediate_hidden_states=intermediate, masks_queries_logits=masks)


def official_mask2former_decoder_reasons(module: nn.Module) -> list[str]:
    """dinov3's MultiScaleMaskedTransformerDecoder: its three layer lists, heads and prediction heads."""
    reasons = children_reasons(module, ("transformer_self_attention_layers",
                                        "transformer_cross_attention_layers",
                                         "transformer_ffn_layers", "post_norm", "query_feat", "query_embed",
                                         "level_embed", "input_proj", "class_embed", "mask_embed", "pe_layer",
                                         "num_feature_levels", "num_layers", "num_heads"))
    if reasons:
        return reasons
    for i in range(module.num_layers):
        cross = module.transformer_cross_attention_layers[i]
        self_attn = module.transformer_self_attention_layers[i]
        ffn = module.transformer_ffn_layers[i]
        missing = (children_reasons(cross, ("multihead_attn", "norm", "normalize_before"))
                   + children_reasons(self_attn, ("self_attn", "norm", "normalize_before"))
                   + children_reasons(ffn, ("linear1", "linear2", "norm", "activation", "normalize_before")))
        if missing:
            return [f"layer {i}: {r}" for r in missing]
        reasons += _multihead_attention_reasons(cross.multihead_attn,
                                                f"transformer_cross_attention_layers.{i}")
        reasons += _multihead_attention_reasons(self_attn.self_attn, f"transformer_self_attention_layers.{i}")
        reasons += [f"transformer_ffn_layers.{i}: {r}" for r in linear_reasons(ffn, ("linear1", "linear2"))]
        if not _is_relu(ffn.activation):
            reasons.append(f"transformer_ffn_layers.{i}.activation is not ReLU")
    return reasons


class FusedMultiScaleMaskedTransformerDecoder:
    """dinov3's MultiScaleMaskedTransformerDecoder (Mask2Former head) with its masked cross-attention
    on masked_attention: forward_prediction_heads' resized mask logits go to the kernel as they are
    (no sigmoid, no per-head boolean mask, no all-blocked-row pass); the queries' self-attention
    runs on the same op without a mask and the post-norm seams on add_layer_norm. Returns the
    original's dict (pred_logits, pred_masks, aux_outputs).

    The original forward runs with dropout in training, inputs that require grad, or where
    masked_attention would pick its reference.
    """

    _fastdino_op = "masked_attention"  # what the patch report names
    _fastdino_more_ops = ("add_layer_norm",)  # also run (the seams): patch self-checks them ahead

    def _fastdino_heads(self, output: Tensor, mask_features: Tensor, size):
        """forward_prediction_heads with the resized mask logits, (B, Q, HW), in place of the mask."""
        decoder_output = self.post_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        resized = nn.functional.interpolate(outputs_mask, size=size, mode="bilinear", align_corners=False)
        return outputs_class, outputs_mask, resized.flatten(2)

    def forward(self, x, mask_features, mask=None):
        sizes = (x[0].shape[0], self.query_feat.weight.shape[0], x[0].shape[-2] * x[0].shape[-1])
        backend = _decoder_backend(self, mask_features, self.post_norm.weight, self.num_heads, sizes)
        if backend is None:
            return super().forward(x, mask_features, mask)
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            proj = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(proj.permute(2, 0, 1))
        batch = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        outputs_class, outputs_mask, mask_logits = self._fastdino_heads(output, mask_features, size_list[0])
        classes, masks = [outputs_class], [outputs_mask]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            cross = self.transformer_cross_attention_layers[i]
            output = _mha_block(cross.multihead_attn, cross.norm, cross.normalize_before, output, src[level],
                                pos[level], query_pos, mask_logits, backend, self)
            sa = self.transformer_self_attention_layers[i]
            output = _mha_block(sa.self_attn, sa.norm, sa.normalize_before, output, None, None, query_pos,
                                None,
                                backend, self)
            ffn = self.transformer_ffn_layers[i]
            output = _ffn_block(ffn.linear1, ffn.linear2, ffn.norm, ffn.normalize_before, output, self)
            outputs_class, outputs_mask, mask_logits = self._fastdino_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels])
            classes.append(outputs_class)
            masks.append(outputs_mask)
        return {"pred_logits": classes[-1], "pred_masks": masks[-1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m}
                                for c, m in zip(classes[:-1], masks[:-1])]}


RULES = (
    # Composites: every layer's parts are checked above; a hook anywhere below leaves them alone
    # (the fused forward calls the attention, norm and FFN modules' weights, not the modules).
    Rule("Mask2FormerMaskedAttentionDecoder", FusedMask2FormerMaskedAttentionDecoder,
         mask2former_decoder_reasons,
         decoder_backend("layernorm", lambda m: m.mask_predictor.num_heads), transformers("mask2former")),
    # dinov3/eval/segmentation/models/heads/mask2former_transformer_decoder.py
    Rule("MultiScaleMaskedTransformerDecoder", FusedMultiScaleMaskedTransformerDecoder,
         official_mask2former_decoder_reasons, decoder_backend("post_norm", lambda m: m.num_heads),
         dinov3("eval.segmentation.models.heads.mask2former_transformer_decoder")),
)
