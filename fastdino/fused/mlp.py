"""The ViT MLPs of all three libraries on fused_linear: the input projection(s) and activation in
one GEMM, the output projection with the block's LayerScale + residual in its epilogue."""

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._dispatch import Like
from ..ops.fused_linear import OP as FUSED_LINEAR
from .common import (
    Rule,
    children_reasons,
    decide,
    layer_scale_gamma,
    linear_reasons,
    picked,
    runs_original,
    user_hooks,
)
from .sources import TRANSFORMERS_RELEASES, Source, dinov3, is_from, timm, transformers

TRANSFORMERS_ACTIVATIONS = Source("transformers", ("transformers.activations",), TRANSFORMERS_RELEASES)
TIMM_ACTIVATIONS = timm("layers.activations")


def is_exact_gelu(act: nn.Module) -> bool:
    """nn.GELU(), transformers' GELUActivation ("gelu": F.gelu or its erf form in Python) or timm's
    GELU (timm.layers.activations, what its ConvNeXt blocks get for "gelu"): all erf GELU, not the
    tanh forms."""
    if type(act) is nn.GELU:
        return act.approximate == "none"
    return is_from(act, "GELUActivation", TRANSFORMERS_ACTIVATIONS) or is_from(act, "GELU", TIMM_ACTIVATIONS)


def is_silu(act: nn.Module) -> bool:
    return type(act) is nn.SiLU or is_from(act, "SiLUActivation", TRANSFORMERS_ACTIVATIONS)


def mlp_reasons(linears, act=None, act_check=None, act_kind="", identity=()):
    """Reasons function for an MLP rule: its Linears, its activation, and the optional parts
    (`identity`, e.g. timm's hidden norm) that must be nn.Identity where they exist."""

    def reasons(module: nn.Module) -> list[str]:
        missing = children_reasons(module, (*linears, *([act] if act else [])))
        if missing:
            return missing
        out = linear_reasons(module, linears)
        if act and not act_check(getattr(module, act)):
            out.append(f"{act} is {type(getattr(module, act)).__name__}, not {act_kind}")
        out += [f"{n} is active" for n in identity
                if hasattr(module, n) and not isinstance(getattr(module, n), nn.Identity)]
        return out

    return reasons


def fused_mlp(module: nn.Module, x: Tensor, w: Tensor, b: Optional[Tensor], act: str,
              w2: Optional[Tensor], b2: Optional[Tensor], out: nn.Linear, residual: Optional[Tensor] = None,
              gamma: Optional[Tensor] = None) -> Optional[Tensor]:
    """``[residual + gamma *] out(act(x @ w^T + b [, x @ w2^T + b2]))`` as two fused_linear calls,
    or None where the modules must run: `module`'s decision is the original (fused_linear's
    reference, the untuned default until its kernels are timed; a pinned "ref"; a tuned
    "original"), autocast is on (the Linears would run in another dtype), or the unfused add would
    promote. One decision covers both GEMMs. A non-contiguous residual (a ConvNeXt block's NCHW
    input seen as NHWC) is made contiguous for the epilogue."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # autocast_on inline
        return None
    if residual is not None and (residual.dtype != x.dtype or (gamma is not None and gamma.dtype != x.dtype)):
        return None  # promotion in the unfused add: leave it to the original ops
    # The second GEMM reads the first's output and the contiguous residual (described by Like).
    hidden = Like(x.device, x.dtype, (*x.shape[:-1], w.shape[0]))
    copy = residual is not None and not residual.is_contiguous()
    res = Like(residual.device, residual.dtype, residual.shape) if copy else residual
    second = (hidden, out.weight, out.bias, None, None, None, res, gamma)
    backend = decide(module, FUSED_LINEAR, x, w, b, act, w2, b2, also=second)
    if backend in (None, "ref"):
        return None
    if copy:
        residual = residual.contiguous()
    h = FUSED_LINEAR.run(backend, x, w, b, act, w2, b2)
    return FUSED_LINEAR.run(backend, h, out.weight, out.bias, None, None, None, residual, gamma)


class _FusedMlp:
    """An MLP whose input projection(s) and activation run as one fused_linear, and whose output
    projection can take the block's LayerScale + residual into its epilogue (`mlp_residual`).

    Subclasses give `_fastdino_parts()`: (weight, bias, act, weight2, bias2) of the input side,
    the output nn.Linear, and the dropouts that are no-ops in eval. The original forward runs
    where `fused_mlp` says so, or with dropout active in training.
    """

    _fastdino_op = "fused_linear"  # what the patch report names

    _fastdino_dropouts: tuple = ()

    def _fastdino_mlp(self, x: Tensor, residual: Optional[Tensor] = None,
                      layer_scale=None) -> Optional[Tensor]:
        """mlp(x), or residual + layer_scale(mlp(x)); None when the original modules must run."""
        if self.training and any(getattr(getattr(self, n, None), "p", 0.0) > 0
                                 for n in self._fastdino_dropouts):
            return None
        return fused_mlp(self, x, *self._fastdino_parts(), residual,
                         layer_scale_gamma(layer_scale))

    def forward(self, x):
        if self.__dict__.pop("_fastdino_decided", False):  # mlp_residual decided already: the original
            return super().forward(x)
        y = self._fastdino_mlp(x)
        return super().forward(x) if y is None else y


def mlp_residual(mlp: nn.Module, x: Tensor, residual: Tensor, layer_scale) -> Tensor:
    """``residual + layer_scale(mlp(x))``: one fused epilogue for fc2 + LayerScale + residual when
    `mlp` is a fused MLP whose kernels run, else the modules as they are."""
    fused = getattr(mlp, "_fastdino_mlp", None)
    if fused is not None and not ((mlp._forward_hooks or mlp._forward_pre_hooks) and user_hooks(mlp)):
        # (with hooks on the MLP itself, added after patch, it is called as a module: they run)
        y = None if runs_original(mlp, FUSED_LINEAR, x) else fused(x, residual, layer_scale)
        if y is not None:
            return y
        mlp.__dict__["_fastdino_decided"] = True  # one decision per MLP call: its forward runs the original
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
        return (self.gate_proj.weight, self.gate_proj.bias, "swiglu", self.up_proj.weight, self.up_proj.bias,
                self.down_proj)


class FusedEomtMLP(_FusedMlp):
    """transformers' EomtMLP: fc2(gelu(fc1(x)))."""

    def _fastdino_parts(self):
        return self.fc1.weight, self.fc1.bias, "gelu", None, None, self.fc2


def _backend(linear: str):
    """The report's backend: fused_linear's pick for a batch of rows on the module's weights."""

    def backend(module: nn.Module) -> str:
        w = getattr(module, linear).weight
        return picked(FUSED_LINEAR, Like(w.device, w.dtype, (1, w.shape[1])),
                      Like(w.device, w.dtype, w.shape))

    return backend


HF_MLP_REASONS = mlp_reasons(("up_proj", "down_proj"), "act_fn", is_exact_gelu, "exact GELU")
HF_GATED_MLP_REASONS = mlp_reasons(("gate_proj", "up_proj", "down_proj"), "act_fn", is_silu, "SiLU")

DINOV3_FFN = dinov3("layers.ffn_layers")
TIMM_MLP = timm("layers.mlp")

RULES = (
    # transformers (and the EoMT copies)
    Rule("DINOv3ViTMLP", FusedDINOv3ViTMLP, HF_MLP_REASONS, _backend("up_proj"), transformers("dinov3_vit"),
         parts=("up_proj", "down_proj", "act_fn")),
    Rule("DINOv3ViTGatedMLP", FusedDINOv3ViTGatedMLP, HF_GATED_MLP_REASONS, _backend("gate_proj"),
         transformers("dinov3_vit"), parts=("gate_proj", "up_proj", "down_proj", "act_fn")),
    Rule("EomtDinov3MLP", FusedDINOv3ViTMLP, HF_MLP_REASONS, _backend("up_proj"), transformers("eomt_dinov3"),
         parts=("up_proj", "down_proj", "act_fn")),
    Rule("EomtDinov3GatedMLP", FusedDINOv3ViTGatedMLP, HF_GATED_MLP_REASONS, _backend("gate_proj"),
         transformers("eomt_dinov3"), parts=("gate_proj", "up_proj", "down_proj", "act_fn")),
    Rule("EomtSwiGLUFFN", FusedDINOv3ViTGatedMLP, HF_GATED_MLP_REASONS, _backend("gate_proj"),
         transformers("eomt"), parts=("gate_proj", "up_proj", "down_proj", "act_fn")),
    Rule("EomtMLP", FusedEomtMLP, mlp_reasons(("fc1", "fc2"), "activation_fn", is_exact_gelu, "exact GELU"),
         _backend("fc1"), transformers("eomt"), parts=("fc1", "activation_fn", "fc2")),
    # transformers 4.x names its activation `activation`
    Rule("EomtMLP", FusedEomtMLP, mlp_reasons(("fc1", "fc2"), "activation", is_exact_gelu, "exact GELU"),
         _backend("fc1"), transformers("eomt"), parts=("fc1", "activation", "fc2")),
    # facebookresearch/dinov3 (dinov3/layers/ffn_layers.py)
    Rule("Mlp", FusedMlp, mlp_reasons(("fc1", "fc2"), "act", is_exact_gelu, "exact GELU"), _backend("fc1"),
         DINOV3_FFN, parts=("fc1", "act", "fc2", "drop")),
    Rule("SwiGLUFFN", FusedSwiGLUFFN, mlp_reasons(("w1", "w2", "w3")), _backend("w1"), DINOV3_FFN,
         parts=("w1", "w2", "w3")),
    # timm (timm/layers/mlp.py)
    Rule("Mlp", FusedMlp, mlp_reasons(("fc1", "fc2"), "act", is_exact_gelu, "exact GELU", identity=("norm",)),
         _backend("fc1"), TIMM_MLP, parts=("fc1", "act", "drop1", "norm", "fc2", "drop2")),
    Rule("SwiGLU", FusedSwiGLU, mlp_reasons(("fc1_g", "fc1_x", "fc2"), "act", is_silu, "SiLU",
                                            identity=("norm",)),
         _backend("fc1_g"), TIMM_MLP, parts=("fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2")),
)
