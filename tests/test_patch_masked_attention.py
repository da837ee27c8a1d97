"""fastdino.patch on Mask2Former's masked-attention transformer decoder: tiny random-init
transformers Mask2Former models (Swin and DINOv3 backbones) give the same class and mask logits,
intermediate predictions included; state_dict is untouched; unpatch restores."""

from unittest import mock

import pytest
import torch
from helpers import DEVICE, op_args, op_runs
from models import patch_trusted
from models.dinov3_seg_official import MultiScaleMaskedTransformerDecoder
from test_patch import BACKENDS, rel_err
from test_patch_deformable import mask2former_config

import fastdino

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")  # Mask2FormerForUniversalSegmentation builds its matcher with it

FUSED = "FusedMask2FormerMaskedAttentionDecoder"


def _mixed_masks(module, inputs, out):
    """Random init gives pixel embeddings with a large mean, so every query's mask is ~97% blocked.
    Centred, plus one constant channel: per-query offsets, hence a mix of open, blocked and fully
    blocked rows, as trained decoders have."""
    out = out - out.mean((2, 3), keepdim=True)
    return torch.cat([torch.full_like(out[:, :1], 8) * out[:, 1:].std(), out[:, 1:]], dim=1)


def hf_mask2former(backbone="swin", dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    # 5 decoder layers (decoder_layers - 1): every level is attended, the first one twice
    cfg = mask2former_config(backbone, **{"encoder_layers": 1, "decoder_layers": 6, **cfg})
    model = transformers.Mask2FormerForUniversalSegmentation(cfg).to(DEVICE, dtype).eval()
    model.model.pixel_level_module.decoder.mask_projection.register_forward_hook(_mixed_masks)
    pixels = torch.randn(2, 3, 96, 64, device=DEVICE, dtype=dtype)

    def run(**kwargs):
        out = model(pixel_values=pixels, output_auxiliary_logits=True, output_hidden_states=True, **kwargs)
        aux = [t for a in out.auxiliary_logits for t in a.values()]
        # the intermediate predictions must match too
        assert len(aux) == 2 * (model.config.decoder_layers - 1)
        states = (out.transformer_decoder_last_hidden_state, *out.transformer_decoder_hidden_states)
        return torch.cat([t.flatten().float() for t in (out.class_queries_logits, out.masks_queries_logits,
                                                        *aux,
                                                        *states)])

    return model, run


def needs_mask_logits_off_zero():
    """Skip a close comparison of a random-init transformers Mask2Former on transformers 4.x: its
    init gives mask logits of ~1e-3, some within rounding noise of the blocking threshold, where
    any change of summation order (another BLAS, a fused kernel) flips a mask bit and the flip
    spreads through the layers. 5.x's init gives logits of ~0.1; the decoder is compared there."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__}: random-init mask logits sit at the threshold")


def count_layers(model):
    return model.config.decoder_layers - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backbone", ["swin", "dinov3"])
def test_patched_decoder_matches_original(backbone, backend):
    needs_mask_logits_off_zero()
    model, run = hf_mask2former(backbone)
    with torch.no_grad():
        ref = run()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patch_trusted(model, backend=backend)
    swapped = [s for s in report.swapped if s.fused == FUSED]
    assert len(swapped) == 1 and swapped[0].backend == backend
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    with torch.no_grad(), op_runs("masked_attention") as ops:
        out = run()
    # per layer: the masked cross-attention (with logits) and the queries' self-attention (without)
    layers = count_layers(model)
    calls = [op_args("masked_attention", c) for c in ops["masked_attention"].call_args_list]
    assert len(calls) == (0 if backend == "ref" else 2 * layers)
    if backend != "ref":
        masked = [c["mask_logits"] for c in calls if c["mask_logits"] is not None]
        assert len(masked) == layers
        # Swin's levels are 1/32, 1/16, 1/8 of 96x64; a ViT's taps are all 1/16
        levels = {(10, 3 * 2), (10, 6 * 4), (10, 12 * 8)} if backbone == "swin" else {(10, 6 * 4)}
        assert {tuple(m.shape[1:]) for m in masked} == levels
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
    assert fastdino.unpatch(model) == len(report.swapped)
    with torch.no_grad():
        torch.testing.assert_close(run(), ref, atol=0, rtol=0)


def test_the_comparison_sees_the_mask():
    """Dropping the mask changes the outputs far beyond the tolerance above, and the decoder's
    masks have blocked keys and fully blocked rows: the match is not one the mask could miss."""
    needs_mask_logits_off_zero()
    model, run = hf_mask2former()
    with torch.no_grad():
        ref = run()
    patch_trusted(model, backend="triton")
    op = fastdino.ops.OPS["masked_attention"]
    real = op.run
    stats = []

    def unmasked(backend, q, k, v, mask_logits=None, scale=None):
        if mask_logits is not None:
            blocked = mask_logits.sigmoid() < 0.5
            stats.append((blocked.float().mean().item(), blocked.all(-1).sum().item()))
        return real(backend, q, k, v, None, scale)

    with torch.no_grad(), mock.patch.object(op, "run", unmasked):
        out = run()
    assert rel_err(out, ref) > 1e-2
    assert all(0.05 < frac < 0.95 for frac, _ in stats) and sum(rows for _, rows in stats) > 0, stats


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_pre_norm_decoder_matches_original(backend):
    model, run = hf_mask2former(pre_norm=True)
    with torch.no_grad():
        ref = run()
    patch_trusted(model, backend=backend)
    with torch.no_grad():
        assert rel_err(run(), ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_bf16_decoder_matches_original(backend):
    needs_mask_logits_off_zero()
    model, run = hf_mask2former(dtype=torch.bfloat16)
    with torch.no_grad():
        ref = run()
    patch_trusted(model, backend=backend)
    with torch.no_grad(), op_runs("masked_attention") as ops:
        out = run()
    assert ops["masked_attention"].call_count == 2 * count_layers(model)
    assert rel_err(out, ref) <= 2e-2, rel_err(out, ref)


def test_attention_weights_or_grad_run_the_original():
    model, run = hf_mask2former()
    patch_trusted(model)
    with torch.no_grad(), op_runs("masked_attention") as ops:
        out = model(pixel_values=torch.randn(1, 3, 64, 64, device=DEVICE), output_attentions=True)
    assert ops["masked_attention"].call_count == 0 and len(out.attentions) == count_layers(model)
    with op_runs("masked_attention") as ops:  # grad enabled, parameters require grad
        run().sum().backward()
    assert ops["masked_attention"].call_count == 0
    assert model.model.transformer_module.decoder.layers[0].fc1.weight.grad is not None


def test_default_dispatch_on_cpu_keeps_the_original_forward():
    """On CPU tensors masked_attention picks its reference (measured faster than the C++ CPU
    kernel), so the decoder runs its original forward unless a backend is pinned."""
    model, run = hf_mask2former()
    report = patch_trusted(model)
    assert [s.backend for s in report.swapped if s.fused == FUSED] == ["ref"]
    with torch.no_grad(), op_runs("masked_attention") as ops:
        run()
    assert ops["masked_attention"].call_count == 0


def test_unsupported_decoder_is_left_alone_with_a_reason():
    model, _ = hf_mask2former(activation_function="gelu")
    report = patch_trusted(model)
    assert not [s for s in report.swapped if s.fused == FUSED]
    skipped = [s for s in report.skipped if s.cls == "Mask2FormerMaskedAttentionDecoder"]
    assert skipped and skipped[0].reasons[0] == "layers.0.activation_fn is GELUActivation, not ReLU"


def official_decoder(heads=4, pre_norm=False):
    """A module tree following dinov3's MultiScaleMaskedTransformerDecoder over a 96x64 input's
    1/32, 1/16 and 1/8 maps, with 1/4 mask features (centred plus one constant channel: mixed masks)."""
    torch.manual_seed(0)
    model = MultiScaleMaskedTransformerDecoder(nheads=heads, pre_norm=pre_norm).to(DEVICE).eval()
    x = [torch.randn(2, 32, h, w, device=DEVICE) for h, w in ((3, 2), (6, 4), (12, 8))]
    features = torch.randn(2, 32, 24, 16, device=DEVICE)
    features[:, 0] = 8

    def run():
        out = model(x, features)
        return torch.cat([out["pred_logits"].flatten(), out["pred_masks"].flatten()]
                         + [t.flatten() for a in out["aux_outputs"] for t in a.values()])

    return model, run


OFFICIAL_KEYS = {"transformer_cross_attention_layers.0.multihead_attn.in_proj_weight",
                 "transformer_cross_attention_layers.0.multihead_attn.out_proj.bias",
                 "transformer_self_attention_layers.4.self_attn.in_proj_bias",
                 "transformer_ffn_layers.2.linear1.weight",
                 "transformer_ffn_layers.2.norm.weight", "post_norm.weight", "query_feat.weight",
                 "query_embed.weight",
                 "level_embed.weight", "class_embed.weight", "mask_embed.layers.2.bias"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,pre_norm", [(4, False), (16, False), (4, True)],
                         ids=["dh8", "dh2", "pre-norm"])
def test_patched_official_decoder_matches_original(heads, pre_norm, backend):
    model, run = official_decoder(heads, pre_norm)
    assert OFFICIAL_KEYS <= set(model.state_dict())
    with torch.no_grad():
        ref = run()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patch_trusted(model, backend=backend)
    assert [(s.fused, s.backend) for s in report.swapped] == [("FusedMultiScaleMaskedTransformerDecoder",
                                                               backend)]
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    with torch.no_grad(), op_runs("masked_attention") as ops:
        out = run()
    assert ops["masked_attention"].call_count == (0 if backend == "ref" else 2 * model.num_layers)
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
    assert fastdino.unpatch(model) == 1
    with torch.no_grad():
        torch.testing.assert_close(run(), ref, atol=0, rtol=0)


def test_official_decoder_left_alone_with_a_reason():
    model, _ = official_decoder()
    model.transformer_ffn_layers[1].activation = torch.nn.GELU()
    report = patch_trusted(model)
    assert report.swapped == []
    assert report.skipped[0].reasons == ["transformer_ffn_layers.1.activation is not ReLU"]
