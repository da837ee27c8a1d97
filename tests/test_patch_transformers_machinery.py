"""A patched transformers model keeps its library's machinery, as transformers' own common model
tests check it, on EoMT (the root class fastdino swaps) patched with the default and a pinned
backend: output recording (hidden states and attentions, counts and shapes), save_pretrained /
from_pretrained (the config names the original architecture), torch.save, batching equivalence
and a training step with labels."""

import json

import pytest
import torch
from helpers import DEVICE
from test_patch_eomt import _mixed_masks, eomt

import fastdino
from fastdino import _ext

transformers = pytest.importorskip("transformers")
BACKENDS = [None, DEVICE.type if _ext.BUILD[DEVICE.type] else "triton"]
KINDS = {"EomtDinov3ForUniversalSegmentation": "dinov3", "EomtForUniversalSegmentation": "dinov2"}


def outputs(model, pixels, **kwargs):
    with torch.no_grad():
        return model(pixel_values=pixels, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("cls", KINDS)
def test_hidden_states_and_attentions_are_recorded(cls, backend):
    model, _ = eomt(KINDS[cls])
    model.set_attn_implementation("eager")  # SDPA returns no weights: transformers' tests do the same
    pixels = torch.randn(2, 3, 128, 128, device=DEVICE)
    ref = outputs(model, pixels, output_hidden_states=True, output_attentions=True)
    assert len(ref.hidden_states) == 5 and len(ref.attentions) == 4  # what transformers' tests count
    fastdino.patch(model, backend=backend)
    assert type(model).__name__ == cls and str(type(model)) == str(type(model)._fastdino_original_class)
    out = outputs(model, pixels, output_hidden_states=True, output_attentions=True)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref.hidden_states]
    assert [a.shape for a in out.attentions] == [a.shape for a in ref.attentions]
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.config.output_hidden_states = True  # the config route, as transformers' tests also take
    assert len(outputs(model, pixels).hidden_states) == len(ref.hidden_states)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_save_pretrained_names_the_original_and_loads_back(backend, tmp_path):
    model, _ = eomt()
    pixels = torch.randn(1, 3, 128, 128, device=DEVICE)
    fastdino.patch(model, backend=backend)
    patched = outputs(model, pixels).masks_queries_logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["EomtDinov3ForUniversalSegmentation"]
    loaded = transformers.AutoModelForUniversalSegmentation.from_pretrained(tmp_path).to(DEVICE).eval()
    loaded.upscale_block.register_forward_hook(_mixed_masks)  # as eomt() does
    assert type(loaded) is transformers.EomtDinov3ForUniversalSegmentation  # saved weights, original code
    torch.testing.assert_close(outputs(loaded, pixels).masks_queries_logits, patched, atol=1e-4, rtol=1e-4)
    fastdino.patch(loaded, backend=backend)
    torch.testing.assert_close(outputs(loaded, pixels).masks_queries_logits, patched, atol=1e-5, rtol=1e-5)


def test_torch_save_of_a_patched_eomt(tmp_path):
    model, _ = eomt()
    pixels = torch.randn(1, 3, 128, 128, device=DEVICE)
    fastdino.patch(model, backend=BACKENDS[1])
    expected = outputs(model, pixels).masks_queries_logits
    torch.save(model, tmp_path / "eomt.pt")
    loaded = torch.load(tmp_path / "eomt.pt", weights_only=False)
    assert fastdino.fused.common.is_fused(loaded) and loaded._fastdino_backend == BACKENDS[1]
    torch.testing.assert_close(outputs(loaded, pixels).masks_queries_logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_batching_equivalence(backend):
    model, _ = eomt()
    model.attn_mask_probs.zero_()  # inference setting: no random queries, so images are independent
    fastdino.patch(model, backend=backend)
    pixels = torch.randn(3, 3, 128, 128, device=DEVICE)
    batched = outputs(model, pixels)
    for i in range(3):
        single = outputs(model, pixels[i:i + 1])
        torch.testing.assert_close(single.masks_queries_logits, batched.masks_queries_logits[i:i + 1],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(single.class_queries_logits, batched.class_queries_logits[i:i + 1],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_training_step_with_labels(backend):
    model, _ = eomt()
    pixels = torch.randn(2, 3, 128, 128, device=DEVICE)
    mask_labels = [(torch.rand(3, 128, 128, device=DEVICE) > 0.5).float() for _ in range(2)]
    class_labels = [torch.randint(0, 5, (3,), device=DEVICE) for _ in range(2)]

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same random unmasked queries
        loss = model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    ref_loss, ref_grads = step()
    fastdino.patch(model, backend=backend)
    loss, grads = step()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


# -- every transformers family fastdino patches: DINOv3ViT, Mask2Former (and EoMT above) ---------


def hf_family(name):
    """(model, pixels, the output fields compared) of a tiny random-init transformers model."""
    if name == "dinov3-vit":
        from test_patch import hf_vit

        return hf_vit().to(DEVICE), torch.randn(2, 3, 64, 64, device=DEVICE), ("last_hidden_state",)
    from test_patch_masked_attention import hf_mask2former

    model, _ = hf_mask2former()
    return model, torch.randn(2, 3, 96, 64, device=DEVICE), ("masks_queries_logits", "class_queries_logits")


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("family", ["dinov3-vit", "mask2former"])
def test_family_keeps_recording_saving_and_batching(family, backend, tmp_path):
    # (their training step, with a pinned backend and with the default: tests/test_grad.py)
    model, pixels, fields = hf_family(family)
    if family == "dinov3-vit":
        model.set_attn_implementation("eager")
    kwargs = dict(output_hidden_states=True, output_attentions=family == "dinov3-vit")
    ref = outputs(model, pixels, **kwargs)
    fastdino.patch(model, backend=backend)
    out = outputs(model, pixels, **kwargs)
    recorded = (("hidden_states", "attentions") if family == "dinov3-vit" else
                ("encoder_hidden_states", "pixel_decoder_hidden_states", "transformer_decoder_hidden_states"))
    for field in recorded:
        got, want = getattr(out, field), getattr(ref, field)
        assert want and [t.shape for t in got] == [t.shape for t in want], field
    for field in fields:
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), atol=1e-4, rtol=1e-4)
    # save_pretrained: the original architecture, loads back as the original class
    model.save_pretrained(tmp_path)
    architectures = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert architectures == [ref_model_class(model).__name__]
    loaded = ref_model_class(model).from_pretrained(tmp_path).to(DEVICE).eval()
    if family == "mask2former":
        from test_patch_masked_attention import _mixed_masks

        loaded.model.pixel_level_module.decoder.mask_projection.register_forward_hook(_mixed_masks)
    torch.testing.assert_close(getattr(outputs(loaded, pixels), fields[0]), getattr(out, fields[0]),
                               atol=1e-4, rtol=1e-4)
    # batching: each image alone gives its row of the batch (without the test's mask hook, which
    # normalises over the batch)
    if family == "mask2former":
        model.model.pixel_level_module.decoder.mask_projection._forward_hooks.clear()
    batched = outputs(model, pixels)
    for i in range(pixels.shape[0]):
        single = outputs(model, pixels[i:i + 1])
        for field in fields:
            torch.testing.assert_close(getattr(single, field), getattr(batched, field)[i:i + 1], atol=1e-4,
                                       rtol=1e-4)


def ref_model_class(model):
    """The class transformers sees: a swapped root's original, else the model's own."""
    return getattr(type(model), "_fastdino_original_class", type(model))
