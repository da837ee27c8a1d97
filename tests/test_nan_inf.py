"""NaN and Inf: every backend of an op gives them at the output positions where the module it
replaces does: nn.MultiheadAttention's math with the decoders' mask, EoMT's additive mask,
grid_sample, the MLP's GELU and SiLU, LayerNorm. Non-finite values go where the original puts
them; finite ones must still be close."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE

from fastdino import _ext
from fastdino.ops import (
    add_layer_norm,
    dwconv_layer_norm,
    fused_linear,
    masked_attention,
    ms_deform_attn,
    rope_attention,
)
from fastdino.ops.masked_attention import blocked_keys

BACKENDS = ["ref", "triton"] + ([DEVICE.type] if _ext.BUILD[DEVICE.type] else [])
NAN, INF = float("nan"), float("inf")


def assert_same_non_finite(name, out, expected, tol=1e-4):
    out, expected = out.double(), expected.double()
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(out), test(expected)
        assert torch.equal(got, want), (f"{name}: {what} at {got.nonzero()[:6].tolist()}..., the original "
                                        f"has it at {want.nonzero()[:6].tolist()}... ({int(got.sum())} vs "
                                        f"{int(want.sum())} elements)")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], atol=tol, rtol=tol, msg=name)


def mha_core(q, k, v, mask_logits):
    """nn.MultiheadAttention's math path on (B, L, H, D) heads: the decoders' boolean mask as an
    additive -inf float mask (what MHA turns a bool mask into), baddbmm, softmax, bmm."""
    B, Lq, H, D = q.shape
    qh, kh, vh = (t.transpose(1, 2).flatten(0, 1) for t in (q, k, v))  # (B * H, L, D)
    blocked = blocked_keys(mask_logits).repeat_interleave(H, dim=0)
    bias = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device).masked_fill(blocked, -INF)
    weights = torch.baddbmm(bias, qh / math.sqrt(D), kh.transpose(-2, -1)).softmax(-1)
    return torch.bmm(weights, vh).view(B, H, Lq, D).transpose(1, 2)


# (tensor, token, channel, value): a blocked key of query 1 holds NaN or Inf, in k or in v; a NaN
# query; a NaN mask logit (sigmoid(NaN) < 0.5 is False: the key is open).
MASKED_CASES = {
    "nan-in-blocked-key": ("k", 3, 0, NAN), "inf-in-blocked-key": ("k", 3, 0, INF),
    "nan-in-blocked-value": ("v", 3, 5, NAN), "inf-in-blocked-value": ("v", 3, 5, INF),
    "-inf-in-open-key": ("k", 0, 2, -INF), "nan-query": ("q", 1, 0, NAN), "nan-logit": ("m", 3, 0, NAN),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MASKED_CASES)
def test_masked_attention_non_finite_as_multihead_attention(case, backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, device=DEVICE) for n in (5, 37, 37))
    logits = torch.randn(2, 5, 37, device=DEVICE)
    logits[:, 1, 3], logits[:, 1, 0] = -5.0, 5.0  # key 3 blocked and key 0 open for query 1
    logits[:, 4] = -3.0  # every key blocked: query 4 attends to all
    name, token, channel, value = MASKED_CASES[case]
    target = {"q": q, "k": k, "v": v, "m": logits}[name]
    if name == "m":
        target[0, 1, token] = value
    else:
        target[0, token, 1, channel] = value
    out = masked_attention(q, k, v, logits, backend=backend)
    assert_same_non_finite(f"{backend} {case}", out, mha_core(q, k, v, logits))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_eomt_masked_rope_attention_non_finite_as_the_additive_mask(value, backend):
    torch.manual_seed(0)
    B, N, H, D, M, K = 1, 21, 2, 16, 3, 16  # 5 prefix tokens (3 queries), 16 patches
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE) for _ in range(3))
    logits = torch.randn(B, M, K, device=DEVICE)
    logits[0, :, 4] = -1.0  # patch 4 (token 9) blocked for every query
    k[0, 9, 1, 3] = value
    out = rope_attention(q, k, v, backend=backend, mask_logits=logits)
    # EoMT's own construction: a (B, heads, N, N) finfo.min additive mask, eager softmax
    attend = torch.ones(B, N, N, dtype=torch.bool, device=DEVICE)
    attend[:, :M, N - K:] = logits > 0
    bias = torch.zeros(B, 1, N, N, device=DEVICE).masked_fill(~attend[:, None],
                                                              torch.finfo(torch.float32).min)
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(D) + bias
    expected = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
    assert torch.isnan(expected).any()
    assert_same_non_finite(f"{backend} eomt", out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_attention_nan_query_row(backend):
    # Every score of query 2 is NaN. Eager attention (and the Triton kernel) give NaN for that row;
    # torch's CPU SDPA, which the C++ form and the reference call as the models do, gives 0.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 1, 16, device=DEVICE) for _ in range(3))
    q[0, 2, 0, 3] = NAN
    row = rope_attention(q, k, v, backend=backend)[0, :, 0]
    sdpa_zero = DEVICE.type == "cpu" and backend != "triton"
    assert row[2].isnan().all().item() != sdpa_zero and (row[2] == 0).all().item() == sdpa_zero
    assert torch.isfinite(row[[0, 1, 3, 4]]).all()


def grid_sample_core(value, shapes, loc, weights):
    """The models' deformable-attention core on the CPU: one grid_sample per level, no extra rule."""
    B, S, Hh, Dh = value.shape
    _, Lq, _, L, P, _ = loc.shape
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * Hh, Dh, h, w)
        start += h * w
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    out = (stacked * weights.transpose(1, 2).reshape(B * Hh, 1, Lq, L * P)).sum(-1)
    return out.view(B, Hh * Dh, Lq).transpose(1, 2)


# What a diverged offset projection or a broken map gives: (what, value).
DEFORM_CASES = {
    "nan-location": ("loc", NAN), "+inf-location": ("loc", INF), "-inf-location": ("loc", -INF),
    "nan-weight-off-the-map": ("weight", NAN), "inf-value-at-a-zero-weight-corner": ("value", INF),
    "nan-value": ("value", NAN),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DEFORM_CASES)
def test_ms_deform_attn_non_finite_as_grid_sample(case, backend):
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(2, 26, 2, 4)
    loc = torch.rand(2, 3, 2, 2, 2, 2)
    weights = torch.rand(2, 3, 2, 2, 2)
    what, bad = DEFORM_CASES[case]
    if what == "loc":
        loc[0, 1, 0, 1, 0, 0] = bad
    elif what == "weight":  # a sample wholly off the map: grid_sample's zeros times NaN
        loc[0, 1, 0, 1, 0] = torch.tensor([3.0, 3.0])
        weights[0, 1, 0, 1, 0] = bad
    else:
        # (x, y) = (2.5 / 5, 1.5 / 4): exactly on pixel (2, 1) of level 0, whose right and lower
        # neighbours get bilinear weight 0; the Inf or NaN sits in the right neighbour (row 1 * 5 + 3)
        loc[0, 1, 0, 0, 0] = torch.tensor([2.5 / 5, 1.5 / 4])
        value[0, 1 * 5 + 3, 0, 2] = bad
    expected = grid_sample_core(value, shapes, loc, weights)  # on the CPU: the rule the ops follow
    assert not torch.isfinite(expected).all()
    levels = torch.tensor(shapes, device=DEVICE), torch.tensor([0, 20], device=DEVICE)
    out = ms_deform_attn(value.to(DEVICE), *levels, loc.to(DEVICE), weights.to(DEVICE), backend=backend)
    assert_same_non_finite(f"{backend} {case}", out.cpu(), expected)


@pytest.mark.quick
def test_gelu_at_infinity_is_pinned_on_every_backend():
    # nn.GELU's formula 0.5 * y * (1 + erf(y / sqrt(2))), as torch runs it on CUDA: +Inf at +Inf.
    # torch's vectorised CPU GELU gives NaN there; fastdino deliberately gives +Inf on every device.
    x = torch.tensor([INF, -INF, NAN, 1.0, -2.0, 3.0e38], device=DEVICE).view(-1, 1)
    one = torch.ones(1, 1, device=DEVICE)
    expected = torch.tensor([INF, NAN, NAN, 0.8413447, -0.0455003, 3.0e38]).view(-1, 1)
    for backend in BACKENDS:
        assert_same_non_finite(f"{backend} gelu", fused_linear(x, one, None, "gelu", backend=backend).cpu(),
                               expected)
        # SwiGLU: silu(+Inf) * +Inf = +Inf; silu(-Inf) = -Inf * 0 = NaN, as F.silu
        swiglu = fused_linear(x, one, None, "swiglu", one, backend=backend).cpu()
        assert_same_non_finite(f"{backend} swiglu", swiglu, F.silu(x.cpu()) * x.cpu())


@pytest.mark.quick
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_layer_norm_non_finite_rows_as_layer_norm(backend):
    torch.manual_seed(0)
    x, branch = torch.randn(2, 5, 48, device=DEVICE), torch.randn(2, 5, 48, device=DEVICE)
    gamma, weight, bias = (torch.randn(48, device=DEVICE) for _ in range(3))
    x[0, 1, 3], branch[1, 2, 7], x[1, 4, 0] = NAN, INF, -INF
    y, z = add_layer_norm(x, branch, gamma, weight, bias, 1e-6, backend=backend)
    y_ref = x + gamma * branch
    assert_same_non_finite(f"{backend} residual", y.cpu(), y_ref.cpu())
    assert_same_non_finite(f"{backend} norm", z.cpu(), F.layer_norm(y_ref, (48,), weight, bias, 1e-6).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_layer_norm_non_finite_windows_as_conv_and_layer_norm(backend):
    # A NaN or Inf input reaches every pixel whose 7x7 window holds it (Inf times a weight of 0 is
    # NaN), then the LayerNorm of that pixel is NaN in every channel.
    torch.manual_seed(0)
    x = torch.randn(2, 24, 13, 11, device=DEVICE)
    weight = torch.randn(24, 1, 7, 7, device=DEVICE)
    bias, nw, nb = (torch.randn(24, device=DEVICE) for _ in range(3))
    weight[5, 0, 3, 3] = 0.0
    x[0, 3, 1, 2], x[1, 5, 12, 10], x[1, 9, 6, 0] = NAN, INF, -INF
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.to(memory_format=layout)
        z = dwconv_layer_norm(xl, weight, bias, nw, nb, 1e-6, backend=backend)
        y = F.conv2d(x, weight, bias, padding=3, groups=24).permute(0, 2, 3, 1)
        want = F.layer_norm(y, (24,), nw, nb, 1e-6)
        assert_same_non_finite(f"{backend} {layout}", z.cpu(), want.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_layer_norm_non_finite_weight_reaches_the_border(backend):
    # The zero padding is multiplied like any input: a NaN weight tap makes its channel NaN at every
    # pixel, at the border too, in either layout (PyTorch's channels-last CPU conv skips padded taps).
    torch.manual_seed(0)
    x = torch.randn(1, 8, 3, 5, device=DEVICE)
    weight = torch.randn(8, 1, 7, 7, device=DEVICE)
    nw, nb = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    weight[2, 0, 0, 0] = NAN
    for layout in (torch.contiguous_format, torch.channels_last):
        z = dwconv_layer_norm(x.to(memory_format=layout), weight, None, nw, nb, 1e-6, backend=backend)
        assert torch.isnan(z).all(), f"{backend} {layout}"
