"""Fused forms of DINOv3 modules, written as mixins placed in front of the original class.

`fastdino.patch` turns a recognised module's class into ``Fused<Name>(mixin, original class)``:
the instance keeps its children, parameters, buffers and hooks, so state_dict keys and values are
untouched and only ``forward`` changes; `fastdino.unpatch` sets the original class back.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from .ops.add_layer_norm import add_layer_norm, preferred_backend as add_layer_norm_preferred
from .ops.fused_linear import fused_linear, select_backend as fused_linear_backend
from .ops.masked_attention import masked_attention, preferred_backend as masked_attention_preferred
from .ops.ms_deform_attn import ms_deform_attn, preferred_backend as ms_deform_attn_preferred
from .ops._dispatch import requires_grad
from .ops.rope_attention import preferred_backend as rope_attention_preferred, rope_attention

# LayerScale classes and the name of their (C,) scale parameter.
LAYER_SCALE_PARAM = {"LayerScale": "gamma", "DINOv3ViTLayerScale": "lambda1", "EomtDinov3LayerScale": "lambda1",
                     "EomtLayerScale": "lambda1"}


def layer_scale_reasons(module: nn.Module, name: str) -> list[str]:
    if isinstance(module, nn.Identity):
        return []
    param = LAYER_SCALE_PARAM.get(type(module).__name__)
    if param is None:
        return [f"{name} is {type(module).__name__}, not a known LayerScale"]
    gamma = getattr(module, param, None)
    if not isinstance(gamma, Tensor) or gamma.dim() != 1:
        return [f"{name}.{param} is not a 1-D tensor"]
    return []


def _is_plain_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm, or timm's LayerNorm subclass when it runs F.layer_norm (its fast-norm path off)."""
    if type(module) is nn.LayerNorm:
        return True
    return (isinstance(module, nn.LayerNorm) and type(module).__name__ == "LayerNorm"
            and getattr(module, "_fast_norm", None) is False)


def layer_norm_reasons(module: nn.Module, name: str) -> list[str]:
    if not _is_plain_layer_norm(module):
        return [f"{name} is {type(module).__name__}, not nn.LayerNorm"]
    if module.weight is None or module.bias is None:
        return [f"{name} has no affine weight and bias"]
    if len(module.normalized_shape) != 1:
        return [f"{name} normalizes over {len(module.normalized_shape)} dims"]
    return []


def _layer_scale_gamma(layer_scale) -> Optional[Tensor]:
    """The (C,) scale of a LayerScale module, or the tensor itself (timm keeps gamma_1/gamma_2 as
    parameters of the block); None for nn.Identity or None."""
    if layer_scale is None or isinstance(layer_scale, Tensor):
        return layer_scale
    if isinstance(layer_scale, nn.Identity):
        return None
    return getattr(layer_scale, LAYER_SCALE_PARAM[type(layer_scale).__name__])


def picks_kernel(picked, *tensors) -> bool:
    """Whether an unpinned fused path runs: no input needs grad and `picked()`, the op's dispatch
    for this device and dtype, is a kernel. Where dispatch would pick the op's PyTorch reference,
    the original modules run instead, so an unpinned patch computes what the model did, at the
    model's own cost. (A pinned backend always runs; see each module for what pinned "ref" runs.)"""
    return not requires_grad(*tensors) and picked() != "ref"


def _activation_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projections of x produce: autocast's where it is on."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _keeps_dtype(x: Tensor, branch: Tensor, gamma: Optional[Tensor], norm: nn.LayerNorm) -> bool:
    """True when the unfused `y = x + ls(branch); z = norm(y)` gives y and z in x.dtype.

    Then casting branch and the parameters to x.dtype is exact (an upcast) and the fused op
    returns what the model would. Otherwise the original modules run: e.g. bf16 activations with
    an fp32 LayerScale (y promotes to fp32) or fp32 LayerNorm parameters (layer_norm keeps bf16
    but uses the fp32 values, which the one-dtype kernels would have to round).
    """
    dt = x.dtype
    t = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    if torch.promote_types(dt, t) != dt:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return dt == torch.float32  # autocast runs layer_norm in fp32 and returns fp32
    return torch.promote_types(dt, torch.promote_types(norm.weight.dtype, norm.bias.dtype)) == dt


def residual_layer_norm(x, branch, layer_scale, norm, backend=None):
    """``y = x + layer_scale(branch); z = norm(y)``, fused with add_layer_norm where dtypes allow.

    `layer_scale` is a LayerScale module, nn.Identity, a (C,) gamma tensor or None.
    """
    gamma = _layer_scale_gamma(layer_scale)
    fused = backend is not None or picks_kernel(
        lambda: add_layer_norm_preferred(x.device, x.dtype, x.shape[-1])[0], x, branch, gamma, norm.weight)
    if not (fused and _keeps_dtype(x, branch, gamma, norm)):
        if isinstance(layer_scale, nn.Module):
            y = x + layer_scale(branch)
        else:
            y = x + (branch if gamma is None else gamma * branch)
        return y, norm(y)
    dt = x.dtype

    def cast(t):
        return t if t is None or t.dtype == dt else t.to(dt)

    return add_layer_norm(x, cast(branch), cast(gamma), cast(norm.weight), cast(norm.bias), norm.eps, backend)


def is_exact_gelu(act: nn.Module) -> bool:
    """nn.GELU() or transformers' GELUActivation ("gelu"), both erf GELU; not the tanh forms."""
    if type(act) is nn.GELU:
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation"


def is_silu(act: nn.Module) -> bool:
    return type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation"


def _linear_reasons(module: nn.Module, names) -> list[str]:
    return [f"{n} is not an nn.Linear" for n in names if type(getattr(module, n)) is not nn.Linear]


def mlp_reasons(linears, act=None, act_check=None, act_kind="", identity=()):
    """Reasons function for an MLP rule: its Linears, its activation, and the optional parts
    (`identity`, e.g. timm's hidden norm) that must be nn.Identity where they exist."""

    def reasons(module: nn.Module) -> list[str]:
        missing = children_reasons(module, (*linears, *([act] if act else [])))
        if missing:
            return missing
        out = _linear_reasons(module, linears)
        if act and not act_check(getattr(module, act)):
            out.append(f"{act} is {type(getattr(module, act)).__name__}, not {act_kind}")
        out += [f"{n} is active" for n in identity
                if hasattr(module, n) and not isinstance(getattr(module, n), nn.Identity)]
        return out

    return reasons


class _FusedMlp:
    """An MLP whose input projection(s) and activation run as one fused_linear, and whose output
    projection can take the block's LayerScale + residual into its epilogue (`mlp_residual`).

    Subclasses give `_fastdino_parts()`: (weight, bias, act, weight2, bias2) of the input side,
    the output nn.Linear, and the dropouts that are no-ops in eval. The original forward runs
    whenever fused_linear would pick its reference (the default until its kernels are timed),
    under autocast (the Linears would run in another dtype), or with dropout active in training.
    """

    _fastdino_dropouts: tuple = ()

    def _fastdino_backend_for(self, x: Tensor) -> Optional[str]:
        if torch.is_autocast_enabled(x.device.type):
            return None
        if self.training and any(getattr(getattr(self, n, None), "p", 0.0) > 0 for n in self._fastdino_dropouts):
            return None
        w, b, act, w2, b2, out = self._fastdino_parts()
        backend = self._fastdino_backend or fused_linear_backend(x, w, b, act, w2, b2)[0]
        return None if backend == "ref" else backend

    def _fastdino_mlp(self, x: Tensor, residual: Optional[Tensor] = None, layer_scale=None) -> Optional[Tensor]:
        """mlp(x), or residual + layer_scale(mlp(x)); None when the original modules must run."""
        backend = self._fastdino_backend_for(x)
        if backend is None:
            return None
        gamma = _layer_scale_gamma(layer_scale)
        if residual is not None and (residual.dtype != x.dtype or (gamma is not None and gamma.dtype != x.dtype)):
            return None  # promotion in the unfused add: leave it to the original ops
        w, b, act, w2, b2, out = self._fastdino_parts()
        h = fused_linear(x, w, b, act, w2, b2, backend=backend)
        return fused_linear(h, out.weight, out.bias, residual=residual, gamma=gamma, backend=backend)

    def forward(self, x):
        y = self._fastdino_mlp(x)
        return super().forward(x) if y is None else y


def mlp_residual(mlp: nn.Module, x: Tensor, residual: Tensor, layer_scale) -> Tensor:
    """``residual + layer_scale(mlp(x))``: one fused epilogue for fc2 + LayerScale + residual when
    `mlp` is a fused MLP whose kernels run, else the modules as they are."""
    fused = getattr(mlp, "_fastdino_mlp", None)
    y = fused(x, residual, layer_scale) if fused is not None else None
    if y is not None:
        return y
    m = mlp(x)
    if isinstance(layer_scale, nn.Module):
        return residual + layer_scale(m)
    return residual + (m if layer_scale is None else layer_scale * m)


class FusedMlp(_FusedMlp):
    """dinov3's and timm's Mlp (fc1, exact GELU, fc2; timm's norm must be Identity)."""

    _fastdino_dropouts = ("drop", "drop1", "drop2")

    def _fastdino_parts(self):
        return self.fc1.weight, self.fc1.bias, "gelu", None, None, self.fc2


class FusedSwiGLUFFN(_FusedMlp):
    """dinov3's SwiGLUFFN: w3(silu(w1(x)) * w2(x)); w1 and w2 stay separate tensors."""

    def _fastdino_parts(self):
        return self.w1.weight, self.w1.bias, "swiglu", self.w2.weight, self.w2.bias, self.w3


class FusedSwiGLU(_FusedMlp):
    """timm's SwiGLU: fc2(act(fc1_g(x)) * fc1_x(x)) with SiLU, norm Identity."""

    _fastdino_dropouts = ("drop1", "drop2")

    def _fastdino_parts(self):
        return self.fc1_g.weight, self.fc1_g.bias, "swiglu", self.fc1_x.weight, self.fc1_x.bias, self.fc2


class FusedDINOv3ViTMLP(_FusedMlp):
    """transformers' DINOv3ViTMLP (and EoMT-DINOv3's copy): down_proj(gelu(up_proj(x)))."""

    def _fastdino_parts(self):
        return self.up_proj.weight, self.up_proj.bias, "gelu", None, None, self.down_proj


class FusedDINOv3ViTGatedMLP(_FusedMlp):
    """transformers' DINOv3ViTGatedMLP (and EoMT's EomtDinov3GatedMLP, EomtSwiGLUFFN):
    down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def _fastdino_parts(self):
        return self.gate_proj.weight, self.gate_proj.bias, "swiglu", self.up_proj.weight, self.up_proj.bias, self.down_proj


class FusedEomtMLP(_FusedMlp):
    """transformers' EomtMLP: fc2(gelu(fc1(x)))."""

    def _fastdino_parts(self):
        return self.fc1.weight, self.fc1.bias, "gelu", None, None, self.fc2


class FusedDINOv3ViTLayer:
    """transformers' DINOv3ViTLayer (and EoMT's EomtDinov3Layer, EomtLayer) with the attention ->
    MLP seam through add_layer_norm. Extra keyword arguments go to the attention, as the original
    passes them (the fused EoMT model sends `fastdino_mask_logits` this way)."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return super().forward(
                hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
            )
        h, _ = self.attention(
            self.norm1(hidden_states), attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )
        y, z = residual_layer_norm(hidden_states, h, self.layer_scale1, self.norm2, self._fastdino_backend)
        return mlp_residual(self.mlp, z, y, self.layer_scale2)


class FusedSelfAttentionBlock:
    """dinov3's SelfAttentionBlock with the attention -> MLP seam through add_layer_norm."""

    def _forward_list(self, x_list, rope_list=None):
        if self.training and self.sample_drop_ratio > 0.0:
            return super()._forward_list(x_list, rope_list=rope_list)
        out = []
        for x, rope in zip(x_list, rope_list):
            h = self.attn(self.norm1(x), rope=rope)
            y, z = residual_layer_norm(x, h, self.ls1, self.norm2, self._fastdino_backend)
            out.append(mlp_residual(self.mlp, z, y, self.ls2))
        return out

    def _forward(self, x, rope=None):
        return self._forward_list([x], rope_list=[rope])[0]


def children_reasons(module: nn.Module, children) -> list[str]:
    missing = [c for c in children if not hasattr(module, c)]
    return [f"no attribute {', '.join(missing)}"] if missing else []


def self_attention_reasons(module: nn.Module) -> list[str]:
    """dinov3's SelfAttention: a (D, 3D) qkv Linear, heads that split D evenly into an even head dim."""
    reasons = children_reasons(module, ("qkv", "proj", "proj_drop", "num_heads"))
    if reasons:
        return reasons
    if not isinstance(module.qkv, nn.Linear) or module.qkv.out_features != 3 * module.qkv.in_features:
        return ["qkv is not a (D, 3D) Linear"]
    D, H = module.qkv.in_features, module.num_heads
    if D % H or (D // H) % 2:
        return [f"dim {D} over {H} heads gives no even head dim"]
    return []


def hf_attention_reasons(module: nn.Module) -> list[str]:
    reasons = children_reasons(module, ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "scaling"))
    if reasons:
        return reasons
    if module.head_dim % 2:
        return [f"head dim {module.head_dim} is odd"]
    return []


def _attention_fallback(training: bool, dropout: float, **why) -> bool:
    """True when the original attention must run: training with dropout, or any extra input set."""
    return (training and dropout > 0) or any(v for v in why.values())


def _attention_runs(module: nn.Module, x: Tensor, head_dim: int, weight: Tensor) -> bool:
    """Whether rope_attention runs on the projections of x: pinned (its reference too), or picks_kernel."""
    return module._fastdino_backend is not None or picks_kernel(
        lambda: rope_attention_preferred(x.device, _activation_dtype(x), head_dim)[0], x, weight)


class FusedSelfAttention:
    """dinov3's SelfAttention: qkv GEMM, then rope_attention on strided views of its output."""

    def forward(self, x, attn_bias=None, rope=None):
        drop = getattr(self.attn_drop, "p", 0.0) if hasattr(self, "attn_drop") else 0.0
        B, N, C = x.shape
        H = self.num_heads
        if _attention_fallback(self.training, drop, attn_bias=attn_bias is not None,
                               reference=not _attention_runs(self, x, C // H, self.qkv.weight)):
            return super().forward(x, attn_bias=attn_bias, rope=rope)
        q, k, v = self.qkv(x).view(B, N, 3, H, C // H).unbind(2)
        sin, cos = rope if rope is not None else (None, None)  # dinov3 passes (sin, cos)
        out = rope_attention(q, k, v, cos, sin, backend=self._fastdino_backend)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


def eomt_attention_reasons(module: nn.Module) -> list[str]:
    """transformers' EomtAttention (EoMT on DINOv2: no RoPE, so any head dim)."""
    return children_reasons(module, ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale",
                                     "dropout"))


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
    mask from the fused EoMT model; rope_attention reads it instead of a dense N x N mask."""

    _fastdino_out = "o_proj"
    _fastdino_scale = "scaling"
    _fastdino_rope = True

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, fastdino_mask_logits=None,
                **kwargs):
        if _attention_fallback(self.training, self.dropout, mask=attention_mask is not None,
                               no_rope=self._fastdino_rope and position_embeddings is None,
                               weights=kwargs.get("output_attentions"),
                               reference=not _attention_runs(self, hidden_states, self.head_dim,
                                                             self.q_proj.weight)):
            if fastdino_mask_logits is not None and attention_mask is None:
                attention_mask = eomt_dense_mask(fastdino_mask_logits, hidden_states.shape[1], self.num_heads,
                                                 hidden_states.dtype)
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   position_embeddings=position_embeddings, **kwargs)
        B, N, C = hidden_states.shape
        shape = (B, N, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        cos, sin = position_embeddings if self._fastdino_rope else (None, None)
        out = rope_attention(q, k, v, cos, sin, scale=getattr(self, self._fastdino_scale),
                             backend=self._fastdino_backend, mask_logits=fastdino_mask_logits)
        return getattr(self, self._fastdino_out)(out.reshape(B, N, -1)), None


class FusedEomtAttention(FusedDINOv3ViTAttention):
    """transformers' EomtAttention (EoMT on DINOv2): the same without RoPE, out_proj and scale."""

    _fastdino_out = "out_proj"
    _fastdino_scale = "scale"
    _fastdino_rope = False


class _ForwardCache:
    """Keeps a few small tensors a module derives from its inputs' sizes, so that a forward
    computes them once: RoPE tables per grid size (blocks that call the RoPE module again, as
    dinov3's get_intermediate_layers does, reuse them), level-shape tensors per pyramid.

    Only in eval mode (training augments RoPE coordinates at random) and outside torch.compile
    (which fuses the computation anyway). Keys that depend on a buffer hold its storage and
    version counter: load_state_dict, .to() or an in-place edit of it invalidates the entries.
    """

    _MAX_ENTRIES = 8

    def _cached(self, key, compute):
        if self.training or torch.compiler.is_compiling():
            return compute()
        cache = self.__dict__.setdefault("_fastdino_cache", {})
        if key not in cache:
            if len(cache) >= self._MAX_ENTRIES:
                cache.pop(next(iter(cache)))
            cache[key] = compute()
        return cache[key]


def _buffer_key(t: Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), t._version)


class CachedRopePositionEmbedding(_ForwardCache):
    """dinov3's RopePositionEmbedding with its (sin, cos) cached per (H, W) and periods buffer."""

    def forward(self, *, H, W):
        return self._cached((H, W, *_buffer_key(self.periods)), lambda: super(CachedRopePositionEmbedding, self).forward(H=H, W=W))


class CachedDINOv3ViTRopePositionEmbedding(_ForwardCache):
    """transformers' DINOv3ViTRopePositionEmbedding with its (cos, sin) cached per input size/dtype."""

    def forward(self, pixel_values):
        key = (tuple(pixel_values.shape[-2:]), pixel_values.dtype, pixel_values.device, *_buffer_key(self.inv_freq))
        return self._cached(key, lambda: super(CachedDINOv3ViTRopePositionEmbedding, self).forward(pixel_values))


def eva_attention_reasons(module: nn.Module) -> list[str]:
    """timm's EvaAttention as DINOv3 uses it: fused qkv, half-split RoPE, no q/k norm, no gate."""
    reasons = children_reasons(module, ("qkv", "proj", "proj_drop", "num_heads", "head_dim", "scale",
                                         "num_prefix_tokens", "q_norm", "k_norm", "norm", "attn_drop"))
    if reasons:
        return reasons
    if module.qkv is None:
        return ["separate q/k/v projections (qkv_fused=False)"]
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
               if getattr(module, n) is not None and (not isinstance(getattr(module, n), Tensor) or getattr(module, n).dim() != 1)]
    return reasons + layer_norm_reasons(module.norm2, "norm2")


class FusedEvaAttention:
    """timm's EvaAttention (DINOv3 models): qkv GEMM with the q/k/v biases, then rope_attention.

    timm counts the un-rotated prefix from the front (num_prefix_tokens); rope_attention takes the
    tokens before the last HW. When the two disagree (tokens prepended by a head, e.g. EoMT
    queries) the original forward runs.
    """

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        misplaced = rope is not None and (rope.dim() != 2 or N - rope.shape[0] != self.num_prefix_tokens)
        if _attention_fallback(self.training, self.attn_drop.p, mask=attn_mask is not None, causal=is_causal,
                               rope_layout=misplaced,
                               reference=not _attention_runs(self, x, C // self.num_heads, self.qkv.weight)):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        H = self.num_heads
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, bias).view(B, N, 3, H, -1).unbind(2)
        sin, cos = rope.chunk(2, dim=-1) if rope is not None else (None, None)  # timm: cat([sin, cos])
        out = rope_attention(q, k, v, cos, sin, scale=self.scale, backend=self._fastdino_backend)
        return self.proj_drop(self.proj(out.reshape(B, N, -1)))


class FusedEvaBlock:
    """timm's EvaBlock with the attention -> MLP seam (gamma_1, norm2) through add_layer_norm."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        stochastic = not (isinstance(self.drop_path1, nn.Identity) and isinstance(self.drop_path2, nn.Identity))
        if self.training and stochastic:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        h = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        y, z = residual_layer_norm(x, h, self.gamma_1, self.norm2, self._fastdino_backend)
        return mlp_residual(self.mlp, z, y, self.gamma_2)


def ms_deform_attn_reasons(module: nn.Module) -> list[str]:
    """dinov3's MSDeformAttn and transformers' Mask2Former pixel-decoder deformable attention."""
    reasons = children_reasons(module, ("sampling_offsets", "attention_weights", "value_proj", "output_proj",
                                         "n_heads", "n_levels", "n_points"))
    if reasons:
        return reasons
    reasons = _linear_reasons(module, ("sampling_offsets", "attention_weights", "value_proj", "output_proj"))
    if not reasons and module.value_proj.out_features % module.n_heads:
        reasons.append(f"value_proj width {module.value_proj.out_features} does not split into {module.n_heads} heads")
    return reasons


class _FusedMSDeformAttn(_ForwardCache):
    """The deformable-attention modules' projections as they are; the softmax of the attention
    logits, the offset -> location arithmetic and the grid_sample core run in one ms_deform_attn
    kernel. The original forward runs where ms_deform_attn would pick its reference (inputs that
    require grad, or no kernel for the device)."""

    def _fastdino_runs(self, x: Tensor) -> bool:
        if self._fastdino_backend is not None:
            return self._fastdino_backend != "ref"
        return picks_kernel(lambda: ms_deform_attn_preferred(x.device, x.dtype)[0], x, self.value_proj.weight)

    def _fastdino_bf16(self, x: Tensor) -> bool:
        """The bf16 precision policy (patch(..., precision="bf16")) under an enabled autocast."""
        return getattr(self, "_fastdino_precision", None) == "bf16" and torch.is_autocast_enabled(x.device.type)

    def _fastdino_core(self, query, value_input, reference_points, shapes, level_start_index, padding_mask,
                       fp32, bf16=False, need_weights=False):
        """(output, softmaxed attention weights if `need_weights` else None) as the module computes
        them. The projections run here; ms_deform_attn takes their raw offsets and logits and does
        the softmax and the location arithmetic in its kernel. `fp32`: the original's fp32 cast
        under CUDA autocast; `bf16`: the bf16 policy (values sampled in bf16; the offset and logit
        projections in fp32; softmax and locations in fp32 inside the kernel either way)."""
        B, Lq, _ = query.shape
        S = value_input.shape[1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], float(0))
        value = value.view(B, S, H, -1)
        if bf16:  # the two small projections in fp32: bf16 offsets of a few pixels lose sub-pixel steps
            with torch.autocast(query.device.type, enabled=False):
                q32 = query.float()
                offsets, logits = self.sampling_offsets(q32), self.attention_weights(q32)
            value = value.bfloat16()
        else:
            offsets, logits = self.sampling_offsets(query), self.attention_weights(query)
        offsets, logits = offsets.view(B, Lq, H, L, P, 2), logits.view(B, Lq, H, L, P)
        if fp32:  # what the original's custom_fwd(cast_inputs=torch.float32) does under autocast
            value = value.float()
        if offsets.dtype not in (torch.float32, value.dtype) or logits.dtype != offsets.dtype:
            offsets, logits = offsets.float(), logits.float()  # the kernels read them in fp32 or value's dtype
        # A pinned backend must run (or raise); otherwise dispatch may still take the reference.
        out = ms_deform_attn(value, shapes, level_start_index, offsets, logits, backend=self._fastdino_backend,
                             reference_points=reference_points.float().contiguous())
        weights = logits.float().flatten(-2).softmax(-1).view(B, Lq, H, L, P) if need_weights else None
        return self.output_proj(out), weights


class FusedMSDeformAttn(_FusedMSDeformAttn):
    """dinov3's MSDeformAttn (ViT-Adapter extractors, Mask2Former pixel decoder)."""

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        if not self._fastdino_runs(query):
            return super().forward(query, reference_points, input_flatten, input_spatial_shapes,
                                   input_level_start_index, input_padding_mask)
        bf16 = self._fastdino_bf16(query)
        fp32 = not bf16 and torch.is_autocast_enabled("cuda") and query.is_cuda
        return self._fastdino_core(query, input_flatten, reference_points, input_spatial_shapes,
                                   input_level_start_index, input_padding_mask, fp32, bf16)[0]


class FusedMask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(_FusedMSDeformAttn):
    """transformers' Mask2Former pixel-decoder deformable attention; returns (output, weights)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes_list=None, level_start_index=None,
                output_attentions=False):
        if not self._fastdino_runs(hidden_states):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes_list, level_start_index,
                                   output_attentions)
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        # The (L, 2) shapes on the device, copied there once per pyramid.
        key = (tuple(tuple(int(v) for v in s) for s in spatial_shapes_list), query.device)
        shapes = self._cached(key, lambda: torch.tensor(key[0], dtype=torch.int64, device=query.device))
        return self._fastdino_core(query, encoder_hidden_states, reference_points, shapes, level_start_index,
                                   attention_mask, False, self._fastdino_bf16(query), output_attentions)


class FusedDeformableDetrMultiscaleDeformableAttention(_FusedMSDeformAttn):
    """transformers' DeformableDetrMultiscaleDeformableAttention (encoder and decoder of Deformable
    DETR): level shapes as a device tensor, attention_mask True where a pixel is valid; returns
    (output, weights). Reference points of 2 (points) or 4 (boxes) coordinates."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes=None, spatial_shapes_list=None,
                level_start_index=None, **kwargs):
        if not self._fastdino_runs(hidden_states):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes, spatial_shapes_list,
                                   level_start_index, **kwargs)
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        padding = None if attention_mask is None else ~attention_mask
        # Its callers drop the weights (transformers computes them for no output).
        return self._fastdino_core(query, encoder_hidden_states, reference_points, spatial_shapes,
                                   level_start_index, padding, False, self._fastdino_bf16(query))


class FusedOneFormerPixelDecoderEncoderMultiscaleDeformableAttention(_FusedMSDeformAttn):
    """transformers' OneFormer pixel-decoder deformable attention: Mask2Former's, with the level
    shapes also as a device tensor; attention_mask True where a pixel is padding."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes=None, level_start_index=None,
                output_attentions=False, spatial_shapes_list=None):
        if not self._fastdino_runs(hidden_states):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes, level_start_index,
                                   output_attentions, spatial_shapes_list)
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        return self._fastdino_core(query, encoder_hidden_states, reference_points, spatial_shapes,
                                   level_start_index, attention_mask, False, self._fastdino_bf16(query),
                                   output_attentions)


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
        missing = children_reasons(layer, ("self_attn", "cross_attn", "fc1", "fc2", "activation_fn", "pre_norm",
                                           "self_attn_layer_norm", "cross_attn_layer_norm", "final_layer_norm"))
        if missing:
            return [f"layers.{i}: {r}" for r in missing]
        reasons += _multihead_attention_reasons(layer.cross_attn, f"layers.{i}.cross_attn")
        reasons += [f"layers.{i}.self_attn: {r}" for r in
                    children_reasons(layer.self_attn, ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"))]
        reasons += _linear_reasons(layer, ("fc1", "fc2"))
        if not _is_relu(layer.activation_fn):
            reasons.append(f"layers.{i}.activation_fn is {type(layer.activation_fn).__name__}, not ReLU")
    return reasons


def _sequence_first_heads(x: Tensor, heads: int) -> Tensor:
    """(L, B, C) -> (B, L, heads, C // heads), a view: the kernels take any token and batch stride."""
    L, B, C = x.shape
    return x.view(L, B, heads, C // heads).transpose(0, 1)


def _post_or_pre_norm(residual: Tensor, branch: Tensor, norm: nn.LayerNorm, pre_norm: bool, backend) -> Tensor:
    """Post-norm `norm(residual + branch)` (fused add + LayerNorm), or pre-norm `residual + branch`."""
    if pre_norm:
        return residual + branch
    return residual_layer_norm(residual, branch, None, norm, backend)[1]


def _mha_block(attn: nn.MultiheadAttention, norm, pre_norm: bool, tgt: Tensor, memory: Optional[Tensor], pos,
               query_pos, mask_logits: Optional[Tensor], backend) -> Tensor:
    """One sequence-first attention layer around nn.MultiheadAttention on masked_attention:
    queries tgt (+ query_pos), keys memory (+ pos), values memory (memory None: self-attention,
    keys tgt + query_pos, values tgt), the mask from mask_logits; residual, then post-norm (or
    the pre-norm form)."""
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
    out = masked_attention(q, k, v, mask_logits, backend=backend)
    out = attn.out_proj(out.transpose(0, 1).reshape(Q, B, C))
    return _post_or_pre_norm(tgt, out, norm, pre_norm, backend)


def _ffn_block(linear1: nn.Linear, linear2: nn.Linear, norm, pre_norm: bool, tgt: Tensor, backend) -> Tensor:
    """The decoders' ReLU FFN with its residual and (post- or pre-) LayerNorm."""
    x = norm(tgt) if pre_norm else tgt
    return _post_or_pre_norm(tgt, linear2(torch.relu_(linear1(x))), norm, pre_norm, backend)


def _is_relu(act) -> bool:
    return act is nn.functional.relu or type(act) is nn.ReLU or type(act).__name__ == "ReLUActivation"


def _dropout_active(module: nn.Module) -> bool:
    return module.training and any((isinstance(m, nn.Dropout) and m.p > 0) or
                                   (isinstance(m, nn.MultiheadAttention) and m.dropout > 0) for m in module.modules())


def masked_decoder_backend(device: torch.device, dtype: torch.dtype, width: int, heads: int) -> str:
    """What masked_attention picks for a Mask2Former decoder of this width and head count."""
    return masked_attention_preferred(device, dtype, width // heads)[0]


def _masked_decoder_runs(decoder: nn.Module, x: Tensor, norm_weight: Tensor, heads: int) -> bool:
    """Whether a Mask2Former decoder takes its fused forward: a pinned kernel backend, or no
    dropout in training, no grad, and a kernel that masked_attention picks (not its reference)."""
    if decoder._fastdino_backend is not None:
        return decoder._fastdino_backend != "ref"
    if _dropout_active(decoder):  # transformers' cross_attn carries config.dropout, as its layer drop
        return False
    return picks_kernel(lambda: masked_decoder_backend(x.device, x.dtype, norm_weight.shape[0], heads), x,
                        norm_weight)


class FusedMask2FormerMaskedAttentionDecoder:
    """transformers' Mask2FormerMaskedAttentionDecoder with the masked cross-attention on
    masked_attention: the mask predictor's logits, resized to the next level, go to the kernel as
    they are; no sigmoid, no (B * heads, Q, HW) boolean mask, no all-blocked-row fix-up pass (the
    kernel applies the rule). The queries' self-attention runs on masked_attention without a mask,
    the residual + LayerNorm seams on add_layer_norm. Returns what the original returns.

    The original forward runs for attention weights (output_attentions), dropout or layer drop in
    training, inputs that require grad, or where masked_attention would pick its reference.
    """

    def _fastdino_runs(self, x: Tensor) -> bool:
        return _masked_decoder_runs(self, x, self.layernorm.weight, self.mask_predictor.num_heads)

    def _fastdino_predict(self, output: Tensor, pixel_embeddings: Tensor, size) -> tuple[Tensor, Tensor]:
        """The mask predictor's (mask logits at 1/4, logits resized to `size` as (B, Q, HW))."""
        mask_embeddings = self.mask_predictor.mask_embedder(output.transpose(0, 1))
        outputs_mask = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, pixel_embeddings)
        resized = nn.functional.interpolate(outputs_mask, size=size, mode="bilinear", align_corners=False)
        return outputs_mask, resized.flatten(2)

    def _fastdino_layer(self, layer, hidden, level, pos, query_pos, features, mask_logits) -> Tensor:
        backend = self._fastdino_backend
        Q, B, C = hidden.shape
        hidden = _mha_block(layer.cross_attn, layer.cross_attn_layer_norm, layer.pre_norm, hidden, features[level],
                            None if pos is None else pos[level], query_pos, mask_logits, backend)
        # self-attention over the queries (Mask2FormerAttention: q pre-scaled by head_dim**-0.5)
        sa = layer.self_attn
        x = layer.self_attn_layer_norm(hidden) if layer.pre_norm else hidden
        x_pos = x if query_pos is None else x + query_pos
        q, k, v = sa.q_proj(x_pos), sa.k_proj(x_pos), sa.v_proj(x)
        out = masked_attention(_sequence_first_heads(q, sa.num_heads), _sequence_first_heads(k, sa.num_heads),
                               _sequence_first_heads(v, sa.num_heads), None, scale=sa.scaling, backend=backend)
        out = sa.out_proj(out.transpose(0, 1).reshape(Q, B, C))
        hidden = _post_or_pre_norm(hidden, out, layer.self_attn_layer_norm, layer.pre_norm, backend)
        return _ffn_block(layer.fc1, layer.fc2, layer.final_layer_norm, layer.pre_norm, hidden, backend)

    def forward(self, inputs_embeds=None, multi_stage_positional_embeddings=None, pixel_embeddings=None,
                encoder_hidden_states=None, query_position_embeddings=None, feature_size_list=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions or not self._fastdino_runs(inputs_embeds):
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
                                          query_position_embeddings, encoder_hidden_states, mask_logits)
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
        return _sibling_class(self, "Mask2FormerMaskedAttentionDecoderOutput")(last_hidden_state=hidden, hidden_states=all_hidden_states,
                                           attentions=None, intermediate_hidden_states=intermediate,
                                           masks_queries_logits=masks)


def _sibling_class(module: nn.Module, name: str) -> type:
    """A class (an output dataclass) defined next to the patched module's original class."""
    import sys

    return getattr(sys.modules[module._fastdino_original_class.__module__], name)


def official_mask2former_decoder_reasons(module: nn.Module) -> list[str]:
    """dinov3's MultiScaleMaskedTransformerDecoder: its three layer lists, heads and prediction heads."""
    reasons = children_reasons(module, ("transformer_self_attention_layers", "transformer_cross_attention_layers",
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
        reasons += _multihead_attention_reasons(cross.multihead_attn, f"transformer_cross_attention_layers.{i}")
        reasons += _multihead_attention_reasons(self_attn.self_attn, f"transformer_self_attention_layers.{i}")
        reasons += [f"transformer_ffn_layers.{i}: {r}" for r in _linear_reasons(ffn, ("linear1", "linear2"))]
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

    def _fastdino_runs(self, x: Tensor) -> bool:
        return _masked_decoder_runs(self, x, self.post_norm.weight, self.num_heads)

    def _fastdino_heads(self, output: Tensor, mask_features: Tensor, size):
        """forward_prediction_heads with the resized mask logits, (B, Q, HW), in place of the mask."""
        decoder_output = self.post_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        resized = nn.functional.interpolate(outputs_mask, size=size, mode="bilinear", align_corners=False)
        return outputs_class, outputs_mask, resized.flatten(2)

    def forward(self, x, mask_features, mask=None):
        if not self._fastdino_runs(mask_features):
            return super().forward(x, mask_features, mask)
        backend = self._fastdino_backend
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
            src.append((self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        batch = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        outputs_class, outputs_mask, mask_logits = self._fastdino_heads(output, mask_features, size_list[0])
        classes, masks = [outputs_class], [outputs_mask]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            cross = self.transformer_cross_attention_layers[i]
            output = _mha_block(cross.multihead_attn, cross.norm, cross.normalize_before, output, src[level],
                                pos[level], query_pos, mask_logits, backend)
            sa = self.transformer_self_attention_layers[i]
            output = _mha_block(sa.self_attn, sa.norm, sa.normalize_before, output, None, None, query_pos, None,
                                backend)
            ffn = self.transformer_ffn_layers[i]
            output = _ffn_block(ffn.linear1, ffn.linear2, ffn.norm, ffn.normalize_before, output, backend)
            outputs_class, outputs_mask, mask_logits = self._fastdino_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels])
            classes.append(outputs_class)
            masks.append(outputs_mask)
        return {"pred_logits": classes[-1], "pred_masks": masks[-1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes[:-1], masks[:-1])]}


# -- EoMT: queries prepended to the last num_blocks layers, masked to their predicted patches -----


def eomt_reasons(module: nn.Module) -> list[str]:
    """transformers' EomtForUniversalSegmentation / EomtDinov3ForUniversalSegmentation."""
    reasons = children_reasons(module, ("embeddings", "layers", "layernorm", "query", "predict", "attn_mask_probs",
                                        "grid_size", "num_hidden_layers", "config"))
    if reasons:
        return reasons
    missing = [n for n in ("num_blocks", "num_queries") if not hasattr(module.config, n)]
    if missing or not hasattr(module.embeddings, "num_prefix_tokens"):
        return [f"config has no {', '.join(missing) or 'embeddings.num_prefix_tokens'}"]
    return []


def _is_fused(module: nn.Module) -> bool:
    return hasattr(type(module), "_fastdino_original_class")


class FusedEomtForUniversalSegmentation:
    """EoMT's forward without the dense (B, heads, N, N) attention mask.

    The original builds, for every masked block, a boolean N x N mask, writes the query-to-patch
    part from the interpolated mask logits, expands it over the heads and turns it into an
    additive float mask. Here the interpolated logits (B, Q, HW) go to the patched layers'
    attention as they are (rope_attention's `mask_logits`, rule logit > 0). Everything else is the
    original's sequence: queries prepended at layer L - num_blocks, a prediction from the
    layernormed tokens before each masked block while its attn_mask_probs entry is > 0, a mask
    kept for the following layers, random queries unmasked with probability 1 - p (the same
    torch.rand call, so the same draw), the final prediction. Outputs are the original's output
    class with the same fields. The original forward runs in training, with labels (the loss),
    with any extra argument (output_hidden_states, return_dict, ...), or when a masked layer or its
    attention was left unpatched.
    """

    def _fastdino_runs(self, mask_labels, class_labels, kwargs) -> bool:
        cfg = self.config
        if self.training or mask_labels is not None or class_labels is not None or kwargs:
            return False
        if getattr(cfg, "output_hidden_states", False) or getattr(cfg, "output_attentions", False):
            return False
        if getattr(cfg, "return_dict", True) is False:
            return False
        first = self.num_hidden_layers - cfg.num_blocks
        return all(_is_fused(layer) and _is_fused(layer.attention) for layer in self.layers[first:])

    def forward(self, pixel_values, mask_labels=None, class_labels=None, patch_offsets=None, **kwargs):
        if not self._fastdino_runs(mask_labels, class_labels, kwargs):
            return super().forward(pixel_values, mask_labels=mask_labels, class_labels=class_labels,
                                   patch_offsets=patch_offsets, **kwargs)
        cfg = self.config
        hidden = self.embeddings(pixel_values)
        rope = getattr(self, "rope_embeddings", None)  # EoMT-DINOv3; EoMT on DINOv2 has none
        extra = {} if rope is None else {"position_embeddings": rope(pixel_values.to(hidden.dtype))}
        first = self.num_hidden_layers - cfg.num_blocks
        queries = cfg.num_queries
        probs = self.attn_mask_probs.tolist()  # one host read per forward, not two per masked block
        logits = None
        for idx, layer in enumerate(self.layers):
            if idx == first:
                query = self.query.weight[None].expand(hidden.shape[0], -1, -1).to(hidden.device)
                hidden = torch.cat((query, hidden), dim=1)
            if idx >= first and probs[idx - first] > 0:
                masks, _ = self.predict(self.layernorm(hidden))
                logits = nn.functional.interpolate(masks, size=self.grid_size, mode="bilinear").flatten(2)
                patches = hidden.shape[1] - queries - self.embeddings.num_prefix_tokens
                if logits.shape[2] != patches:
                    raise ValueError(f"EoMT: the mask grid {tuple(self.grid_size)} has {logits.shape[2]} cells but "
                                     f"the image gives {patches} patches (pixel_values must be config.image_size)")
                prob = probs[idx - first]
                if prob < 1:  # the original's _disable_attention_mask, same draw
                    unmasked = torch.rand(hidden.shape[0], queries, device=hidden.device) > prob
                    logits = logits.masked_fill(unmasked[..., None], 1.0)
            if logits is None:
                hidden = layer(hidden, **extra)
            else:
                hidden = layer(hidden, fastdino_mask_logits=logits, **extra)
        sequence_output = self.layernorm(hidden)
        masks, classes = self.predict(sequence_output)
        output_class = self._fastdino_original_class.__name__ + "Output"  # e.g. EomtForUniversalSegmentationOutput
        return _sibling_class(self, output_class)(
            loss=None, masks_queries_logits=masks, class_queries_logits=classes, last_hidden_state=sequence_output,
            patch_offsets=patch_offsets)


# -- the bf16 precision policy: whole regions (pixel decoders, the ViT-Adapter) under bf16 autocast --


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
