"""The DINOv3 ViT backbone of all three libraries: blocks with their attention -> MLP seam on
add_layer_norm, attention on rope_attention, and RoPE modules that keep their tables per grid size.

rope_attention's Triton form in a block without a mask is the qkv projection's GEMM with RoPE in its
epilogue (fused_linear's Triton kernel rotates q and k as it writes them), then
F.scaled_dot_product_attention on them as they are: PyTorch's flash/cuDNN attention, no pass over q
and k of its own. With EoMT's mask logits, or where that GEMM cannot run (a head dim it does not
take, a failed self-check), it is the flash-style Triton kernel that rotates on load.

transformers: DINOv3ViTLayer / DINOv3ViTAttention / DINOv3ViTRopePositionEmbedding (and the EoMT
copies of the layer and attention); facebookresearch/dinov3: SelfAttentionBlock / SelfAttention /
RopePositionEmbedding; timm: EvaBlock / EvaAttention (timm's DINOv3 ViTs are Eva models).
"""

from typing import Optional

import torch
from torch import Tensor, nn

from .. import selfcheck
from ..ops._dispatch import Like, signature
from ..ops.fused_linear import OP as FUSED_LINEAR
from ..ops.rope_attention import OP as ROPE_ATTENTION
from .common import (
    ForwardCache,
    Rule,
    buffer_key,
    children_reasons,
    decide,
    layer_norm_reasons,
    like,
    linear_reasons,
    picked,
    residual_layer_norm,
    runs_original,
    seam_backend,
    seam_reasons,
    transformers_records,
    user_hooks,
)
from .mlp import mlp_residual
from .sources import dinov3, is_from, timm, transformers


def _attention_fallback(training: bool, dropout: float, **why) -> bool:
    """True when the original attention must run: training with dropout, or any extra input set."""
    return (training and dropout > 0) or any(why.values())


def _attention_backend(module: nn.Module, x: Tensor, heads: int, weight: Tensor, cos=None, sin=None,
                       mask_logits=None) -> Optional[str]:
    """rope_attention's backend for the (B, N, heads, C // heads) projections of x, decided before
    they exist: the pinned one ("ref" runs the op's reference), or the kernel dispatch picks; None:
    the original forward runs. (The attentions ask `runs_original` first, before their fallbacks.)"""
    B, N, C = x.shape
    qkv = like(x, (B, N, heads, C // heads), weight)
    return decide(module, ROPE_ATTENTION, qkv, qkv, qkv, cos, sin, mask_logits)


def rope_projections(module: nn.Module, x: Tensor, projections, cos: Tensor, sin: Tensor) -> Optional[list]:
    """rope_attention's Triton form, its first half: each (weight, bias, rotated columns) projection
    of x by fused_linear's Triton GEMM, RoPE in the epilogue; None (nothing run) where any cannot.
    Whether they can is decided once per signature of the calls and kept on the module, as `decide`
    keeps its decisions."""
    calls = [(x, w, b, None, None, None, None, None, cos, sin, cols) for w, b, cols in projections]

    def runs() -> bool:
        return not (selfcheck.reasons(FUSED_LINEAR, "triton", x.device, x.dtype)
                    or any(FUSED_LINEAR.runnable("triton", *args) for args in calls))

    if torch.compiler.is_compiling():  # decided in the trace, as decide does
        ok = runs()
    else:
        key = (torch.is_grad_enabled(), signature([a for args in calls for a in args]))
        memo = module.__dict__.get("_fastdino_epilogue")
        ok = memo.get(key) if memo is not None else None
        if ok is None:
            if memo is None or len(memo) >= 64:
                memo = module.__dict__["_fastdino_epilogue"] = {}
            ok = memo[key] = runs()
    return [FUSED_LINEAR.run("triton", *args) for args in calls] if ok else None


def attend(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """SDPA on token-major (B, N, H, D) q, k, v already rotated; (B, N, H, D) out."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def attention_backend(weight: str, head_dim):
    """The report's backend: rope_attention's pick for the module's dtype and head dim."""

    def backend(module: nn.Module) -> str:
        w = getattr(module, weight).weight
        qkv = Like(w.device, w.dtype, (1, 1, 1, head_dim(module)))
        return picked(ROPE_ATTENTION, qkv, qkv, qkv)

    return backend


# -- transformers -----------------------------------------------------------------------------------


class FusedDINOv3ViTLayer:
    """transformers' DINOv3ViTLayer (and EoMT's EomtDinov3Layer, EomtLayer) with the attention ->
    MLP seam through add_layer_norm. Extra keyword arguments go to the attention, as the original
    passes them (the fused EoMT model sends `fastdino_mask_logits` this way)."""

    _fastdino_op = "add_layer_norm"  # what the patch report names

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return super().forward(
                hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                **kwargs
            )
        h, _ = self.attention(
            self.norm1(hidden_states), attention_mask=attention_mask, position_embeddings=position_embeddings,
            **kwargs
        )
        y, z = residual_layer_norm(hidden_states, h, self.layer_scale1, self.norm2, self)
        return mlp_residual(self.mlp, z, y, self.layer_scale2)


def hf_attention_reasons(module: nn.Module) -> list[str]:
    reasons = children_reasons(module, ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim",
                                        "scaling"))
    if reasons:
        return reasons
    reasons = linear_reasons(module, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if reasons:
        return reasons
    if module.head_dim % 2:
        return [f"head dim {module.head_dim} is odd"]
    return []


def eomt_dense_mask(mask_logits: Tensor, N: int, heads: int, dtype: torch.dtype) -> Tensor:
    """EoMT-DINOv3's own attention mask from query-to-patch logits (B, Q, K): (B, heads, N, N),
    finfo(dtype).min where a query row's patch logit is not > 0 and, as the model has it, 1 (not 0)
    where open: a constant per row, which softmax ignores."""
    B, Q, K = mask_logits.shape
    attend = torch.ones(B, N, N, dtype=torch.bool, device=mask_logits.device)
    attend[:, :Q, N - K:] = mask_logits > 0
    attend = attend[:, None].expand(-1, heads, -1, -1)
    return attend.to(dtype).masked_fill(~attend, torch.finfo(dtype).min)  # the model's construction


class FusedDINOv3ViTAttention:
    """transformers' DINOv3ViTAttention (and EoMT-DINOv3's copy): q/k/v projections, then
    rope_attention on their outputs. `fastdino_mask_logits` (B, Q, HW) is EoMT's query-to-patch
    mask from the fused EoMT model; rope_attention reads it instead of a dense N x N mask (the
    original forward gets the dense mask)."""

    _fastdino_op = "rope_attention"  # what the patch report names

    _fastdino_out = "o_proj"
    _fastdino_scale = "scaling"
    _fastdino_rope = True

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, fastdino_mask_logits=None,
                **kwargs):
        rope = self._fastdino_rope and position_embeddings is not None
        cos, sin = position_embeddings if rope else (None, None)
        backend = None
        # nothing to decide where the original runs whatever the arguments (untuned, on the CPU)
        if not runs_original(self, ROPE_ATTENTION, hidden_states) and not _attention_fallback(
            self.training, self.dropout, mask=attention_mask is not None,
            no_rope=self._fastdino_rope and position_embeddings is None,
            # transformers records the weights the attention returns (5.x: a collector; 4.x: hooks
            # on the module during the call); the fused form returns none, so the original runs there
            weights=(kwargs.get("output_attentions") or transformers_records("attentions")
                     or len(self._forward_hooks) + len(self._forward_pre_hooks) > 0 and user_hooks(self))):
            backend = _attention_backend(self, hidden_states, self.num_heads, self.q_proj.weight, cos, sin,
                                         fastdino_mask_logits)
        if backend is None:
            if fastdino_mask_logits is not None and attention_mask is None:
                attention_mask = eomt_dense_mask(fastdino_mask_logits, hidden_states.shape[1], self.num_heads,
                                                 hidden_states.dtype)
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   position_embeddings=position_embeddings, **kwargs)
        B, N, C = hidden_states.shape
        shape = (B, N, self.num_heads, self.head_dim)
        scale = getattr(self, self._fastdino_scale)
        qk = None
        if backend == "triton" and cos is not None and fastdino_mask_logits is None:
            qk = rope_projections(self, hidden_states, [(p.weight, p.bias, p.weight.shape[0])
                                                  for p in (self.q_proj, self.k_proj)], cos, sin)
        if qk is not None:
            out = attend(qk[0].view(shape), qk[1].view(shape), self.v_proj(hidden_states).view(shape), scale)
            return getattr(self, self._fastdino_out)(out.reshape(B, N, -1)), None
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        out = ROPE_ATTENTION.run(backend, q, k, v, cos, sin, fastdino_mask_logits, scale)
        return getattr(self, self._fastdino_out)(out.reshape(B, N, -1)), None


class CachedDINOv3ViTRopePositionEmbedding(ForwardCache):
    """transformers' DINOv3ViTRopePositionEmbedding with its (cos, sin) cached per input size/dtype."""

    def forward(self, pixel_values):
        def key():
            return (tuple(pixel_values.shape[-2:]), pixel_values.dtype, pixel_values.device,
                    *buffer_key(self.inv_freq))

        return self._cached(key, lambda: super(CachedDINOv3ViTRopePositionEmbedding,
                                               self).forward(pixel_values))


# -- facebookresearch/dinov3 ------------------------------------------------------------------------


class FusedSelfAttentionBlock:
    """dinov3's SelfAttentionBlock with the attention -> MLP seam through add_layer_norm."""

    _fastdino_op = "add_layer_norm"  # what the patch report names

    def _forward_list(self, x_list, rope_list=None):
        if self.training and self.sample_drop_ratio > 0.0:
            return super()._forward_list(x_list, rope_list=rope_list)
        out = []
        for x, rope in zip(x_list, rope_list):
            h = self.attn(self.norm1(x), rope=rope)
            y, z = residual_layer_norm(x, h, self.ls1, self.norm2, self)
            out.append(mlp_residual(self.mlp, z, y, self.ls2))
        return out

    def _forward(self, x, rope=None):
        return self._forward_list([x], rope_list=[rope])[0]


def self_attention_reasons(module: nn.Module) -> list[str]:
    """dinov3's SelfAttention: a (D, 3D) qkv Linear, heads that split D evenly into an even head dim."""
    reasons = children_reasons(module, ("qkv", "proj", "proj_drop", "num_heads"))
    if reasons:
        return reasons
    if type(module.qkv) is not nn.Linear and not is_from(module.qkv, "LinearKMaskedBias", DINOV3_ATTENTION):
        return [f"qkv is {type(module.qkv).__name__}, not nn.Linear or dinov3's LinearKMaskedBias"]
    if module.qkv.out_features != 3 * module.qkv.in_features:
        return ["qkv is not a (D, 3D) Linear"]
    if type(module.proj) is not nn.Linear:
        return [f"proj is {type(module.proj).__name__}, not nn.Linear"]
    D, H = module.qkv.in_features, module.num_heads
    if D % H or (D // H) % 2:
        return [f"dim {D} over {H} heads gives no even head dim"]
    return []


class FusedSelfAttention:
    """dinov3's SelfAttention: qkv GEMM, then rope_attention on strided views of its output."""

    _fastdino_op = "rope_attention"  # what the patch report names

    def forward(self, x, attn_bias=None, rope=None):
        drop = getattr(self.attn_drop, "p", 0.0) if hasattr(self, "attn_drop") else 0.0
        sin, cos = rope if rope is not None else (None, None)  # dinov3 passes (sin, cos)
        backend = None
        if not runs_original(self, ROPE_ATTENTION, x) and not _attention_fallback(
                self.training, drop, attn_bias=attn_bias is not None):
            backend = _attention_backend(self, x, self.num_heads, self.qkv.weight, cos, sin)
        if backend is None:
            return super().forward(x, attn_bias=attn_bias, rope=rope)
        B, N, C = x.shape
        H = self.num_heads
        qkv = None
        if backend == "triton" and cos is not None:
            bias = self.qkv.bias
            if bias is not None and hasattr(self.qkv, "bias_mask"):  # LinearKMaskedBias: its forward's bias
                bias = bias * self.qkv.bias_mask.to(bias.dtype)
            qkv = rope_projections(self, x, [(self.qkv.weight, bias, 2 * C)], cos, sin)
        if qkv is not None:
            out = attend(*qkv[0].view(B, N, 3, H, C // H).unbind(2), None)
            return self.proj_drop(self.proj(out.reshape(B, N, C)))
        q, k, v = self.qkv(x).view(B, N, 3, H, C // H).unbind(2)
        out = ROPE_ATTENTION.run(backend, q, k, v, cos, sin)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


class CachedRopePositionEmbedding(ForwardCache):
    """dinov3's RopePositionEmbedding with its (sin, cos) cached per (H, W) and periods buffer."""

    def forward(self, *, H, W):
        return self._cached(lambda: (H, W, *buffer_key(self.periods)),
                            lambda: super(CachedRopePositionEmbedding, self).forward(H=H, W=W))


# -- timm -------------------------------------------------------------------------------------------


def eva_attention_reasons(module: nn.Module) -> list[str]:
    """timm's EvaAttention as DINOv3 uses it: fused qkv, half-split RoPE, no q/k norm, no gate."""
    reasons = children_reasons(module, ("qkv", "proj", "proj_drop", "num_heads", "head_dim", "scale",
                                        "num_prefix_tokens", "q_norm", "k_norm", "norm", "attn_drop"))
    if reasons:
        return reasons
    if module.qkv is None:
        return ["separate q/k/v projections (qkv_fused=False)"]
    reasons = linear_reasons(module, ("qkv", "proj"))
    if reasons:
        return reasons
    if not getattr(module, "rotate_half", False):
        return ["interleaved RoPE layout (rotate_half=False)"]
    active = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(module, n), nn.Identity)]
    if getattr(module, "gate", None) is not None:
        active.append("gate")
    if active:
        return [f"{', '.join(active)} active"]
    if module.head_dim % 2:
        return [f"head dim {module.head_dim} is odd"]
    return []


def eva_block_reasons(module: nn.Module) -> list[str]:
    reasons = children_reasons(module, ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2",
                                        "drop_path2"))
    if reasons:
        return reasons
    reasons = [f"{n} is not a 1-D tensor" for n in ("gamma_1", "gamma_2")
               if getattr(module, n) is not None
               and (not isinstance(getattr(module, n), Tensor) or getattr(module, n).dim() != 1)]
    return reasons + layer_norm_reasons(module.norm2, "norm2")


class FusedEvaAttention:
    """timm's EvaAttention (DINOv3 models): qkv GEMM with the q/k/v biases, then rope_attention.

    timm counts the un-rotated prefix from the front (num_prefix_tokens); rope_attention takes the
    tokens before the last HW. When the two disagree (tokens prepended by a head, e.g. EoMT
    queries) the original forward runs.
    """

    _fastdino_op = "rope_attention"  # what the patch report names

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        misplaced = rope is not None and (rope.dim() != 2 or N - rope.shape[0] != self.num_prefix_tokens)
        backend = None
        if not runs_original(self, ROPE_ATTENTION, x) and not _attention_fallback(
                self.training, self.attn_drop.p, mask=attn_mask is not None, causal=is_causal,
                rope_layout=misplaced):
            sin, cos = rope.chunk(2, dim=-1) if rope is not None else (None, None)  # timm: cat([sin, cos])
            backend = _attention_backend(self, x, self.num_heads, self.qkv.weight, cos, sin)
        if backend is None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = None
        if backend == "triton" and cos is not None:
            qkv = rope_projections(self, x, [(self.qkv.weight, bias, 2 * C)], cos, sin)
        if qkv is not None:
            out = attend(*qkv[0].view(B, N, 3, self.num_heads, -1).unbind(2), self.scale)
            return self.proj_drop(self.proj(out.reshape(B, N, -1)))
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads,
                                                                            -1).unbind(2)
        out = ROPE_ATTENTION.run(backend, q, k, v, cos, sin, None, self.scale)
        return self.proj_drop(self.proj(out.reshape(B, N, -1)))


class FusedEvaBlock:
    """timm's EvaBlock with the attention -> MLP seam (gamma_1, norm2) through add_layer_norm."""

    _fastdino_op = "add_layer_norm"  # what the patch report names

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        stochastic = not (isinstance(self.drop_path1, nn.Identity) and isinstance(self.drop_path2,
                                                                                  nn.Identity))
        if self.training and stochastic:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        h = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        y, z = residual_layer_norm(x, h, self.gamma_1, self.norm2, self)
        return mlp_residual(self.mlp, z, y, self.gamma_2)


# transformers' DINOv3ViT layer, which the EoMT models copy
LAYER_REASONS = seam_reasons(("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp",
                              "layer_scale2"),
                             "layer_scale1", "norm2")
HF_ATTENTION_BACKEND = attention_backend("q_proj", lambda m: m.head_dim)


def _has_buffer(name: str):
    return lambda m: [] if isinstance(getattr(m, name, None), Tensor) else [f"no {name} buffer"]


DINOV3_VIT = transformers("dinov3_vit")
DINOV3_ATTENTION = dinov3("layers.attention")
EVA = timm("models.eva")
# The children of transformers' DINOv3ViT layer (and EoMT's copies); the fused forward calls
# norm1 and the attention as modules.
HF_LAYER_PARTS = ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")
HF_LAYER_CALLS = ("norm1", "attention")
HF_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")

RULES = (
    # transformers (4.56+ and 5.x; the layer sits at layer.{i} or model.layer.{i})
    Rule("DINOv3ViTLayer", FusedDINOv3ViTLayer, LAYER_REASONS, seam_backend("norm2"), DINOV3_VIT,
         parts=HF_LAYER_PARTS, calls=HF_LAYER_CALLS),
    Rule("DINOv3ViTAttention", FusedDINOv3ViTAttention, hf_attention_reasons, HF_ATTENTION_BACKEND,
         DINOV3_VIT,
         parts=HF_ATTENTION_PARTS, calls=HF_ATTENTION_PARTS),
    Rule("DINOv3ViTRopePositionEmbedding", CachedDINOv3ViTRopePositionEmbedding, _has_buffer("inv_freq"),
         lambda m: "cache", DINOV3_VIT, parts=(), params=("inv_freq",), pinnable=False),
    # facebookresearch/dinov3 (dinov3/layers/block.py, attention.py, rope_position_encoding.py)
    Rule("SelfAttentionBlock", FusedSelfAttentionBlock,
         seam_reasons(("norm1", "attn", "ls1", "norm2", "mlp", "ls2", "sample_drop_ratio", "_forward_list"),
                      "ls1", "norm2"),
         seam_backend("norm2"), dinov3("layers.block"), parts=("norm1", "attn", "ls1", "norm2", "mlp", "ls2"),
         calls=("norm1", "attn")),
    Rule("SelfAttention", FusedSelfAttention, self_attention_reasons,
         attention_backend("qkv", lambda m: m.qkv.in_features // m.num_heads), DINOV3_ATTENTION,
         parts=("qkv", "attn_drop", "proj", "proj_drop"), calls=("qkv", "proj", "proj_drop")),
    Rule("RopePositionEmbedding", CachedRopePositionEmbedding, _has_buffer("periods"), lambda m: "cache",
         dinov3("layers.rope_position_encoding"), parts=(), params=("periods",), pinnable=False),
    # timm (timm/models/eva.py)
    Rule("EvaBlock", FusedEvaBlock, eva_block_reasons, seam_backend("norm2"), EVA,
         parts=("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"), params=("gamma_1", "gamma_2"),
         calls=("norm1", "attn")),
    Rule("EvaAttention", FusedEvaAttention, eva_attention_reasons,
         attention_backend("qkv", lambda m: m.head_dim),
         EVA, parts=("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"),
         params=("q_bias", "k_bias", "v_bias"), calls=("proj", "proj_drop")),
)
