"""dwconv_layer_norm: every backend against the float64 math, with the tolerance rule of conftest."""

import pytest
import torch
import torch.nn.functional as F
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
from fastdino.kernels import dwconv_layer_norm as k_dwconv
from fastdino.ops import dwconv_layer_norm, dwconv_layer_norm_ref
from fastdino.ops._dispatch import Like
from fastdino.ops.dwconv_layer_norm import OP, dwconv_layer_norm_triton, reasons

# (B, C, H, W, channels-last, has bias). ConvNeXt's stage widths (96..1536 for T..L) at maps that
# are not tile multiples (the CUDA tile is 8 wide, the Triton row tile 1..32), 1x1, 3x5 and 7x7
# maps (the window covers the whole map), an odd channel count and an empty batch.
SHAPES_FULL = [(2, 96, 33, 29, False, True), (2, 96, 33, 29, True, True), (1, 192, 16, 17, True, True),
               (1, 384, 7, 7, False, True), (1, 768, 3, 5, True, True), (2, 1536, 1, 1, False, True),
               (1, 1024, 9, 6, True, False), (3, 97, 9, 11, False, True), (3, 97, 9, 11, True, False),
               (1, 1, 4, 4, False, True), (1, 100, 13, 1, True, True), (0, 96, 8, 8, False, True)]
CPU_KERNEL = ["cpu"] if _ext.HAS_EXT and DEVICE.type == "cpu" else []  # the C++ CPU op, on a CPU run
# Under the Triton interpreter every program runs serially on the CPU: fewer pixels.
SHAPES_INTERP = [(2, 96, 9, 11, False, True), (1, 96, 9, 11, True, True), (1, 192, 5, 6, True, False),
                 (1, 384, 7, 7, False, True), (1, 768, 3, 5, True, True), (1, 1536, 1, 1, False, True),
                 (1, 97, 3, 5, True, True), (1, 1, 4, 4, False, True), (0, 96, 4, 4, False, True)]
CUDA_SHAPES = SHAPES_FULL + [(32, 96, 128, 128, True, True), (4, 2048, 5, 7, True, True)]
# `pytest -m quick`: odd channels, maps smaller than the 7x7 window or not a tile multiple
QUICK = (3, 97, 9, 11, True, False)
TRITON_SHAPES = (quick_cases(SHAPES_FULL, QUICK) if DEVICE.type == "cuda"
                 else quick_cases(SHAPES_INTERP, (1, 97, 3, 5, True, True)))


def make_inputs(B, C, H, W, channels_last=False, has_bias=True, dtype=torch.float32, device=DEVICE):
    x = torch.randn(B, C, H, W, device=device) * 2 + 0.5  # a mean away from 0 tests the variance
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(C, 1, 7, 7, device=device) / 7
    bias = torch.randn(C, device=device) if has_bias else None
    nw, nb = torch.randn(C, device=device), torch.randn(C, device=device)
    return tuple(t if t is None else t.to(dtype) for t in (x, weight, bias, nw, nb))


def exact_and_lowp(x, weight, bias, nw, nb, eps=1e-6):
    """(z in float64 without rounding, z from the unfused PyTorch modules in x.dtype)."""
    C = x.shape[1]
    d = [t.double() if t is not None else None for t in (x, weight, bias, nw, nb)]
    y64 = F.conv2d(d[0], d[1], d[2], padding=3, groups=C).permute(0, 2, 3, 1)
    z64 = F.layer_norm(y64, (C,), d[3], d[4], eps)
    y = F.conv2d(x, weight, bias, padding=3, groups=C).permute(0, 2, 3, 1)
    return z64, F.layer_norm(y, (C,), nw, nb, eps)


def check_backend(backend, shape, dtype, device):
    inputs = make_inputs(*shape, dtype=dtype, device=device)
    z = dwconv_layer_norm(*inputs, eps=1e-6, backend=backend)
    B, C, H, W = inputs[0].shape
    assert z.dtype == dtype and z.shape == (B, H, W, C) and z.is_contiguous()
    z64, z_lp = exact_and_lowp(*inputs)
    assert_close_to_ref(f"{backend} z", z, z64, z_lp, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES_FULL, ids=str)
def test_dwconv_layer_norm_ref_matches(shape, dtype):
    check_backend("ref", shape, dtype, DEVICE)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", quick_cases(SHAPES_FULL, QUICK), ids=str)
def test_dwconv_layer_norm_cpu_matches_ref(shape, dtype):
    check_backend("cpu", shape, dtype, "cpu")


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", quick_cases(CUDA_SHAPES, QUICK), ids=str)
def test_dwconv_layer_norm_cuda_matches_ref(shape, dtype):
    check_backend("cuda", shape, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_dwconv_layer_norm_triton_matches_ref(shape, dtype):
    # On CPU this runs the Triton interpreter, which rounds fp32 -> bf16 by truncation instead of
    # to nearest (measured with triton 3.9): bf16 stays within the rule, the GPU run is exact.
    check_backend("triton", shape, dtype, DEVICE)


def test_tolerance_rule_rejects_a_wrong_result():
    inputs = make_inputs(1, 97, 3, 5, dtype=torch.bfloat16, device="cpu")
    z = dwconv_layer_norm_ref(*inputs, 1e-6)
    z64, z_lp = exact_and_lowp(*inputs)
    assert_close_to_ref("ref z", z, z64, z_lp, ATOL[torch.bfloat16])
    z_bad = z.clone()
    z_bad[0, 2, 4, 5] += 0.25  # a few bf16 ulps at |z| ~ 1-4
    with pytest.raises(AssertionError, match=r"at \(0, 2, 4, 5\)"):
        assert_close_to_ref("ref z", z_bad, z64, z_lp, ATOL[torch.bfloat16])


def test_ref_equals_the_unfused_convnext_modules_fp32():
    x, weight, bias, nw, nb = make_inputs(2, 96, 11, 9, device="cpu")
    conv = torch.nn.Conv2d(96, 96, 7, padding=3, groups=96)
    norm = torch.nn.LayerNorm(96, eps=1e-6)
    with torch.no_grad():
        conv.weight.copy_(weight), conv.bias.copy_(bias), norm.weight.copy_(nw), norm.bias.copy_(nb)
        want = norm(conv(x).permute(0, 2, 3, 1))
    got = dwconv_layer_norm_ref(x, weight, bias, nw, nb, 1e-6)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["ref", "triton"] + CPU_KERNEL)
def test_strided_views_read_in_place(backend):
    # a crop of a larger map and an expanded batch: neither contiguous nor channels-last
    x, weight, bias, nw, nb = make_inputs(1, 96, 12, 14)
    crop = x[:, :, 2:9, 3:12]
    expanded = x[:, :, :5, :6].expand(2, -1, -1, -1)
    for view in (crop, expanded):
        z = dwconv_layer_norm(view, weight, bias, nw, nb, backend=backend)
        torch.testing.assert_close(z, dwconv_layer_norm_ref(view.contiguous(), weight, bias, nw, nb, 1e-6),
                                   atol=1e-5, rtol=1e-5)


# -- the Triton launcher's transposed weight ------------------------------------------------------


def triton_vs_ref(x, weight, bias, nw, nb):
    z = dwconv_layer_norm(x, weight, bias, nw, nb, backend="triton")
    torch.testing.assert_close(z, dwconv_layer_norm_ref(x, weight, bias, nw, nb, 1e-6), atol=1e-5, rtol=1e-5)
    return z


def test_triton_sees_every_weight_update():
    """The kernel reads the weight transposed: every way a model's weight changes is seen, a write
    through `.data` (an EMA teacher's update, invisible to the version counter) included."""
    x, w1, bias, nw, nb = make_inputs(1, 97, 13, 13, channels_last=True)
    w2 = torch.randn_like(w1) / 7
    z1 = triton_vs_ref(x, w1, bias, nw, nb)
    with torch.no_grad():
        w1.mul_(2)
    assert not torch.allclose(triton_vs_ref(x, w1, bias, nw, nb), z1)
    z1 = triton_vs_ref(x, w1, bias, nw, nb)
    w1.data.mul_(0.5)  # the version counter does not move
    assert not torch.allclose(triton_vs_ref(x, w1, bias, nw, nb), z1)
    with torch.inference_mode():
        w1[5].neg_()  # through a view, in inference mode
    z2 = triton_vs_ref(x, w2, bias, nw, nb)
    triton_vs_ref(x, w1, bias, nw, nb)
    torch.testing.assert_close(triton_vs_ref(x, w2, bias, nw, nb), z2, atol=0, rtol=0)
    w = torch.nn.Parameter(w1.clone(), requires_grad=False)
    w.data = torch.randn_like(w1)  # a new storage
    triton_vs_ref(x, w, bias, nw, nb)
    wt = k_dwconv.transposed_weight(w)
    assert wt.is_contiguous() and torch.equal(wt, w.reshape(97, 49).t())


# -- dispatch and bad input ------------------------------------------------------------------------


def like_args(device, dtype, C, K=7):
    d = torch.device(device)
    vec = Like(d, dtype, (C,))
    return Like(d, dtype, (1, C, 16, 16)), Like(d, dtype, (C, 1, K, K)), vec, vec, vec


@pytest.mark.quick
def test_dispatch_explains_each_skipped_backend():
    # CPU tensors: the reference is picked, nothing is tried before it.
    assert OP.pick(*make_inputs(1, 16, 5, 5, device="cpu")) == ("ref", {})
    assert reasons("cpu", *like_args("cpu", torch.float32, 64)) == ([] if _ext.HAS_EXT else [
        f"fastdino._C not built ({_ext.EXT_ERROR})"])
    why = reasons("cuda", *like_args("cpu", torch.float64, 64))
    assert "device=cpu (needs cuda)" in why and any("float64" in r for r in why)
    assert "C=4096 > 2048" in reasons("cuda", *like_args("cuda", torch.float32, 4096))
    assert "C=4096 > 2048" in reasons("triton", *like_args("cuda", torch.float32, 4096))
    why = reasons("triton", *like_args("cuda", torch.float32, 64, 5))
    assert "kernel size 5 (the kernels take 7x7)" in why
    x, weight, bias, nw, nb = make_inputs(1, 16, 5, 5, device="cpu")
    assert "norm_bias has dtype torch.float16 != x.dtype" in reasons("triton", x, weight, bias, nw, nb.half())


@requires_cuda
def test_dispatch_on_cuda_prefers_the_extension_then_triton():
    args = make_inputs(1, 64, 5, 5, device="cuda")
    assert OP.pick(*args)[0] == ("cuda" if _ext.BUILD["cuda"] else "triton")


def test_other_kernel_sizes_and_grad_fall_back_to_ref():
    x, _, bias, nw, nb = make_inputs(1, 16, 6, 5, device="cpu")
    w5 = torch.randn(16, 1, 5, 5)
    z = dwconv_layer_norm(x, w5, bias, nw, nb)
    want = F.layer_norm(F.conv2d(x, w5, bias, padding=2, groups=16).permute(0, 2, 3, 1), (16,), nw, nb, 1e-6)
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    w = torch.randn(16, 1, 7, 7, requires_grad=True)
    dwconv_layer_norm(x, w, bias, nw, nb).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), r"x must be \(B, C, H, W\)"),
        (lambda a: a.__setitem__(1, a[1][:, :, :6, :6]), r"weight must be \(16, 1, K, K\) with K odd"),
        (lambda a: a.__setitem__(1, a[1][:8]), r"weight must be \(16, 1, K, K\)"),
        (lambda a: a.__setitem__(2, a[2][:5]), r"bias must have shape \(16,\)"),
        (lambda a: a.__setitem__(3, a[3].reshape(4, 4)), r"norm_weight must have shape \(16,\)"),
        (lambda a: a.__setitem__(0, a[0][:, :0]), "x has no channels"),
        (lambda a: a.__setitem__(0, a[0].long()), "x must be floating point, got torch.int64"),
    ],
    ids=["x-dims", "even-kernel", "weight-channels", "bias-shape", "norm-weight-shape", "no-channels", "int"],
)
def test_bad_arguments_are_named(mutate, match):
    args = list(make_inputs(1, 16, 5, 5, device="cpu"))
    mutate(args)
    with pytest.raises(ValueError, match=match):
        dwconv_layer_norm(*args)


@pytest.mark.quick
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_pinned_backend_that_cannot_run_says_why(backend):
    args = make_inputs(1, 16, 5, 5, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run: dtype=torch.float64"):
        dwconv_layer_norm(*args, backend=backend)


@requires_ext
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(3, a[3].half()), "norm_weight has dtype Half but x has dtype Float"),
        (lambda a: a.__setitem__(2, torch.randn(32)[::2]), "bias must be contiguous"),
        (lambda a: a.__setitem__(4, a[4][:5]), r"norm_bias must have shape \(16,\)"),
        (lambda a: a.__setitem__(1, torch.randn(16, 1, 5, 5)), r"weight must be \(16, 1, 7, 7\)"),
        (lambda a: a.__setitem__(0, a[0].double()), "x must be float32, float16 or bfloat16"),
    ],
    ids=["dtype", "contiguity", "shape", "kernel-size", "float64"],
)
def test_cpp_op_rejects_bad_arguments_by_name(mutate, match):
    args = list(make_inputs(1, 16, 5, 5, device="cpu"))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdino.dwconv_layer_norm(*args, 1e-6)


def test_triton_op_rejects_bad_arguments_by_name():
    x, weight, bias, nw, nb = make_inputs(1, 16, 5, 5)
    with pytest.raises(ValueError, match="bias is not contiguous"):
        dwconv_layer_norm_triton(x, weight, torch.randn(32, device=x.device)[::2], nw, nb, 1e-6)
    with pytest.raises(ValueError, match="kernel size 3"):
        dwconv_layer_norm_triton(x, weight[:, :, 2:5, 2:5], bias, nw, nb, 1e-6)


# -- torch.library: opcheck and torch.compile ------------------------------------------------------


@requires_ext
@pytest.mark.parametrize("channels_last", [False, True])
def test_dwconv_layer_norm_opcheck_cpp(channels_last):
    args = make_inputs(2, 24, 5, 6, channels_last)
    torch.library.opcheck(torch.ops.fastdino.dwconv_layer_norm.default, (*args, 1e-6))


@pytest.mark.parametrize("has_bias", [True, False])
def test_dwconv_layer_norm_opcheck_triton(has_bias):
    args = make_inputs(1, 24, 4, 5, True, has_bias)
    torch.library.opcheck(dwconv_layer_norm_triton, (*args, 1e-6))


@pytest.mark.parametrize("backend", ["cuda" if DEVICE.type == "cuda" else "cpu", "triton", "ref", None])
def test_dwconv_layer_norm_compile_fullgraph(backend):
    if backend in ("cpu", "cuda") and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    inputs = make_inputs(1, 32, 5, 7)
    fn = lambda *a: dwconv_layer_norm(*a, eps=1e-6, backend=backend)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton"] + CPU_KERNEL)
def test_batch_size_changing_every_call(backend):
    # ConvNeXt runs with whatever batch arrives: nothing is tuned or cached per shape.
    x, weight, bias, nw, nb = make_inputs(7, 32, 6, 5)
    for B in (3, 1, 7, 2, 5):
        z = dwconv_layer_norm(x[:B], weight, bias, nw, nb, backend=backend)
        torch.testing.assert_close(z, dwconv_layer_norm_ref(x[:B], weight, bias, nw, nb, 1e-6), atol=1e-5,
                                   rtol=1e-5)
