"""fastdino.patch on transformers' EoMT (DINOv3 and DINOv2 forms): tiny random-init models give
the same mask logits, class logits and last hidden state with the masked blocks on, their
mask passed to rope_attention as logits instead of a dense N x N mask; state_dict is untouched;
unpatch restores."""


from unittest import mock

import pytest
import torch
from helpers import DEVICE, op_args, op_runs
from models import require_transformers
from test_patch import BACKENDS, rel_err

import fastdino
from fastdino.fused.vit import eomt_dense_mask
from fastdino.ops._dispatch import observe

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")  # the EoMT models build their matcher with it

ROOT = ("FusedEomtForUniversalSegmentation",)  # the mixin: the root keeps transformers' class name


def _mixed_masks(module, inputs, out):
    """Random init gives near-constant patch features, so the mask logits barely vary. Centred,
    plus one constant channel: per-query offsets, hence open, blocked, fully open and fully blocked
    query rows (about 35%, 65%, 20% and 30% of the keys and rows at the sizes here)."""
    out = out - out.mean((2, 3), keepdim=True)
    return torch.cat([torch.full_like(out[:, :1], 8) * out[:, 1:].std(), out[:, 1:]], dim=1)


def eomt(kind="dinov3", dtype=torch.float32, **cfg):
    """(model, run): run() returns the outputs the model gives, flattened into one vector."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=128, patch_size=16,
                  num_queries=10, num_blocks=2, num_labels=5, layerscale_value=0.5)
    if kind == "dinov3":
        require_transformers("EomtDinov3Config", "5.1")
        config = transformers.EomtDinov3Config(intermediate_size=128, **{**common, **cfg})
        model = transformers.EomtDinov3ForUniversalSegmentation(config)
    else:
        model = transformers.EomtForUniversalSegmentation(transformers.EomtConfig(**{**common, **cfg}))
    model = model.to(DEVICE, dtype).eval()
    model.upscale_block.register_forward_hook(_mixed_masks)
    pixels = torch.randn(2, 3, 128, 128, device=DEVICE, dtype=dtype)

    def run(**kwargs):
        with torch.no_grad():
            out = model(pixel_values=pixels, **kwargs)
        return torch.cat([t.flatten().float() for t in (out.masks_queries_logits, out.class_queries_logits,
                                                        out.last_hidden_state)])

    return model, run


def patched_run(model, run, backend, **kwargs):
    """Patch, run with the attention watched, and return (outputs, the mask_logits each layer's
    attention was given). An unmasked layer on the Triton form rotates q and k in their projections'
    epilogue (two fused_linear runs with cos) and calls SDPA: None, as rope_attention without logits."""
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = fastdino.patch(model, backend=backend)
    assert report.swapped[0].path == "" and report.swapped[0].fused in ROOT and not report.skipped
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    seen = []

    def watch(op, backend, args):
        if op in ("rope_attention", "fused_linear"):
            named = op_args(op, mock.call(backend, *args))
            if op == "rope_attention":
                seen.append(named["mask_logits"])
            elif named["cos"] is not None:
                seen.append("rotated projection")

    with observe(watch):
        out = run(**kwargs)
    masks = []
    while seen:
        first = seen.pop(0)
        if isinstance(first, str):  # q_proj, then k_proj
            assert seen.pop(0) == first
            first = None
        masks.append(first)
    return out, masks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dinov3", "dinov3-gated", "dinov2"])
def test_patched_eomt_matches_original(kind, backend):
    cfg = dict(use_gated_mlp=True, hidden_act="silu") if kind == "dinov3-gated" else {}
    model, run = eomt(kind.split("-")[0], **cfg)
    ref = run()
    out, masks = patched_run(model, run, backend)
    # 2 unmasked layers, then 2 masked blocks: (B, queries, 8 x 8 patches) logits, never a dense mask
    assert [None if m is None else tuple(m.shape) for m in masks] == [None, None, (2, 10, 64), (2, 10, 64)]
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
    assert fastdino.unpatch(model) == len(fastdino.patch(model, backend=backend).swapped)
    fastdino.unpatch(model)
    torch.testing.assert_close(run(), ref, atol=0, rtol=0)


def test_the_mask_matters_at_these_sizes():
    # The check above could not fail if the masked blocks saw no blocked key: without the mask the
    # outputs move by far more than its tolerance.
    model, run = eomt()
    ref = run()
    model.attn_mask_probs.zero_()
    assert rel_err(run(), ref) > 1e-2


@pytest.mark.parametrize("probs", [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.7]], ids=str)
def test_annealed_and_random_mask_probabilities(probs):
    # [1, 0]: the original keeps the first block's mask for the second; [0, 0]: no mask at all
    # (EoMT's inference setting); [0.5, 0.7]: random queries unmasked, the same draw after seeding.
    model, run = eomt()
    model.attn_mask_probs.copy_(torch.tensor(probs))
    torch.manual_seed(1)
    ref = run()
    torch.manual_seed(1)
    out, masks = patched_run(model, run, "triton")
    assert [m is not None for m in masks] == [False, False, probs[0] > 0, any(p > 0 for p in probs)]
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)


def test_bf16_eomt_matches_original():
    model, run = eomt(dtype=torch.bfloat16)
    ref = run()
    out, _ = patched_run(model, run, "triton")
    assert rel_err(out, ref) <= 2e-2, rel_err(out, ref)


def test_fallbacks_run_the_original_forward():
    model, run = eomt()
    ref_hidden = run(output_hidden_states=True)
    _, masks = patched_run(model, run, None, output_hidden_states=True)
    assert all(m is None for m in masks)  # the original's dense mask path
    torch.testing.assert_close(run(output_hidden_states=True), ref_hidden, atol=1e-5, rtol=1e-5)
    model.train()
    with op_runs("rope_attention") as ops:
        model(pixel_values=torch.randn(1, 3, 128, 128, device=DEVICE))
    assert all(op_args("rope_attention",
                       c)["mask_logits"] is None for c in ops["rope_attention"].call_args_list)


def test_wrong_image_size_is_named():
    model, _ = eomt()
    fastdino.patch(model)
    with pytest.raises((ValueError, RuntimeError)):
        with torch.no_grad():
            model(pixel_values=torch.randn(1, 3, 160, 160, device=DEVICE))


def test_attention_fallback_builds_the_models_dense_mask():
    # A fused attention that must run the original (here: attention weights asked for) turns the
    # logits back into EoMT-DINOv3's own additive mask; both paths agree.
    model, _ = eomt()
    fastdino.patch(model, backend="triton")
    layer = model.layers[-1]
    hidden = torch.randn(2, 10 + 5 + 64, 64, device=DEVICE)
    logits = torch.randn(2, 10, 64, device=DEVICE)
    pos = model.rope_embeddings(torch.zeros(1, 3, 128, 128, device=DEVICE))
    with torch.no_grad():
        fused = layer(hidden, position_embeddings=pos, fastdino_mask_logits=logits)
        dense = layer(hidden, position_embeddings=pos, fastdino_mask_logits=logits, output_attentions=True)
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-5)
    mask = eomt_dense_mask(logits, 79, 4, torch.float32)
    assert mask.shape == (2, 4, 79, 79)
    # open is 1, as the model has it
    assert (mask[:, :, 10:] == 1).all() and (mask[:, :, :10, :15] == 1).all()
    assert ((mask[:, 0, :10, 15:] == 1) == (logits > 0)).all()
    assert (mask[:, 0, :10, 15:][logits <= 0] == torch.finfo(torch.float32).min).all()
