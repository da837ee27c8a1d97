"""Gradients through every op and every patched model with a kernel backend pinned: the kernel runs
the forward, the backward recomputes the op's reference (ops/_dispatch.py, RecomputeRef), so the
gradients are the reference's and a patched model trains, or runs without torch.no_grad(), as the
original does."""

import pytest
import torch
from helpers import DEVICE, op_runs
from models import patch_trusted

from fastdino import _ext
from fastdino.ops import (
    add_layer_norm,
    dwconv_layer_norm,
    fused_linear,
    masked_attention,
    ms_deform_attn,
    rope_attention,
)

KERNELS = ["triton"] + ([DEVICE.type] if _ext.BUILD[DEVICE.type] else [])


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
            for t in tensors]


def grads_of(fn, inputs, seed=1):
    """Outputs of fn(*inputs) and the gradients of a random projection of them w.r.t. `inputs`."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum() for o in outs)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [o.detach() for o in outs], torch.autograd.grad(loss, wanted, allow_unused=True)


def assert_grads_match(name, fn, args, backend, tol=1e-4):
    out, grads = grads_of(lambda *a: fn(*a, backend=backend), leaves(*args))
    ref_out, ref_grads = grads_of(lambda *a: fn(*a, backend="ref"), leaves(*args))
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, atol=tol, rtol=tol, msg=f"{name} {backend} output")
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"{name} {backend}: gradient {i}"
        if g is not None:
            torch.testing.assert_close(g, r, atol=tol, rtol=tol, msg=f"{name} {backend} gradient {i}")


def seeded(*shapes):
    torch.manual_seed(0)
    return [torch.randn(s, device=DEVICE) for s in shapes]


@pytest.mark.quick
@pytest.mark.parametrize("backend", KERNELS)
def test_add_layer_norm_gradients(backend):
    x, branch, gamma, weight, bias = seeded((2, 7, 48), (2, 7, 48), (48,), (48,), (48,))
    assert_grads_match("add_layer_norm", lambda *a, backend: add_layer_norm(*a, 1e-6, backend=backend),
                       (x, branch, gamma, weight, bias), backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_dwconv_layer_norm_gradients(backend):
    x, weight, bias, nw, nb = seeded((2, 16, 9, 6), (16, 1, 7, 7), (16,), (16,), (16,))
    assert_grads_match("dwconv_layer_norm", lambda *a, backend: dwconv_layer_norm(*a, 1e-6, backend=backend),
                       (x.to(memory_format=torch.channels_last), weight, bias, nw, nb), backend)


@pytest.mark.quick
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("act", ["gelu", "swiglu", None])
def test_fused_linear_gradients(act, backend):
    x, w, b, w2, b2, r, g = seeded((13, 32), (24, 32), (24,), (24, 32), (24,), (13, 24), (24,))
    if act != "swiglu":
        w2 = b2 = None
    if act is not None:
        r = g = None
    assert_grads_match(f"fused_linear {act}", fused_linear, (x, w, b, act, w2, b2, r, g), backend)


@pytest.mark.quick
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("masked", [False, True], ids=["rope", "eomt-mask"])
def test_rope_attention_gradients(masked, backend):
    q, k, v, cos, sin, logits = seeded((2, 21, 2, 32), (2, 21, 2, 32), (2, 21, 2, 32), (16, 32), (16, 32),
                                       (2, 3, 16))

    def fn(q, k, v, cos, sin, logits, backend):
        return rope_attention(q, k, v, cos, sin, backend=backend, mask_logits=logits if masked else None)

    assert_grads_match("rope_attention", fn, (q, k, v, cos, sin, logits), backend)


@pytest.mark.quick
@pytest.mark.parametrize("backend", KERNELS)
def test_masked_attention_gradients(backend):
    q, k, v, logits = seeded((2, 5, 3, 16), (2, 37, 3, 16), (2, 37, 3, 16), (2, 5, 37))
    assert_grads_match("masked_attention", masked_attention, (q, k, v, logits), backend)


@pytest.mark.quick
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("form", ["locations", "offsets"])
def test_ms_deform_attn_gradients(form, backend):
    torch.manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3]], device=DEVICE)
    starts = torch.tensor([0, 20], device=DEVICE)
    value = torch.randn(2, 26, 2, 8, device=DEVICE)
    if form == "locations":
        loc = torch.rand(2, 7, 2, 2, 4, 2, device=DEVICE)
        w = torch.rand(2, 7, 2, 2, 4, device=DEVICE)
        ref = None
    else:
        loc, w = torch.randn(2, 7, 2, 2, 4, 2, device=DEVICE), torch.randn(2, 7, 2, 2, 4, device=DEVICE)
        ref = torch.rand(2, 7, 2, 2, device=DEVICE)

    def fn(value, shapes, starts, loc, w, ref, backend):
        return ms_deform_attn(value, shapes, starts, loc, w, backend=backend, reference_points=ref)

    assert_grads_match(f"ms_deform_attn {form}", fn, (value, shapes, starts, loc, w, ref), backend)


# -- whole models: patched with a kernel backend pinned, with grad, as the original -------------


def model_grads(model, run):
    """run()'s output and the gradients of a random projection of it w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # training draws at random (transformers' RoPE augmentation): the same draws
    out = run()
    gen = torch.Generator(device=out.device).manual_seed(1)
    (out.float() * torch.randn(out.shape, generator=gen, device=out.device)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hf_vit_model():
    from test_patch import hf_vit

    model = hf_vit()
    pixels = torch.randn(2, 3, 64, 64)
    return model, lambda: model(pixel_values=pixels).last_hidden_state


def official_vit_model():
    from test_patch import official_vit

    model = official_vit(embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4)
    pixels = torch.randn(2, 3, 64, 64)
    return model, lambda: model.forward_features(pixels)["x_norm_patchtokens"]


def official_mask2former_decoder():
    from test_patch_masked_attention import official_decoder

    model, run = official_decoder()
    return model, run


def official_deformable_decoder():
    from test_patch_deformable import official_decoder

    return official_decoder()


def hf_mask2former_model():
    from test_patch_masked_attention import hf_mask2former

    return hf_mask2former()


MODELS = {"hf-vit": (hf_vit_model, ("add_layer_norm", "rope_attention")),
          "hf-mask2former": (hf_mask2former_model, ("masked_attention", "ms_deform_attn")),
          "official-vit": (official_vit_model, ("add_layer_norm", "rope_attention")),
          "official-m2f-decoder": (official_mask2former_decoder, ("masked_attention",)),
          "official-pixel-decoder": (official_deformable_decoder, ("ms_deform_attn",))}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", MODELS)
def test_pinned_patched_model_runs_with_grad_and_gives_the_originals_gradients(name, backend, mode):
    make, ops = MODELS[name]
    model, run = make()
    model.to(DEVICE).train(mode == "train")
    ref_out, ref_grads = model_grads(model, run)
    patch_trusted(model, backend=backend)
    with op_runs(*ops) as calls:  # grad enabled, the parameters require grad, no torch.no_grad()
        out, grads = model_grads(model, run)
    assert all(calls[op].call_count > 0 for op in ops), {op: calls[op].call_count for op in ops}
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-4, rtol=1e-3, msg=f"{name} {backend}: {n}.grad")
