"""`fastdino.patch(model)`: recognise DINOv3 modules by class name and structure, swap them for
their fused forms in place, and report what was swapped and what was left alone and why."""

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn

from . import _ext, modules
from .ops._dispatch import BACKENDS
from .ops.add_layer_norm import preferred_backend as aln_preferred
from .ops.fused_linear import preferred_backend as linear_preferred
from .ops.ms_deform_attn import preferred_backend as msda_preferred
from .ops.rope_attention import preferred_backend as attn_preferred


def _seam_reasons(children, ls, norm):
    def reasons(module):
        missing = modules.children_reasons(module, children)
        if missing:
            return missing
        return modules.layer_scale_reasons(getattr(module, ls), ls) + modules.layer_norm_reasons(getattr(module, norm), norm)

    return reasons


def _seam_backend(norm):
    def backend(module):
        w = getattr(module, norm).weight
        return aln_preferred(w.device, w.dtype, w.shape[0])[0]

    return backend


def _attention_backend(weight, head_dim):
    def backend(module):
        w = getattr(module, weight).weight
        return attn_preferred(w.device, w.dtype, head_dim(module))[0]

    return backend


def _mlp_backend(linear):
    def backend(module):
        w = getattr(module, linear).weight
        return linear_preferred(w.device, w.dtype)[0]

    return backend


def _msda_backend(module):
    w = module.value_proj.weight
    return msda_preferred(w.device, w.dtype)[0]


def _decoder_backend(norm, heads):
    def backend(module):
        w = getattr(module, norm).weight
        return modules.masked_decoder_backend(w.device, w.dtype, w.shape[0], heads(module))

    return backend


def _eomt_backend(module):
    attn = module.layers[-1].attention
    return attn_preferred(attn.q_proj.weight.device, attn.q_proj.weight.dtype, attn.head_dim)[0]


# transformers' DINOv3ViT layer and MLPs, which EoMT-DINOv3 copies
_LAYER_REASONS = _seam_reasons(("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2"),
                               "layer_scale1", "norm2")
_HF_MLP_REASONS = modules.mlp_reasons(("up_proj", "down_proj"), "act_fn", modules.is_exact_gelu, "exact GELU")
_HF_GATED_MLP_REASONS = modules.mlp_reasons(("gate_proj", "up_proj", "down_proj"), "act_fn", modules.is_silu, "SiLU")


@dataclass(frozen=True)
class Rule:
    class_name: str  # matched against type(module).__name__, so no import of the model library
    mixin: type
    reasons: Callable[[nn.Module], list[str]]  # why this instance cannot be swapped ([] if it can)
    backend: Callable[[nn.Module], str]  # what its main op selects for the current parameters


RULES = (
    # Hugging Face transformers (4.56+ and 5.x; the layer sits at layer.{i} or model.layer.{i})
    Rule("DINOv3ViTLayer", modules.FusedDINOv3ViTLayer, _LAYER_REASONS, _seam_backend("norm2")),
    Rule("DINOv3ViTAttention", modules.FusedDINOv3ViTAttention, modules.hf_attention_reasons,
         _attention_backend("q_proj", lambda m: m.head_dim)),
    Rule("DINOv3ViTMLP", modules.FusedDINOv3ViTMLP, _HF_MLP_REASONS, _mlp_backend("up_proj")),
    Rule("DINOv3ViTGatedMLP", modules.FusedDINOv3ViTGatedMLP, _HF_GATED_MLP_REASONS, _mlp_backend("gate_proj")),
    Rule("DINOv3ViTRopePositionEmbedding", modules.CachedDINOv3ViTRopePositionEmbedding,
         lambda m: [] if isinstance(getattr(m, "inv_freq", None), Tensor) else ["no inv_freq buffer"],
         lambda m: "cache"),
    # facebookresearch/dinov3 (dinov3/layers/block.py, attention.py, rope_position_encoding.py)
    Rule(
        "SelfAttentionBlock",
        modules.FusedSelfAttentionBlock,
        _seam_reasons(("norm1", "attn", "ls1", "norm2", "mlp", "ls2", "sample_drop_ratio", "_forward_list"),
                      "ls1", "norm2"),
        _seam_backend("norm2"),
    ),
    Rule("SelfAttention", modules.FusedSelfAttention, modules.self_attention_reasons,
         _attention_backend("qkv", lambda m: m.qkv.in_features // m.num_heads)),
    Rule("Mlp", modules.FusedMlp,  # also timm's Mlp (its hidden norm must be Identity)
         modules.mlp_reasons(("fc1", "fc2"), "act", modules.is_exact_gelu, "exact GELU", identity=("norm",)),
         _mlp_backend("fc1")),
    Rule("SwiGLUFFN", modules.FusedSwiGLUFFN, modules.mlp_reasons(("w1", "w2", "w3")), _mlp_backend("w1")),
    Rule("RopePositionEmbedding", modules.CachedRopePositionEmbedding,
         lambda m: [] if isinstance(getattr(m, "periods", None), Tensor) else ["no periods buffer"],
         lambda m: "cache"),
    # timm (timm/models/eva.py: the DINOv3 ViTs are Eva models)
    Rule("EvaBlock", modules.FusedEvaBlock, modules.eva_block_reasons, _seam_backend("norm2")),
    Rule("EvaAttention", modules.FusedEvaAttention, modules.eva_attention_reasons,
         _attention_backend("qkv", lambda m: m.head_dim)),
    # multi-scale deformable attention: dinov3's ViT-Adapter / pixel decoder; transformers' Mask2Former,
    # Deformable DETR and OneFormer
    Rule("MSDeformAttn", modules.FusedMSDeformAttn, modules.ms_deform_attn_reasons, _msda_backend),
    Rule("Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention",
         modules.FusedMask2FormerPixelDecoderEncoderMultiscaleDeformableAttention, modules.ms_deform_attn_reasons,
         _msda_backend),
    Rule("DeformableDetrMultiscaleDeformableAttention", modules.FusedDeformableDetrMultiscaleDeformableAttention,
         modules.ms_deform_attn_reasons, _msda_backend),
    Rule("OneFormerPixelDecoderEncoderMultiscaleDeformableAttention",
         modules.FusedOneFormerPixelDecoderEncoderMultiscaleDeformableAttention, modules.ms_deform_attn_reasons,
         _msda_backend),
    # Mask2Former's masked-attention transformer decoder (transformers)
    Rule("Mask2FormerMaskedAttentionDecoder", modules.FusedMask2FormerMaskedAttentionDecoder,
         modules.mask2former_decoder_reasons, _decoder_backend("layernorm", lambda m: m.mask_predictor.num_heads)),
    # dinov3's Mask2Former head (dinov3/eval/segmentation/models/heads/mask2former_transformer_decoder.py)
    Rule("MultiScaleMaskedTransformerDecoder", modules.FusedMultiScaleMaskedTransformerDecoder,
         modules.official_mask2former_decoder_reasons, _decoder_backend("post_norm", lambda m: m.num_heads)),
    # EoMT (transformers): EoMT-DINOv3 layers are DINOv3ViT layers; EoMT on DINOv2 has no RoPE
    Rule("EomtDinov3ForUniversalSegmentation", modules.FusedEomtForUniversalSegmentation, modules.eomt_reasons,
         _eomt_backend),
    Rule("EomtForUniversalSegmentation", modules.FusedEomtForUniversalSegmentation, modules.eomt_reasons,
         _eomt_backend),
    Rule("EomtDinov3Layer", modules.FusedDINOv3ViTLayer, _LAYER_REASONS, _seam_backend("norm2")),
    Rule("EomtLayer", modules.FusedDINOv3ViTLayer, _LAYER_REASONS, _seam_backend("norm2")),
    Rule("EomtDinov3Attention", modules.FusedDINOv3ViTAttention, modules.hf_attention_reasons,
         _attention_backend("q_proj", lambda m: m.head_dim)),
    Rule("EomtAttention", modules.FusedEomtAttention, modules.eomt_attention_reasons,
         _attention_backend("q_proj", lambda m: m.head_dim)),
    Rule("EomtDinov3MLP", modules.FusedDINOv3ViTMLP, _HF_MLP_REASONS, _mlp_backend("up_proj")),
    Rule("EomtDinov3GatedMLP", modules.FusedDINOv3ViTGatedMLP, _HF_GATED_MLP_REASONS, _mlp_backend("gate_proj")),
    Rule("EomtSwiGLUFFN", modules.FusedDINOv3ViTGatedMLP, _HF_GATED_MLP_REASONS, _mlp_backend("gate_proj")),
    Rule("EomtMLP", modules.FusedEomtMLP,
         modules.mlp_reasons(("fc1", "fc2"), "activation_fn", modules.is_exact_gelu, "exact GELU"),
         _mlp_backend("fc1")),
    Rule("SwiGLU", modules.FusedSwiGLU,
         modules.mlp_reasons(("fc1_g", "fc1_x", "fc2"), "act", modules.is_silu, "SiLU", identity=("norm",)),
         _mlp_backend("fc1_g")),
)

# Regions that precision="bf16" also swaps: they run under bf16 autocast (modules.Bf16Forward).
PRECISION_RULES = (
    Rule("MSDeformAttnPixelDecoder", modules.Bf16MSDeformAttnPixelDecoder, modules.bf16_region_reasons,
         lambda m: "bf16"),  # dinov3's pixel decoder (forward_features forced to fp32)
    Rule("DINOv3_Adapter", modules.Bf16Forward, modules.bf16_region_reasons, lambda m: "bf16"),
    Rule("Mask2FormerPixelDecoder", modules.Bf16Forward, modules.bf16_region_reasons, lambda m: "bf16"),
)
PRECISIONS = (None, "bf16")
_DEFORMABLE = ("MSDeformAttn", "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention",
               "DeformableDetrMultiscaleDeformableAttention", "OneFormerPixelDecoderEncoderMultiscaleDeformableAttention")

_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(mixin: type, original: type) -> type:
    key = (mixin, original)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(mixin.__name__, (mixin, original), {"_fastdino_original_class": original})
    return _FUSED_CLASSES[key]


@dataclass
class Swapped:
    path: str
    original: str
    fused: str
    backend: str  # what the module's main op selects for its current parameter device and dtype


@dataclass
class Skipped:
    path: str
    cls: str
    reasons: list[str]


@dataclass
class PatchReport:
    swapped: list[Swapped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastdino.patch: {len(self.swapped)} swapped, {len(self.skipped)} left alone"]
        lines += [f"  swapped  {s.path or '<root>'}: {s.original} -> {s.fused} [{s.backend}]" for s in self.swapped]
        lines += [f"  left     {s.path or '<root>'} ({s.cls}): {'; '.join(s.reasons)}" for s in self.skipped]
        if self.already_patched:
            lines.append(f"  already patched: {len(self.already_patched)} modules")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def patch(model: nn.Module, backend: Optional[str] = None, precision: Optional[str] = None) -> PatchReport:
    """Swap every recognised module of `model` for its fused form, in place.

    Parameters, buffers and state_dict keys are unchanged; calling it again is a no-op.
    `backend` pins the kernel backend of every fused op ("cuda", "triton", "cpu" or "ref").
    `precision`: None keeps every module's precision. "bf16" also runs the fp32 regions that
    dominate a segmentor's cost in bf16 under autocast (dinov3's pixel decoder, which the
    original forces to fp32, its ViT-Adapter, transformers' Mask2Former pixel decoder):
    matmuls and convolutions in bf16; softmax, normalisation statistics and the deformable
    attention's sampling locations and weights in fp32; outputs returned in fp32. Check what it
    changes on your inputs with fastdino.verify.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastdino.patch: backend must be one of {BACKENDS} or None, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"fastdino.patch: precision must be one of {PRECISIONS}, got {precision!r}")
    report = PatchReport()
    if not _ext.HAS_EXT:
        report.notes.append(f"C++/CUDA kernels unavailable: {_ext.EXT_ERROR}")
    rules = RULES + (PRECISION_RULES if precision == "bf16" else ())
    for path, module in model.named_modules():
        if hasattr(type(module), "_fastdino_original_class"):
            report.already_patched.append(path)
            continue
        rule = next((r for r in rules if type(module).__name__ == r.class_name), None)
        if rule is None:
            continue
        reasons = rule.reasons(module)
        if reasons:
            report.skipped.append(Skipped(path, type(module).__name__, reasons))
            continue
        original = type(module)
        module.__class__ = _fused_class(rule.mixin, original)
        module._fastdino_backend = backend
        if precision is not None and rule.class_name in _DEFORMABLE:
            module._fastdino_precision = precision  # values in bf16 where a bf16 region's autocast is on
        expected = rule.backend(module) if backend is None or rule.backend(module) in ("cache", "bf16") else backend
        report.swapped.append(Swapped(path, original.__name__, type(module).__name__, expected))
    if backend is None and any(s.backend == "ref" for s in report.swapped):
        report.notes.append(
            "[ref]: dispatch prefers no kernel for these modules on the model's current device and dtype "
            "(`fastdino info` says why), so they run the model's own code until it moves to one that has a "
            "kernel; backend= pins one")
    regions = [s.path or "<root>" for s in report.swapped if s.backend == "bf16"]
    if precision == "bf16":
        report.notes.append(
            f"precision bf16: {', '.join(regions) or 'no region found'} run under bf16 autocast (matmuls and "
            "convolutions in bf16; softmax, normalisation statistics, deformable sampling offsets, locations and "
            "weights in fp32; outputs returned in fp32); everything else keeps its precision")
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the original class of every module `patch` swapped; returns how many."""
    restored = 0
    for module in model.modules():
        original = getattr(type(module), "_fastdino_original_class", None)
        if original is not None:
            module.__class__ = original
            del module._fastdino_backend
            module.__dict__.pop("_fastdino_cache", None)
            module.__dict__.pop("_fastdino_precision", None)
            restored += 1
    return restored
