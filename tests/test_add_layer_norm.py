"""add_layer_norm: every backend against the float64 math, with the tolerance rule of conftest."""

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
from fastdino.ops import add_layer_norm, add_layer_norm_ref
from fastdino.ops._dispatch import Like
from fastdino.ops.add_layer_norm import OP, add_layer_norm_triton, reasons

# (shape of x, has gamma). Real DINOv3 rows (384 = ViT-S, 1024 = ViT-L, 4096 = 7B; 1029 tokens at
# 512^2) and odd ones that exercise masking and the scalar (non-vectorised) CUDA path.
SHAPES_FULL = [((2, 1029, 384), True), ((1, 197, 1024), True), ((1, 5, 4096), True), ((3, 7, 97), True),
               ((2, 3, 1023), False), ((4, 385), True), ((1, 1, 1), True), ((6, 1), False), ((0, 384), True)]
# Under the Triton interpreter every program runs serially on the CPU: fewer rows.
SHAPES_INTERP = [((2, 37, 384), True), ((1, 3, 1024), True), ((1, 2, 4096), False), ((3, 7, 97), True),
                 ((2, 3, 1023), False), ((1, 1, 1), True), ((0, 384), True)]
CUDA_SHAPES = SHAPES_FULL + [((32, 1029, 768), True), ((1, 4101, 1280), True)]
TRITON_SHAPES = SHAPES_FULL if DEVICE.type == "cuda" else SHAPES_INTERP
QUICK = ((3, 7, 97), True)  # `pytest -m quick`: odd rows, odd C, a masked tail


def make_inputs(shape, dtype, device, has_gamma=True):
    C = shape[-1]
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5  # a mean away from 0 tests the variance
    branch = torch.randn(shape, device=device, dtype=dtype)
    gamma = torch.randn(C, device=device, dtype=dtype) if has_gamma else None
    weight = torch.randn(C, device=device, dtype=dtype)
    bias = torch.randn(C, device=device, dtype=dtype)
    return x, branch, gamma, weight, bias


def exact_and_lowp(x, branch, gamma, weight, bias, eps=1e-5):
    """((y, z) in float64 without rounding, (y, z) from the unfused PyTorch modules in x.dtype)."""
    d = [t.double() if t is not None else None for t in (x, branch, gamma, weight, bias)]
    y64 = d[0] + (d[1] * d[2] if gamma is not None else d[1])
    z64 = F.layer_norm(y64, (x.shape[-1],), d[3], d[4], eps)
    y = x + (branch * gamma if gamma is not None else branch)
    return (y64, z64), (y, F.layer_norm(y, (x.shape[-1],), weight, bias, eps))


def check_backend(backend, shape, has_gamma, dtype, device):
    inputs = make_inputs(shape, dtype, device, has_gamma)
    y, z = add_layer_norm(*inputs, eps=1e-5, backend=backend)
    assert y.dtype == dtype and z.dtype == dtype and y.shape == shape and z.shape == shape
    (y64, z64), (y_lp, z_lp) = exact_and_lowp(*inputs)
    assert_close_to_ref(f"{backend} y", y, y64, y_lp, ATOL[dtype])
    assert_close_to_ref(f"{backend} z", z, z64, z_lp, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,has_gamma", SHAPES_FULL, ids=str)
def test_add_layer_norm_ref_matches(shape, has_gamma, dtype):
    check_backend("ref", shape, has_gamma, dtype, DEVICE)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,has_gamma", quick_cases(SHAPES_FULL, QUICK, spread=True), ids=str)
def test_add_layer_norm_cpu_matches_ref(shape, has_gamma, dtype):
    check_backend("cpu", shape, has_gamma, dtype, "cpu")


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,has_gamma", quick_cases(CUDA_SHAPES, QUICK, spread=True), ids=str)
def test_add_layer_norm_cuda_matches_ref(shape, has_gamma, dtype):
    check_backend("cuda", shape, has_gamma, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,has_gamma", quick_cases(TRITON_SHAPES, QUICK, spread=True), ids=str)
def test_add_layer_norm_triton_matches_ref(shape, has_gamma, dtype):
    # On CPU this runs the Triton interpreter, which rounds fp32 -> bf16 by truncation instead of
    # to nearest (measured with triton 3.9): bf16 stays within the rule, the GPU run is exact.
    check_backend("triton", shape, has_gamma, dtype, DEVICE)


def test_tolerance_rule_rejects_a_wrong_result():
    inputs = make_inputs((3, 7, 97), torch.bfloat16, "cpu")
    y, z = add_layer_norm_ref(*inputs, 1e-5)
    (y64, z64), (y_lp, z_lp) = exact_and_lowp(*inputs)
    z_bad = z.clone()
    z_bad[1, 3, 5] += 0.25  # a few bf16 ulps at |z| ~ 1-4
    assert_close_to_ref("ref z", z, z64, z_lp, ATOL[torch.bfloat16])
    with pytest.raises(AssertionError, match=r"at \(1, 3, 5\)"):
        assert_close_to_ref("ref z", z_bad, z64, z_lp, ATOL[torch.bfloat16])


def test_ref_equals_unfused_modules_fp32():
    x, branch, gamma, weight, bias = make_inputs((2, 11, 96), torch.float32, "cpu")
    norm = torch.nn.LayerNorm(96, eps=1e-6)
    norm.weight.data, norm.bias.data = weight, bias
    y, z = add_layer_norm_ref(x, branch, gamma, weight, bias, 1e-6)
    torch.testing.assert_close(y, x + branch * gamma, atol=0, rtol=0)
    torch.testing.assert_close(z, norm(x + branch * gamma), atol=1e-6, rtol=1e-6)


# -- dispatch and bad input ------------------------------------------------------------------------


def rows(device, dtype, C):
    """add_layer_norm's arguments for rows of C elements, as `Like`."""
    x, vec = Like(torch.device(device), dtype, (1, C)), Like(torch.device(device), dtype, (C,))
    return x, x, vec, vec, vec


@pytest.mark.quick
def test_dispatch_explains_each_skipped_backend():
    # CPU tensors: the reference is the fastest measured path, nothing is tried before it.
    assert OP.pick(*make_inputs((2, 5, 64), torch.float32, "cpu")) == ("ref", {})
    assert reasons("cpu", *rows("cpu", torch.float32, 64)) == ([] if _ext.HAS_EXT else [
        f"fastdino._C not built ({_ext.EXT_ERROR})"])
    why = reasons("cuda", *rows("cpu", torch.float64, 64))
    assert "device=cpu (needs cuda)" in why and any("float64" in r for r in why)
    assert "C=16384 > 8192" in reasons("triton", *rows("cuda", torch.float32, 16384))


@requires_cuda
def test_dispatch_on_cuda_prefers_the_extension_then_triton():
    x, branch, gamma, weight, bias = make_inputs((2, 5, 64), torch.float32, "cuda")
    backend, skipped = OP.pick(x, branch, gamma, weight, bias)
    assert backend == ("cuda" if _ext.BUILD["cuda"] else "triton")
    backend, skipped = OP.pick(x.transpose(0, 1), branch.transpose(0, 1), gamma, weight, bias)
    assert backend == "ref" and "x is not contiguous" in skipped["triton"]


def test_non_contiguous_and_grad_inputs_fall_back_to_ref():
    x, branch, gamma, weight, bias = make_inputs((4, 6, 32), torch.float32, "cpu")
    y, z = add_layer_norm(x.transpose(0, 1), branch.transpose(0, 1), gamma, weight, bias)
    ry, rz = add_layer_norm_ref(x.transpose(0, 1), branch.transpose(0, 1), gamma, weight, bias, 1e-5)
    torch.testing.assert_close(z, rz)
    w = weight.clone().requires_grad_()
    _, z = add_layer_norm(x, branch, gamma, w, bias)
    z.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :3]), "branch has shape"),
        (lambda a: a.__setitem__(3, a[3][:-1]), r"weight must have shape \(32,\)"),
        (lambda a: a.__setitem__(2, a[2].reshape(4, 8)), r"gamma must have shape \(32,\)"),
        (lambda a: a.__setitem__(0, a[0][..., :0]), "non-empty last dim"),
    ],
    ids=["branch-shape", "weight-shape", "gamma-shape", "empty-C"],
)
def test_bad_arguments_are_named(mutate, match):
    args = list(make_inputs((4, 6, 32), torch.float32, "cpu"))
    mutate(args)
    with pytest.raises(ValueError, match=match):
        add_layer_norm(*args)


@pytest.mark.quick
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_pinned_backend_that_cannot_run_says_why(backend):
    args = make_inputs((4, 6, 32), torch.float64, "cpu")
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run: dtype=torch.float64"):
        add_layer_norm(*args, backend=backend)


@requires_ext
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1].half()), "branch has dtype Half but x has dtype Float"),
        (lambda a: a.__setitem__(1, a[1].transpose(0, 1).contiguous().transpose(0, 1)),
         "branch must be contiguous"),
        (lambda a: a.__setitem__(4, a[4][:5]), r"bias must have shape \(32,\)"),
        (lambda a: a.__setitem__(0, a[0].double()), "x must be float32, float16 or bfloat16"),
    ],
    ids=["dtype", "contiguity", "shape", "float64"],
)
def test_cpp_op_rejects_bad_arguments_by_name(mutate, match):
    args = list(make_inputs((4, 6, 32), torch.float32, "cpu"))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastdino.add_layer_norm(*args, 1e-5)


def test_triton_op_rejects_bad_arguments_by_name():
    x, branch, gamma, weight, bias = make_inputs((4, 6, 32), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="x is not contiguous"):
        add_layer_norm_triton(x.transpose(0, 1), branch.transpose(0, 1), gamma, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="gamma has dtype torch.float16"):
        add_layer_norm_triton(x, branch, gamma.half(), weight, bias, 1e-5)


# -- torch.library: opcheck and torch.compile ------------------------------------------------------


@requires_ext
@pytest.mark.parametrize("has_gamma", [True, False])
def test_add_layer_norm_opcheck_cpp(has_gamma):
    args = make_inputs((3, 5, 48), torch.float32, DEVICE, has_gamma)
    torch.library.opcheck(torch.ops.fastdino.add_layer_norm.default, (*args, 1e-5))


@pytest.mark.parametrize("has_gamma", [True, False])
def test_add_layer_norm_opcheck_triton(has_gamma):
    args = make_inputs((3, 5, 48), torch.float32, DEVICE, has_gamma)
    torch.library.opcheck(add_layer_norm_triton, (*args, 1e-5))


@pytest.mark.parametrize("backend", ["cuda" if DEVICE.type == "cuda" else "cpu", "triton", "ref", None])
def test_add_layer_norm_compile_fullgraph(backend):
    if backend in ("cpu", "cuda") and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    inputs = make_inputs((2, 9, 64), torch.float32, DEVICE)
    fn = lambda *a: add_layer_norm(*a, eps=1e-5, backend=backend)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*inputs), fn(*inputs)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", [None, "ref"])
def test_integer_inputs_are_named(backend):
    # int64 once came back as int64 from the reference.
    x, branch, gamma, weight, bias = (t.long() for t in make_inputs((2, 3, 8), torch.float32, "cpu"))
    with pytest.raises(ValueError, match="x must be floating point, got torch.int64"):
        add_layer_norm(x, branch, gamma, weight, bias, backend=backend)
