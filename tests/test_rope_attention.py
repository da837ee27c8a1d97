"""rope_attention: every backend against the float64 math, with the tolerance rule of helpers."""

import math

import pytest
import torch
from helpers import (
    ATOL,
    DEVICE,
    DTYPES,
    assert_close_to_ref,
    quick_cases,
    requires_cuda,
    requires_cuda_ext,
    requires_ext,
)

from fastdino import _ext
from fastdino.kernels.rope_attention import FP32_MAX_HEAD_DIM
from fastdino.ops._dispatch import Like
from fastdino.ops.rope_attention import (
    OP,
    reasons,
    rope_attention,
    rope_attention_ref,
    rope_attention_triton,
    rope_ref,
)

# (B, N, H, D, prefix). Real DINOv3 problems (ViT-S/L/7B at 224^2/512^2/1024^2: N = 5 + HW) and odd
# ones: N not a multiple of any block, one token, no prefix, a long prefix (prepended queries).
SHAPES_FULL = [(2, 1029, 6, 64, 5), (1, 4101, 16, 64, 5), (64, 197, 6, 64, 5), (1, 1605, 4, 128, 5),
               (3, 97, 5, 48, 5), (2, 133, 3, 80, 105), (1, 1, 1, 16, 0), (1, 261, 2, 112, 0)]
# Under the Triton interpreter every program runs serially on the CPU: fewer tokens.
SHAPES_INTERP = [(2, 37, 3, 64, 5), (1, 70, 2, 128, 5), (2, 21, 2, 48, 5), (1, 29, 1, 16, 0), (1, 1, 1, 32,
                                                                                               0),
                 (1, 45, 2, 80, 13)]
# `pytest -m quick`: N not a multiple of any block, head dim 48 (not a power of 2)
QUICK, QUICK_FULL = (2, 21, 2, 48, 5), (3, 97, 5, 48, 5)
TRITON_SHAPES = (quick_cases(SHAPES_FULL, QUICK_FULL) if DEVICE.type == "cuda"
                 else quick_cases(SHAPES_INTERP, QUICK))


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
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_rope_attention_triton_matches_ref(shape, dtype):
    if dtype == torch.float32 and shape[3] > FP32_MAX_HEAD_DIM:
        with pytest.raises(ValueError,
                           match=f"head dim {shape[3]} > {FP32_MAX_HEAD_DIM} .would spill registers"):
            check_backend("triton", shape, dtype)
        return
    check_backend("triton", shape, dtype)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", quick_cases(SHAPES_INTERP + [(2, 261, 6, 64, 5)], QUICK), ids=str)
def test_rope_attention_cpu_matches_ref(shape, dtype):
    check_backend("cpu", shape, dtype, "cpu")


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", quick_cases(SHAPES_FULL, QUICK_FULL), ids=str)
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
    torch.testing.assert_close(out[:, 4:], (t * cos[:, None] + half * sin[:, None]).bfloat16(), atol=0,
                               rtol=0)


def test_tolerance_rule_rejects_a_wrong_rotation():
    # A kernel that forgot the prefix (rotating the cls token too) must fail the rule.
    q, k, v, cos, sin = make_inputs(1, 21, 2, 32, 5, torch.float16, "cpu")
    bad = rope_attention_ref(q, k, v, torch.cat((cos[:1], cos)), torch.cat((sin[:1], sin)))
    exact = rope_attention_ref(*(t.double() for t in (q, k, v, cos, sin)))
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close_to_ref("bad", bad, exact, rope_attention_ref(q, k, v, cos, sin), ATOL[torch.float16])


# -- EoMT's query-to-patch mask ---------------------------------------------------------------------

# (B, N, H, D, prefix, M, K): M masked query rows at the front, the mask on the trailing K keys.
# Real EoMT-DINOv3 S/L at 640^2 (100/200 queries + cls + 4 registers + 40 x 40 patches) and odd
# ones: masked rows and mask start inside a block, more masked rows than one block, the mask on
# fewer keys than RoPE turns, one masked row.
EOMT_FULL = [(1, 1705, 6, 64, 105, 100, 1600), (2, 1805, 16, 64, 205, 200, 1600), (3, 197, 4, 32, 7, 2, 190),
             (1, 333, 2, 128, 77, 72, 256), (2, 97, 3, 48, 1, 1, 96)]
EOMT_INTERP = [(2, 37, 3, 64, 13, 8, 24), (1, 150, 2, 32, 15, 10, 135), (1, 160, 1, 16, 75, 70, 85),
               (1, 45, 2, 48, 9, 4, 30), (1, 6, 1, 16, 1, 1, 5)]


def eomt_logits(B, M, K, dtype=torch.float32, device=DEVICE):
    """Mask logits as EoMT's predictions give them: mostly blocked keys, some rows with every patch
    blocked, some with every patch open, and exact zeros (blocked: the rule is logit > 0)."""
    logits = torch.randn(B, M, K, device=device) - 0.7
    logits[:, ::5] -= 10.0
    logits[:, 3::7] += 10.0
    logits.view(-1)[::11] = 0.0
    return logits.to(dtype)


def eomt_dense_ref(q, k, v, cos, sin, logits, scale=None):
    """The models' own construction in float64: a (B, heads, N, N) additive finfo.min mask, open
    except query -> patch entries where the interpolated logit is not > 0, then eager softmax."""
    q, k, v = (t.double() for t in (q, k, v))
    if cos is not None:
        q, k = rope_ref(q, cos.double(), sin.double()), rope_ref(k, cos.double(), sin.double())
    B, N, H, D = q.shape
    M, K = logits.shape[1:]
    attend = torch.ones(B, N, N, dtype=torch.bool, device=q.device)
    attend[:, :M, N - K:] = logits > 0
    bias = torch.zeros(B, 1, N, N, dtype=torch.float64, device=q.device).masked_fill(~attend[:, None],
                                                                                    torch.finfo(torch.float64).min)
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * (D ** -0.5 if scale is None else scale) + bias
    return (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


def check_masked(backend, shape, dtype, device=DEVICE, rope=True, logits_dtype=None):
    B, N, H, D, prefix, M, K = shape
    q, k, v, cos, sin = make_inputs(B, N, H, D, prefix, dtype, device)
    if not rope:
        cos = sin = None
    logits = eomt_logits(B, M, K, logits_dtype or dtype, device)
    out = rope_attention(q, k, v, cos, sin, backend=backend, mask_logits=logits)
    assert out.shape == q.shape and out.dtype == dtype
    exact = eomt_dense_ref(q, k, v, cos, sin, logits)
    lowp = rope_attention_ref(q, k, v, cos, sin, mask_logits=logits)
    assert_close_to_ref(f"{backend} masked {shape}", out, exact, lowp, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", EOMT_FULL if DEVICE.type == "cuda" else EOMT_INTERP, ids=str)
def test_rope_attention_triton_eomt_mask_matches_dense_ref(shape, dtype):
    if dtype == torch.float32 and shape[3] > FP32_MAX_HEAD_DIM:
        pytest.skip("float32 beyond FP32_MAX_HEAD_DIM is rejected (tested above)")
    check_masked("triton", shape, dtype)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", EOMT_INTERP + [(2, 261, 6, 64, 25, 20, 236)], ids=str)
def test_rope_attention_cpu_eomt_mask_matches_dense_ref(shape, dtype):
    check_masked("cpu", shape, dtype, "cpu")


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", EOMT_FULL, ids=str)
def test_rope_attention_cuda_eomt_mask_matches_dense_ref(shape, dtype):
    check_masked("cuda", shape, dtype, "cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda" if DEVICE.type == "cuda" else "cpu", "ref"])
@pytest.mark.parametrize("variant", quick_cases(["no-rope", "fp32-logits"], "fp32-logits"))
def test_rope_attention_eomt_mask_variants(backend, variant):
    # EoMT's DINOv2 form has no RoPE; a caller may keep its logits in fp32 under 16-bit attention.
    if backend in ("cpu", "cuda") and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    kw = dict(rope=False) if variant == "no-rope" else dict(logits_dtype=torch.float32)
    check_masked(backend, (2, 45, 3, 32, 9, 4, 36), torch.float16, DEVICE, **kw)


def test_eomt_mask_rule_blocks_zero_and_the_dense_ref_can_tell():
    # logit == 0 blocks (sigmoid 0.5 is not > 0.5): a kernel that opened it would fail the rule.
    B, N, H, D, prefix, M, K = 1, 40, 2, 16, 8, 3, 32
    q, k, v, cos, sin = make_inputs(B, N, H, D, prefix, torch.float32, "cpu")
    logits = torch.full((B, M, K), -1.0)
    logits[:, :, ::2] = 0.0
    logits[:, :, 1] = 1e-30
    exact = eomt_dense_ref(q, k, v, cos, sin, logits)
    wrong = rope_attention_ref(q, k, v, cos, sin, mask_logits=torch.where(logits == 0, 1.0, logits))
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close_to_ref("opens zeros", wrong, exact, exact, ATOL[torch.float32])
    for backend in ("triton", "ref") + (("cpu",) if _ext.HAS_EXT else ()):
        out = rope_attention(q, k, v, cos, sin, backend=backend, mask_logits=logits)
        assert_close_to_ref(backend, out, exact, exact.float(), ATOL[torch.float32])


# -- dispatch and bad input ------------------------------------------------------------------------


def heads(dtype, D):
    """q, k, v of head dim D on the CPU, as `Like`."""
    qkv = Like(torch.device("cpu"), dtype, (1, 1, 1, D))
    return qkv, qkv, qkv


@pytest.mark.quick
def test_dispatch_reasons():
    assert OP.pick(*make_inputs(1, 9, 2, 64, 4, torch.float32, "cpu")) == ("ref", {})
    assert "head dim 24 is not a multiple of 16 in 16..128" in reasons("triton", *heads(torch.float16, 24))
    assert "float32 with head dim 128 > 64 (would spill registers)" in reasons("triton", *heads(torch.float32,
                                                                                                128))
    assert reasons("ref", *heads(torch.float64, 24)) == []


@requires_cuda
def test_dispatch_on_cuda_prefers_the_extension_and_falls_back_with_reasons():
    q, k, v, cos, sin = make_inputs(1, 9, 2, 64, 4, torch.bfloat16, "cuda")
    assert OP.pick(q, k, v, cos, sin)[0] == ("cuda" if _ext.BUILD["cuda"] else "triton")
    q2, k2, v2, cos2, sin2 = make_inputs(1, 9, 2, 24, 4, torch.bfloat16, "cuda")
    backend, skipped = OP.pick(q2, k2, v2, cos2, sin2)
    assert backend == ("cuda" if _ext.BUILD["cuda"] else "ref")
    if backend == "ref":
        assert "head dim 24" in skipped["triton"][0]
    # head dim 24: rotation pass + ATen attention
    check_backend(None, (1, 9, 2, 24, 4), torch.bfloat16, "cuda")


def test_grad_inputs_fall_back_to_ref():
    q, k, v, cos, sin = make_inputs(1, 9, 2, 32, 4, torch.float32, DEVICE)
    q.requires_grad_()
    out = rope_attention(q, k, v, cos, sin)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.quick
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :-1]), r"k has shape \(1, 8, 2, 32\) but q has \(1, 9, 2, 32\)"),
        (lambda a: a.__setitem__(0, a[0][..., 0]), r"q must be \(B, N, H, D\)"),
        (lambda a: a.__setitem__(3, torch.cat((a[3], a[3]))), r"cos must be \(HW, 32\) with HW <= N=9"),
        (lambda a: a.__setitem__(4, None), "cos and sin must be given together"),
        (lambda a: a.append(torch.randn(1, 5, 5)), r"mask_logits must be \(B=1, M, K\) with M \+ K <= N=9"),
        (lambda a: a.append(torch.randn(2, 2, 5)), r"mask_logits must be \(B=1, M, K\)"),
        (lambda a: a.append(torch.ones(1, 2, 5, dtype=torch.bool)), "mask_logits must be floating point"),
    ],
    ids=["k-shape", "q-dims", "cos-rows", "sin-missing", "mask-too-wide", "mask-batch", "mask-bool"],
)
def test_bad_arguments_are_named(mutate, match):
    args = list(make_inputs(1, 9, 2, 32, 4, torch.float32, "cpu"))
    mutate(args)
    mask = args.pop() if len(args) == 6 else None
    with pytest.raises(ValueError, match=match):
        rope_attention(*args, mask_logits=mask)


@requires_ext
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1].half()), "k has dtype Half but q has dtype Float"),
        (lambda a: a.__setitem__(2, a[2].transpose(1, 3).contiguous().transpose(1, 3)),
         "v must have stride 1"),
        (lambda a: a.__setitem__(3, a[3][:, :16]), r"cos must be \(HW, 32\) with HW <= N=9, got \(5, 16\)"),
        (lambda a: a.__setitem__(0, a[0].double()), "q must be float32, float16 or bfloat16"),
        (lambda a: a.__setitem__(4, a[4].half()), "cos has dtype Float but sin has dtype Half"),
        (lambda a: a.__setitem__(5, torch.randn(1, 5, 5)),
         r"mask_logits must be \(B=1, M, K\) with M \+ K <= N=9"),
        (lambda a: a.__setitem__(5, torch.zeros(1, 2, 5, dtype=torch.int32)),
         "mask_logits must be floating point"),
    ],
    ids=["dtype", "stride", "cos-shape", "float64", "table-dtypes", "mask-shape", "mask-dtype"],
)
def test_cpp_op_rejects_bad_arguments_by_name(mutate, match):
    args = list(make_inputs(1, 9, 2, 32, 4, torch.float32, "cpu")) + [None]
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdino.rope_attention(*args, 0.125)


def test_triton_op_rejects_bad_arguments_by_name():
    q, k, v, cos, sin = make_inputs(1, 9, 2, 32, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="k has dtype torch.float16 != q.dtype"):
        rope_attention_triton(q, k.half(), v, cos, sin, None, 0.125)
    q2, k2, v2, cos2, sin2 = make_inputs(1, 9, 2, 24, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="head dim 24"):
        rope_attention_triton(q2, k2, v2, cos2, sin2, None, 0.125)


# -- torch.library: opcheck and torch.compile ------------------------------------------------------


@requires_ext
def test_rope_attention_opcheck_cpp():
    args = make_inputs(2, 11, 2, 32, 4, torch.float32, DEVICE)
    torch.library.opcheck(torch.ops.fastdino.rope_attention.default, (*args, None, 0.2))
    torch.library.opcheck(torch.ops.fastdino.rope_attention.default, (*args, eomt_logits(2, 3, 7,
                                                                                         args[0].dtype), 0.2))


def test_rope_attention_opcheck_triton():
    args = make_inputs(2, 11, 2, 32, 4, torch.float32, DEVICE)
    torch.library.opcheck(rope_attention_triton, (*args, None, 0.2))
    torch.library.opcheck(rope_attention_triton, (*args, eomt_logits(2, 3, 7, args[0].dtype), 0.2))


@pytest.mark.parametrize("backend", ["cuda" if DEVICE.type == "cuda" else "cpu", "triton", None])
def test_rope_attention_compile_fullgraph(backend):
    if backend in ("cpu", "cuda") and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    q, k, v, cos, sin = make_inputs(1, 21, 2, 32, 5, torch.float32, DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: rope_attention(*a, backend=backend), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, cos, sin), rope_attention_ref(q, k, v, cos, sin), atol=2e-5,
                               rtol=2e-5)


# -- arguments checked before any kernel reads memory ------------------------------------------------


@pytest.mark.parametrize("backend", [None, "triton", "ref"] + (["cpu"] if _ext.HAS_EXT else []))
def test_cos_and_sin_must_match(backend):
    # A shorter sin once sent the Triton kernel past its end (results changed run to run).
    q, k, v, cos, sin = make_inputs(1, 17, 2, 16, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"cos has shape \(16, 16\) but sin has \(15, 16\)"):
        rope_attention(q, k, v, cos, sin[:15].clone(), backend=backend)


def test_head_dim_0_integer_inputs_and_sdpa_layout_are_named():
    with pytest.raises(ValueError, match="q has head dim 0"):
        rope_attention(*(torch.randn(1, 17, 2, 0) for _ in range(3)))
    with pytest.raises(ValueError, match="q must be floating point, got torch.int64"):
        rope_attention(*(torch.ones(1, 17, 2, 16, dtype=torch.long) for _ in range(3)))
    q, k, v, cos, sin = make_inputs(1, 17, 2, 16, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"token-major \(B, N, H, D\); SDPA's \(B, H, N, D\)"):
        rope_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cos, sin)
