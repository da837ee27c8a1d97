"""rope_attention: every backend against the float64 math, with the tolerance rule of helpers."""

import math

import pytest
import torch
from helpers import ATOL, DEVICE, DTYPES, assert_close_to_ref, requires_cuda, requires_cuda_ext, requires_ext

from fastdino import _ext
from fastdino.kernels.rope_attention import FP32_MAX_HEAD_DIM
from fastdino.ops.rope_attention import (
    backend_reasons,
    rope_attention,
    rope_attention_ref,
    rope_attention_triton,
    rope_ref,
    select_backend,
)

# (B, N, H, D, prefix). Real DINOv3 problems (ViT-S/L/7B at 224^2/512^2/1024^2: N = 5 + HW) and odd
# ones: N not a multiple of any block, one token, no prefix, a long prefix (prepended queries).
SHAPES_FULL = [(2, 1029, 6, 64, 5), (1, 4101, 16, 64, 5), (64, 197, 6, 64, 5), (1, 1605, 4, 128, 5),
               (3, 97, 5, 48, 5), (2, 133, 3, 80, 105), (1, 1, 1, 16, 0), (1, 261, 2, 112, 0)]
# Under the Triton interpreter every program runs serially on the CPU: fewer tokens.
SHAPES_INTERP = [(2, 37, 3, 64, 5), (1, 70, 2, 128, 5), (2, 21, 2, 48, 5), (1, 29, 1, 16, 0), (1, 1, 1, 32, 0),
                 (1, 45, 2, 80, 13)]


def rope_tables(hw, D, dtype=torch.float32, device=DEVICE):
    """(cos, sin) with DINOv3's layout: per-pair angles repeated for the two halves."""
    angles = torch.rand(hw, D // 2, device=device, dtype=torch.float64) * 2 * math.pi
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def make_inputs(B, N, H, D, prefix, dtype, device=DEVICE, fused_qkv=True, table_dtype=torch.float32):
    """q, k, v as the projections produce them: views of one (B, N, 3, H, D) qkv, or separate tensors."""
    if fused_qkv:
        q, k, v = torch.randn(B, N, 3, H, D, device=device, dtype=dtype).unbind(2)
    else:
        q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype) for _ in range(3))
    cos, sin = rope_tables(N - prefix, D, table_dtype, device)
    return q, k, v, cos, sin


def check_backend(backend, shape, dtype, device=DEVICE, rope=True, **kw):
    q, k, v, cos, sin = make_inputs(*shape, dtype, device, **kw)
    if not rope:
        cos = sin = None
    out = rope_attention(q, k, v, cos, sin, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    d = [t.double() if t is not None else None for t in (q, k, v, cos, sin)]
    exact = rope_attention_ref(*d)
    lowp = rope_attention_ref(q, k, v, cos, sin)
    assert_close_to_ref(f"{backend} {shape}", out, exact, lowp, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES_FULL if DEVICE.type == "cuda" else SHAPES_INTERP, ids=str)
def test_rope_attention_triton_matches_ref(shape, dtype):
    if dtype == torch.float32 and shape[3] > FP32_MAX_HEAD_DIM:
        with pytest.raises(ValueError, match=f"head dim {shape[3]} > {FP32_MAX_HEAD_DIM} .would spill registers"):
            check_backend("triton", shape, dtype)
        return
    check_backend("triton", shape, dtype)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES_INTERP + [(2, 261, 6, 64, 5)], ids=str)
def test_rope_attention_cpu_matches_ref(shape, dtype):
    check_backend("cpu", shape, dtype, "cpu")


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES_FULL, ids=str)
def test_rope_attention_cuda_matches_ref(shape, dtype):
    check_backend("cuda", shape, dtype, "cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda" if DEVICE.type == "cuda" else "cpu"])
@pytest.mark.parametrize("variant", ["separate-qkv", "bf16-tables", "no-rope"])
def test_rope_attention_layouts_and_tables(backend, variant):
    if backend in ("cpu", "cuda") and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    kw = {"separate-qkv": dict(fused_qkv=False), "bf16-tables": dict(table_dtype=torch.bfloat16),
          "no-rope": dict(rope=False)}[variant]
    check_backend(backend, (2, 45, 3, 64, 5), torch.float16, DEVICE, **kw)


def test_rope_ref_follows_the_official_rotation():
    # dinov3 apply_rope: prefix untouched, x * cos + rotate_half(x) * sin in fp32, rounded once.
    q, _, _, cos, sin = make_inputs(1, 9, 2, 16, 4, torch.bfloat16, "cpu")
    out = rope_ref(q, cos, sin)
    torch.testing.assert_close(out[:, :4], q[:, :4], atol=0, rtol=0)
    t = q[:, 4:].float()
    half = torch.cat((-t[..., 8:], t[..., :8]), -1)
    torch.testing.assert_close(out[:, 4:], (t * cos[:, None] + half * sin[:, None]).bfloat16(), atol=0, rtol=0)


def test_tolerance_rule_rejects_a_wrong_rotation():
    # A kernel that forgot the prefix (rotating the cls token too) must fail the rule.
    q, k, v, cos, sin = make_inputs(1, 21, 2, 32, 5, torch.float16, "cpu")
    bad = rope_attention_ref(q, k, v, torch.cat((cos[:1], cos)), torch.cat((sin[:1], sin)))
    exact = rope_attention_ref(*(t.double() for t in (q, k, v, cos, sin)))
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close_to_ref("bad", bad, exact, rope_attention_ref(q, k, v, cos, sin), ATOL[torch.float16])


# -- dispatch and bad input ------------------------------------------------------------------------


def test_dispatch_reasons():
    cpu = torch.device("cpu")
    assert select_backend(*make_inputs(1, 9, 2, 64, 4, torch.float32, "cpu")) == ("ref", {})
    assert "head dim 24 is not a multiple of 16 in 16..128" in backend_reasons("triton", cpu, torch.float16, 24)
    assert "float32 with head dim 128 > 64 (would spill registers)" in backend_reasons("triton", cpu, torch.float32, 128)
    assert backend_reasons("ref", cpu, torch.float64, 24) == []


@requires_cuda
def test_dispatch_on_cuda_prefers_the_extension_and_falls_back_with_reasons():
    q, k, v, cos, sin = make_inputs(1, 9, 2, 64, 4, torch.bfloat16, "cuda")
    assert select_backend(q, k, v, cos, sin)[0] == ("cuda" if _ext.BUILD["cuda"] else "triton")
    q2, k2, v2, cos2, sin2 = make_inputs(1, 9, 2, 24, 4, torch.bfloat16, "cuda")
    backend, skipped = select_backend(q2, k2, v2, cos2, sin2)
    assert backend == ("cuda" if _ext.BUILD["cuda"] else "ref")
    if backend == "ref":
        assert "head dim 24" in skipped["triton"][0]
    check_backend(None, (1, 9, 2, 24, 4), torch.bfloat16, "cuda")  # head dim 24: rotation pass + ATen attention


def test_grad_inputs_fall_back_to_ref():
    q, k, v, cos, sin = make_inputs(1, 9, 2, 32, 4, torch.float32, DEVICE)
    q.requires_grad_()
    out = rope_attention(q, k, v, cos, sin)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :-1]), r"k has shape \(1, 8, 2, 32\) but q has \(1, 9, 2, 32\)"),
        (lambda a: a.__setitem__(0, a[0][..., 0]), r"q must be \(B, N, H, D\)"),
        (lambda a: a.__setitem__(3, torch.cat((a[3], a[3]))), r"cos must be \(HW, 32\) with HW <= N=9"),
        (lambda a: a.__setitem__(4, None), "cos and sin must be given together"),
    ],
    ids=["k-shape", "q-dims", "cos-rows", "sin-missing"],
)
def test_bad_arguments_are_named(mutate, match):
    args = list(make_inputs(1, 9, 2, 32, 4, torch.float32, "cpu"))
    mutate(args)
    with pytest.raises(ValueError, match=match):
        rope_attention(*args)


@requires_ext
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1].half()), "k has dtype Half but q has dtype Float"),
        (lambda a: a.__setitem__(2, a[2].transpose(1, 3).contiguous().transpose(1, 3)), "v must have stride 1"),
        (lambda a: a.__setitem__(3, a[3][:, :16]), r"cos must be \(HW, 32\) with HW <= N=9, got \(5, 16\)"),
        (lambda a: a.__setitem__(0, a[0].double()), "q must be float32, float16 or bfloat16"),
        (lambda a: a.__setitem__(4, a[4].half()), "cos has dtype Float but sin has dtype Half"),
    ],
    ids=["dtype", "stride", "cos-shape", "float64", "table-dtypes"],
)
def test_cpp_op_rejects_bad_arguments_by_name(mutate, match):
    args = list(make_inputs(1, 9, 2, 32, 4, torch.float32, "cpu"))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdino.rope_attention(*args, 0.125)


def test_triton_op_rejects_bad_arguments_by_name():
    q, k, v, cos, sin = make_inputs(1, 9, 2, 32, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="k has dtype torch.float16 != q.dtype"):
        rope_attention_triton(q, k.half(), v, cos, sin, 0.125)
    q2, k2, v2, cos2, sin2 = make_inputs(1, 9, 2, 24, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="head dim 24"):
        rope_attention_triton(q2, k2, v2, cos2, sin2, 0.125)


# -- torch.library: opcheck and torch.compile ------------------------------------------------------


@requires_ext
def test_rope_attention_opcheck_cpp():
    args = make_inputs(2, 11, 2, 32, 4, torch.float32, DEVICE)
    torch.library.opcheck(torch.ops.fastdino.rope_attention.default, (*args, 0.2))


def test_rope_attention_opcheck_triton():
    args = make_inputs(2, 11, 2, 32, 4, torch.float32, DEVICE)
    torch.library.opcheck(rope_attention_triton, (*args, 0.2))


@pytest.mark.parametrize("backend", ["cuda" if DEVICE.type == "cuda" else "cpu", "triton", None])
def test_rope_attention_compile_fullgraph(backend):
    if backend in ("cpu", "cuda") and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    q, k, v, cos, sin = make_inputs(1, 21, 2, 32, 5, torch.float32, DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: rope_attention(*a, backend=backend), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, cos, sin), rope_attention_ref(q, k, v, cos, sin), atol=2e-5, rtol=2e-5)
