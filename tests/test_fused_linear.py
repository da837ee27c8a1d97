"""fused_linear: the Triton kernel and the C++ form against the float64 math, with the tolerance
rule of helpers."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, DEVICE, DTYPES, assert_close_to_ref, quick_cases, requires_ext

from fastdino.ops.fused_linear import OP, fused_linear, fused_linear_ref, reasons
from fastdino.ops.rope_attention import rope_attention_ref, rope_ref

# (M, K, N): DINOv3 MLPs (ViT-S fc1 384 -> 1536, ViT-L fc2 4096 -> 1024, S+ SwiGLU 384 -> 1024 hidden)
# at a few tokens, and odd sizes that exercise every mask.
SHAPES_FULL = [(2 * 1029, 384, 1536), (1029, 4096, 1024), (197, 384, 1024), (97, 48, 33), (1, 16, 1), (130,
                                                                                                       96,
                                                                                                       200)]
SHAPES_INTERP = [(37, 64, 97), (5, 48, 33), (1, 16, 1), (130, 96, 64)]
# `pytest -m quick`: odd M, K and N, every mask of the tiles
TRITON_SHAPES = (quick_cases(SHAPES_FULL, (97, 48, 33)) if DEVICE.type == "cuda"
                 else quick_cases(SHAPES_INTERP, (5, 48, 33)))
VARIANTS = {  # name: (act, residual + gamma)
    "gelu": ("gelu", False), "swiglu": ("swiglu", False), "linear": (None, False), "residual": (None, True),
}


def make_inputs(M, K, N, act, residual, dtype, device=DEVICE):
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device, dtype=dtype)
    w2 = (torch.randn(N, K, device=device) / K**0.5).to(dtype) if act == "swiglu" else None
    b2 = torch.randn(N, device=device, dtype=dtype) if act == "swiglu" else None
    r = torch.randn(M, N, device=device, dtype=dtype) if residual else None
    g = torch.rand(N, device=device, dtype=dtype) if residual else None
    return x, w, b, act, w2, b2, r, g


def unfused(x, w, b, act, w2, b2, r, g):
    """What the model computes today, op by op in the dtype under test."""
    y = F.linear(x, w, b)
    y = F.gelu(y) if act == "gelu" else F.silu(y) * F.linear(x, w2, b2) if act == "swiglu" else y
    return y if r is None else r + y * g


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_fused_linear_triton_matches_ref(shape, variant, dtype):
    args = make_inputs(*shape, *VARIANTS[variant], dtype)
    out = fused_linear(*args, backend="triton")
    assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
    exact = fused_linear_ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    # atol scales with sqrt(K): a K-term dot rounds its inputs once each
    assert_close_to_ref(f"triton {variant} {shape}", out, exact, unfused(*args),
                        ATOL[dtype] * shape[1] ** 0.5)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", quick_cases(SHAPES_FULL, (97, 48, 33)), ids=str)
def test_fused_linear_cpp_matches_ref(shape, variant, dtype):
    args = make_inputs(*shape, *VARIANTS[variant], dtype)
    out = fused_linear(*args, backend=DEVICE.type)
    assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
    exact = fused_linear_ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert_close_to_ref(f"{DEVICE.type} {variant} {shape}", out, exact, unfused(*args),
                        ATOL[dtype] * shape[1] ** 0.5)


@requires_ext
def test_fused_linear_cpp_unaligned_residual_and_leading_dims():
    # A residual that starts one element into its storage cannot take 16-byte packs.
    x, w, b, _, _, _, r, g = make_inputs(10, 32, 24, None, True, torch.float16)
    r = torch.randn(10 * 24 + 1, device=DEVICE, dtype=torch.float16)[1:].view(2, 5, 24)
    out = fused_linear(x.view(2, 5, 32), w, b, "gelu", residual=r, gamma=g, backend=DEVICE.type)
    expect = fused_linear_ref(x.view(2, 5, 32), w, b, "gelu", residual=r, gamma=g)
    torch.testing.assert_close(out, expect, atol=4e-3, rtol=4e-3)


@requires_ext
def test_fused_linear_cpp_names_bad_arguments():
    x, w, b, act, *_ = make_inputs(4, 32, 16, "gelu", False, torch.float32)
    with pytest.raises(RuntimeError, match="bias has dtype Half but x has dtype Float"):
        torch.ops.fastdino.fused_linear(x, w, b.half(), act, None, None, None, None)
    with pytest.raises(RuntimeError, match="act must be None, 'gelu' or 'swiglu', got 'relu'"):
        torch.ops.fastdino.fused_linear(x, w, b, "relu", None, None, None, None)
    with pytest.raises(RuntimeError, match=r"residual must have x's leading dims and 16 columns"):
        torch.ops.fastdino.fused_linear(x, w, b, act, None, None, torch.ones(4, 15), None)


def test_fused_linear_keeps_leading_dims_and_reads_the_live_weights():
    x, w, b, act, *_ = make_inputs(6, 32, 48, "gelu", False, torch.float32)
    out = fused_linear(x.view(2, 3, 32), w, b, act, backend="triton")
    assert out.shape == (2, 3, 48)
    w.mul_(2.0)  # what load_state_dict does in place: no cached copy may survive it
    torch.testing.assert_close(fused_linear(x, w, b, act, backend="triton"), F.gelu(F.linear(x, w, b)),
                               atol=1e-4, rtol=1e-4)


def test_tolerance_rule_rejects_tanh_gelu():
    # The tanh approximation differs from erf GELU by up to ~1e-3: the rule must notice.
    x, w, b, act, *_ = make_inputs(64, 64, 64, "gelu", False, torch.float32)
    x = x * 3
    exact = fused_linear_ref(x.double(), w.double(), b.double(), "gelu")
    approx = F.gelu(F.linear(x, w, b), approximate="tanh")
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close_to_ref("tanh", approx, exact, F.gelu(F.linear(x, w, b)), ATOL[torch.float32] * 8)


@pytest.mark.quick
def test_dispatch_runs_the_reference_until_measured():
    args = make_inputs(4, 16, 8, "gelu", False, torch.float32, "cpu")
    assert OP.pick(*args)[0] == "ref"
    assert reasons("cuda", *args)[0] == "device=cpu (needs cuda)"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(act="relu"), "act must be one of"),
        (dict(act="swiglu"), "weight2 is required by act='swiglu'"),
        (dict(gamma=torch.ones(8)), "residual is missing"),
        (dict(bias=torch.ones(7)), r"bias must have shape \(8,\)"),
        (dict(residual=torch.ones(4, 7), gamma=torch.ones(8)), r"residual must have shape \(4, 8\)"),
    ],
    ids=["act", "swiglu-w2", "gamma", "bias", "residual"],
)
def test_bad_arguments_are_named(kwargs, match):
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match=match):
        fused_linear(x, w, **kwargs)


@pytest.mark.quick
def test_triton_op_rejects_bad_layouts_by_name():
    x, w, b, act, *_ = make_inputs(4, 32, 16, "gelu", False, torch.float32)
    with pytest.raises(ValueError, match="weight is not contiguous"):
        fused_linear(x, w.t().contiguous().t(), b, act, backend="triton")
    with pytest.raises(ValueError, match="bias has dtype torch.float16"):
        fused_linear(x, w, b.half(), act, backend="triton")


def test_fused_linear_opcheck_triton():
    from fastdino.ops.fused_linear import fused_linear_triton

    args = make_inputs(5, 32, 16, "swiglu", True, torch.float32)
    torch.library.opcheck(fused_linear_triton, args)


@requires_ext
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_linear_opcheck_cpp(variant):
    args = make_inputs(5, 32, 16, *VARIANTS[variant], torch.float32)
    torch.library.opcheck(torch.ops.fastdino.fused_linear.default, args)


# -- the RoPE epilogue: attention's q/k projection with DINOv3's RoPE ----------------------------------

# (B, N tokens, K, heads, D, HW rotated tokens, rotated heads of q/k/v): dinov3's fused qkv (q and k of
# three parts), transformers' q_proj (every column), 1 and 5 prefix tokens (cls, registers), none.
ROPE_SHAPES = [(2, 37, 48, 3, 64, 36, 6), (1, 21, 32, 2, 16, 16, 2), (1, 9, 40, 1, 128, 4, 1),
               (3, 5, 24, 2, 32, 5, 4)]


def rope_inputs(B, N, K, H, D, HW, dtype, table_dtype=torch.float32):
    x = torch.randn(B, N, K, device=DEVICE, dtype=dtype)
    w = (torch.randn(3 * H * D, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(3 * H * D, device=DEVICE, dtype=dtype)
    angle = torch.rand(HW, D // 2, device=DEVICE) * 6.3
    cos, sin = (torch.cat((t, t), -1).to(table_dtype) for t in (angle.cos(), angle.sin()))
    return x, w, b, cos, sin


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
def test_fused_linear_triton_rope_matches_ref(shape, dtype):
    B, N, K, H, D, HW, heads = shape
    x, w, b, cos, sin = rope_inputs(B, N, K, H, D, HW, dtype)
    out = fused_linear(x, w, b, cos=cos, sin=sin, rope_cols=heads * D, backend="triton")
    exact = fused_linear_ref(x.double(), w.double(), b.double(), cos=cos.double(), sin=sin.double(),
                             rope_cols=heads * D)
    y = F.linear(x, w, b)  # the model: the projection in its dtype, then rope on q and k
    unfused = torch.cat((rope_ref(y[..., :heads * D].view(B, N, heads, D), cos, sin).view(B, N, -1),
                         y[..., heads * D:]), -1)
    assert_close_to_ref(f"triton rope {shape} {dtype}", out, exact, unfused, ATOL[dtype] * K**0.5)


def test_fused_linear_rope_then_sdpa_is_rope_attention():
    """What the epilogue is for: q and k leave the projection rotated, and plain SDPA on them is
    rope_attention on the unrotated projections (tables in the activation dtype, as transformers')."""
    B, N, K, H, D, HW = 2, 21, 32, 2, 64, 16
    x, w, b, cos, sin = rope_inputs(B, N, K, H, D, HW, torch.float32, torch.float32)
    qkv = fused_linear(x, w, b, cos=cos, sin=sin, rope_cols=2 * H * D, backend="triton")
    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    q0, k0, v0 = F.linear(x, w, b).view(B, N, 3, H, D).unbind(2)
    torch.testing.assert_close(out, rope_attention_ref(q0, k0, v0, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sin=None), "cos and sin must be given together"),
        (dict(act="gelu"), "act and residual must be None"),
        (dict(rope_cols=96), "rope_cols must be whole heads of D=64"),
        (dict(rope_cols=3 * 128 + 64), "rope_cols must be whole heads"),
        (dict(cos=torch.ones(40, 64)), r"cos must be \(HW, D\) with HW <= N=37"),
        (dict(cos=torch.ones(36, 63), sin=torch.ones(36, 63)), "D even"),
        (dict(x2d=True), r"x must be \(B, N, K\) tokens"),
    ],
    ids=["sin", "act", "partial-head", "past-N", "HW", "odd-D", "x-2d"],
)
def test_fused_linear_rope_bad_arguments_are_named(kwargs, match):
    x, w, b, cos, sin = rope_inputs(2, 37, 48, 2, 64, 36, torch.float32)
    args = dict(cos=cos, sin=sin, rope_cols=128)
    if kwargs.pop("x2d", False):
        x = x[0]
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear(x, w, b, **args)


def test_fused_linear_rope_runs_on_triton_only():
    x, w, b, cos, sin = rope_inputs(1, 9, 32, 1, 48, 8, torch.float32)
    args = (x, w, b, None, None, None, None, None, cos, sin, 48)
    assert reasons("cpu", *args)[-1] == "the RoPE epilogue is in the Triton kernel only"
    assert "cos has head dim 48" in " ".join(reasons("triton", *args))
    assert OP.pick(*args)[0] == "ref"
    with pytest.raises(ValueError, match="the RoPE epilogue is in the Triton kernel only"):
        fused_linear(x, w, b, cos=cos, sin=sin, backend="cpu")


def test_fused_linear_opcheck_triton_rope():
    from fastdino.ops.fused_linear import fused_linear_triton

    x, w, b, cos, sin = rope_inputs(2, 9, 32, 1, 16, 8, torch.float32)
    torch.library.opcheck(fused_linear_triton, (x, w, b, None, None, None, None, None, cos, sin, 32))


def test_self_check_covers_the_rope_epilogue(monkeypatch):
    """The first-use self-check runs each problem the backend takes: a Triton GEMM whose RoPE epilogue
    were wrong is disabled though its GELU is right; the C++ form is checked on GELU alone."""
    import importlib

    from fastdino import selfcheck

    module = importlib.import_module("fastdino.ops.fused_linear")

    real = module._fused_linear_triton

    def unrotated(*args):
        out = real(*args[:8])
        return out if args[8] is None else out * 1.01

    monkeypatch.setattr(module, "_fused_linear_triton", unrotated)
    error, _, _ = selfcheck._check(OP, "triton", torch.device(DEVICE), torch.float32)
    assert error is not None and "relative error" in error
    monkeypatch.setattr(module, "_fused_linear_triton", real)
    assert selfcheck._check(OP, "triton", torch.device(DEVICE), torch.float32)[0] is None


def test_fused_linear_triton_rope_reads_strided_tables():
    """Tables whose rows are apart (timm's sin and cos, the halves of one (HW, 2 D) tensor) are read in
    place: only the head dim must be contiguous."""
    x, w, b, cos, sin = rope_inputs(2, 21, 32, 2, 16, 16, torch.float32)
    both = torch.cat((sin, cos), -1)
    sin_view, cos_view = both.chunk(2, dim=-1)
    assert not cos_view.is_contiguous()
    out = fused_linear(x, w, b, cos=cos_view, sin=sin_view, rope_cols=64, backend="triton")
    torch.testing.assert_close(out, fused_linear(x, w, b, cos=cos, sin=sin, rope_cols=64, backend="triton"),
                               atol=0, rtol=0)
    ref = fused_linear_ref(x, w, b, cos=cos, sin=sin, rope_cols=64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    why = reasons("triton", x, w, b, None, None, None, None, None, cos.t().contiguous().t(), sin, 64)
    assert "cos has stride 16 along the head dim (needs 1)" in why
