"""Models built on the meta device (as transformers' from_pretrained and large-model loaders do):
fastdino.patch swaps them like any other, and after to_empty + load_state_dict they compute what
the unpatched model loaded the same way computes."""

import pytest
import torch
from helpers import DEVICE
from models import TRUST
from test_patch import hf_vit, official_vit, run_hf, run_official, run_timm, timm_tree
from test_patch_convnext import official_convnext
from test_patch_deformable import official_decoder as official_pixel_encoder
from test_patch_eomt import eomt
from test_patch_masked_attention import hf_mask2former
from test_patch_masked_attention import official_decoder as official_mask2former_decoder
from test_verify_precision import official_pixel_decoder, run_decoder

import fastdino
from fastdino.fused.common import is_fused

transformers = pytest.importorskip("transformers")


def _with_pixels(model, run, shape=(2, 3, 64, 48)):
    pixels = torch.randn(*shape, device=DEVICE)
    return model, lambda: run(model, pixels)


def _hf_convnext():
    torch.manual_seed(0)
    cfg = transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                            layer_scale_init_value=0.5)
    model = transformers.DINOv3ConvNextModel(cfg).to(DEVICE).eval()
    pixels = torch.randn(2, 3, 64, 64, device=DEVICE)
    return model, lambda: model(pixel_values=pixels).last_hidden_state


def _official_convnext():
    model = official_convnext().to(DEVICE)
    pixels = torch.randn(2, 3, 64, 64, device=DEVICE)
    return model, lambda: model(pixels)


def _official_pixel_decoder():
    model, features = official_pixel_decoder()
    return model, lambda: run_decoder(model, features)[0]


FAMILIES = {
    "hf-vit": lambda: _with_pixels(hf_vit().to(DEVICE), run_hf),
    "hf-vit-gated": lambda: _with_pixels(hf_vit(gated=True).to(DEVICE), run_hf),
    "hf-convnext": _hf_convnext,
    "hf-mask2former-dinov3": lambda: hf_mask2former("dinov3"),
    "hf-eomt-dinov3": lambda: eomt("dinov3"),
    "hf-eomt": lambda: eomt("dinov2"),
    "official-vit": lambda: _with_pixels(official_vit(embed_dim=64, depth=2, num_heads=4,
                                                      n_storage_tokens=4).to(DEVICE), run_official),
    "official-convnext": _official_convnext,
    "official-pixel-encoder": official_pixel_encoder,
    "official-pixel-decoder": _official_pixel_decoder,
    "official-m2f-decoder": official_mask2former_decoder,
    "timm-eva": lambda: _with_pixels(timm_tree().to(DEVICE), run_timm),
}


def _load(model, state, buffers):
    """to_empty, then the state_dict and the non-persistent buffers (as a model's own init would)."""
    model.to_empty(device=DEVICE)
    model.load_state_dict(state)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_on_the_meta_device_patches_and_loads(name):
    model, run = FAMILIES[name]()
    with torch.no_grad():
        ref = run()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    model.to("meta")  # the module tree of a model built on the meta device: no memory behind it
    report = fastdino.patch(model, trust=TRUST)
    assert report.swapped, str(report)
    assert "meta" in report.where
    _load(model, state, buffers)
    assert any(is_fused(m) for m in model.modules())
    with torch.no_grad():
        out = run()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_a_mask2former_built_under_the_meta_device_context_patches():
    """As transformers builds it for from_pretrained: every tensor created on meta."""
    from test_patch_deformable import mask2former_config

    with torch.device("meta"):
        model = transformers.Mask2FormerForUniversalSegmentation(mask2former_config("dinov3"))
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert len(meta) > 100
    report = fastdino.patch(model.eval())
    swapped = {s.original for s in report.swapped}
    assert {"Mask2FormerMaskedAttentionDecoder", "DINOv3ViTLayer",
            "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention"} <= swapped, str(report)
    assert [n for n, p in model.named_parameters() if p.is_meta] == meta  # nothing materialised


def test_self_checks_hold_under_another_default_dtype():
    """from_pretrained(dtype=...) builds (and a post-init patch would run) with the default dtype
    set: the self-checks' sample problems keep their own dtypes."""
    from fastdino import _ext, selfcheck
    from fastdino.ops import OPS

    if not _ext.HAS_EXT:
        pytest.skip("needs fastdino._C")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        for op in OPS.values():
            if "cpu" in op.priority.get("cpu", ()):
                key = (op.name, "cpu", "cpu", torch.float16)
                selfcheck.PASSED.discard(key)  # checked again here, whatever ran before
                selfcheck.RESULTS.pop(key, None)
                assert not selfcheck.reasons(op, "cpu", torch.device("cpu"), torch.float16), op.name
    finally:
        torch.set_default_dtype(previous)
