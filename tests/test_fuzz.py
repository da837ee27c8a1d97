"""Fuzzing every op against its reference with hypothesis: random sizes (1, primes, one past a
tile), head dims, batches, dtypes, strided and broadcast inputs, NaN and Inf injected. For each
kernel backend on this machine (C++ and Triton; the interpreter on CPU), either the backend refuses
the arguments with the ValueError of its reasons, each reason naming the argument it is about, or
the backend's kernel runs (seen through dispatch's observer hook: a pinned backend that failed its
self-check would quietly run the reference) and its output has NaN and Inf exactly where the
reference has them and is close elsewhere. Each test counts its runs and refusals per backend,
fails where a backend ran fewer than MIN_RUN_SHARE of its examples (a test that only saw
refusals would compare nothing), and reports the counts (`record_property`, and a terminal
summary section where the tests run in one process).

The examples are derived from a fixed seed (derandomize), so CI sees the same examples every run
and a failure is reproducible; FASTDINO_FUZZ_EXAMPLES (default 40 per op, about a minute in all
on 2 cores) and FASTDINO_FUZZ_RANDOM=1 (fresh examples) explore further; the `quick` variants
(`pytest -m quick`) run QUICK_EXAMPLES per op. hypothesis prints the failing example, shrunk.
"""

import inspect
import math
import os
import re
from collections import Counter

import pytest
import torch
from helpers import DEVICE, op_runs
from test_nan_inf import assert_same_non_finite

from fastdino import _ext
from fastdino.ops import (
    OPS,
    add_layer_norm,
    dwconv_layer_norm,
    fused_linear,
    masked_attention,
    ms_deform_attn,
    rope_attention,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KERNELS = ["triton"] + ([DEVICE.type] if _ext.BUILD[DEVICE.type] else [])
EXAMPLES = int(os.environ.get("FASTDINO_FUZZ_EXAMPLES", "40"))
QUICK_EXAMPLES = 6
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize=os.environ.get("FASTDINO_FUZZ_RANDOM") != "1", database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The strategies draw what the kernels take in about two of three examples (the rest: layouts and
# head dims they refuse), so fewer than this share of runs means the kernels went untested.
MIN_RUN_SHARE = 0.4
# Sizes a reason may name instead of the argument they belong to (the ops' docstrings use them).
SIZE_NAMES = {"C": "x", "head dim": "q", "kernel size": "weight"}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
SIZES = st.sampled_from([1, 2, 3, 7, 13, 17, 31, 33, 65])  # 1, primes, one past a tile of 16/32/64
COUNTS: dict = {}  # test id -> Counter of (backend, "ran" or "refused: <reason>"), for the summary


def inject(draw, tensors, names, dtype, nan_only=()):
    """NaN, +Inf or -Inf in one element of one of the named floating tensors (NaN only for those in
    `nan_only`), or nothing. float32 only: torch's CPU bf16/fp16 matmuls (the references' products,
    and the C++ fused_linear's GEMM) spread a NaN or Inf operand to other rows, so in 16 bits there
    is no elementwise rule to compare with; 16-bit inputs are fuzzed finite."""
    kind = draw(st.sampled_from([None, None, float("nan"), float("inf"), float("-inf")]))
    if kind is None or dtype != torch.float32:
        return None
    name = draw(st.sampled_from(names))
    kind = float("nan") if name in nan_only else kind
    t = tensors[name]
    if t is None or t.numel() == 0:
        return None
    flat = torch.tensor(draw(st.integers(0, t.numel() - 1)))
    at = tuple(int(i) for i in torch.unravel_index(flat, t.shape))
    t[at] = kind  # written through the view: the other views of its base (strided inputs) see it too
    return f"{kind} in {name}{list(at)}"


def refusal(name, backend, args, kwargs, error) -> str:
    """A refusal must be the ValueError of the backend's reasons (a C++ op may accept more than they
    allow), each reason naming an argument of the op or a size of one. Returns its count key."""
    op = OPS[name]
    why = op.reasons(backend, *args, *kwargs.values())
    assert why and f"backend '{backend}' cannot run: {'; '.join(why)}" in str(error), str(error)
    params = list(inspect.signature(op.reasons).parameters)[1:]
    for reason in why:
        assert any(re.search(rf"\b{re.escape(word)}\b", reason) for word in params + list(SIZE_NAMES)), (
            f"{name}: {backend}'s reason {reason!r} names none of the arguments {params}")
    return "refused: " + "; ".join(re.sub(r"\d+", "#", reason) for reason in why)


def compare(counts, op, args, kwargs, dtype, what):
    """Each kernel backend against the reference: a refusal naming the arguments, or a run of that
    backend's kernel with the same non-finite positions and close finite values. Counted in `counts`."""
    name = op.__name__
    ref = op(*args, backend="ref", **kwargs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for backend in KERNELS:
        with op_runs(name) as runs:
            try:
                out = op(*args, backend=backend, **kwargs)
            except ValueError as e:
                counts[backend, refusal(name, backend, args, kwargs, e)] += 1
                continue
        ran = [call.args[0] for call in runs[name].call_args_list]
        assert ran == [backend], f"{name} pinned to {backend} ran {ran} ({what})"
        counts[backend, "ran"] += 1
        outs = out if isinstance(out, tuple) else (out,)
        assert len(outs) == len(refs)
        for o, r in zip(outs, refs):
            assert o.shape == r.shape and o.dtype == r.dtype
            assert_same_non_finite(f"{name} {backend} ({what})", o.cpu(), r.cpu(), TOL[dtype])
        if backend != "triton":
            # Unobserved, a C++ backend that passed its self-check is called at once (no dispatch):
            # that path must give the same numbers.
            again = op(*args, backend=backend, **kwargs)
            for o, a in zip(outs, again if isinstance(again, tuple) else (again,)):
                torch.testing.assert_close(a, o, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{name} {backend} unobserved ({what})")


def describe(counts) -> str:
    """Per backend: the examples it ran and those it refused, by reason."""
    lines = []
    for backend in KERNELS:
        mine = {k[1]: n for k, n in counts.items() if k[0] == backend}
        refused = {why.removeprefix("refused: "): n for why, n in mine.items() if why != "ran"}
        why = f" ({', '.join(f'{n} x {r}' for r, n in sorted(refused.items()))})" if refused else ""
        lines.append(f"{backend}: ran {mine.get('ran', 0)} of {sum(mine.values())}, "
                     f"refused {sum(refused.values())}{why}")
    return "\n".join(lines)


class _Summary:
    """The counts of the fuzz tests that ran in this process, as a terminal summary section."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter):
        if COUNTS:
            terminalreporter.section("fuzz: kernel runs and refusals per backend")
            for test, counts in COUNTS.items():
                terminalreporter.write_line(test)
                for line in describe(counts).splitlines():
                    terminalreporter.write_line(f"    {line}")


def fuzz(request, record_property, body, examples):
    """Run `body(counts, draw)` on `examples` hypothesis examples, then require every kernel backend
    to have run (not refused) at least MIN_RUN_SHARE of them."""
    counts = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def run(data):
        body(counts, data.draw)

    run.hypothesis.inner_test._hypothesis_internal_add_digest = body.__name__.encode()  # its own seed
    run()
    COUNTS[request.node.nodeid] = counts
    record_property("fuzz", describe(counts))
    plugins = request.config.pluginmanager
    if plugins.getplugin("terminalreporter") and not plugins.is_registered(_Summary):
        plugins.register(_Summary)
    for backend in KERNELS:
        ran = counts[backend, "ran"]
        total = sum(n for k, n in counts.items() if k[0] == backend)
        assert total and ran >= math.ceil(MIN_RUN_SHARE * total), (
            f"{body.__name__}: under {MIN_RUN_SHARE:.0%} of the examples ran a kernel:\n{describe(counts)}")


def randn(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def add_layer_norm_example(counts, draw):
    rows, C, dtype = draw(SIZES), draw(st.sampled_from([1, 3, 17, 48, 97, 130, 384])), draw(DTYPES)
    # two in three examples in layouts the kernels read (at the start of a buffer or inside one),
    # the others in layouts they refuse
    layout = draw(st.sampled_from(["contiguous", "offset"] * 2 + ["transposed", "broadcast-branch"]))
    x = randn((rows, 3, C), dtype, 2.0) + 0.5
    branch = randn((rows, 3, C), dtype)
    if layout == "offset":  # contiguous views past the start of their buffers
        x, branch = (torch.cat([randn((1, 3, C), dtype), t])[1:] for t in (x, branch))
    elif layout == "transposed":
        x, branch = x.transpose(0, 1), branch.transpose(0, 1)
    elif layout == "broadcast-branch":
        branch = branch[:1].expand_as(x)
    gamma = draw(st.sampled_from([None, "gamma"])) and randn((C,), dtype)
    weight, bias = randn((C,), dtype), randn((C,), dtype)
    what = inject(draw, {"x": x, "branch": branch, "weight": weight}, ["x", "branch", "weight"], dtype)
    compare(counts, add_layer_norm, (x, branch, gamma, weight, bias, 1e-6), {}, dtype, f"{layout}, {what}")


def dwconv_layer_norm_example(counts, draw):
    # maps up to 13 (the 7x7 window, one past the CUDA tile of 8): the interpreter runs every pixel
    maps = st.sampled_from([1, 2, 3, 7, 9, 13])
    B, H, W, dtype = draw(st.sampled_from([1, 2, 3])), draw(maps), draw(maps), draw(DTYPES)
    C = draw(st.sampled_from([1, 3, 17, 96, 97, 130]))
    layout = draw(st.sampled_from(["contiguous", "channels-last", "cropped", "broadcast-batch"]))
    x = randn((B, C, H + 2, W + 1), dtype, 2.0) + 0.5
    x = x[:, :, 1:H + 1, :W] if layout == "cropped" else x[:, :, :H, :W].contiguous()
    if layout == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "broadcast-batch":
        x = x[:1].expand(B, -1, -1, -1)
    weight = randn((C, 1, 7, 7), dtype, 0.2)
    bias = draw(st.sampled_from([None, "bias"])) and randn((C,), dtype)
    nw, nb = randn((C,), dtype), randn((C,), dtype)
    what = inject(draw, {"x": x, "weight": weight}, ["x", "weight"], dtype)
    compare(counts, dwconv_layer_norm, (x, weight, bias, nw, nb, 1e-6), {}, dtype, f"{layout}, {what}")


def fused_linear_example(counts, draw):
    M, K, N, dtype = draw(SIZES), draw(SIZES), draw(SIZES), draw(DTYPES)
    act = draw(st.sampled_from([None, "gelu", "swiglu"]))
    layout = draw(st.sampled_from(["contiguous", "offset", "strided"]))  # the kernels refuse strided x
    x = randn((M, K), dtype)
    if layout == "offset":  # a contiguous view past the start of its buffer
        x = randn((M + 1, K), dtype)[1:]
    elif layout == "strided":  # every other column of a wider activation
        x = randn((M, 2 * K), dtype)[:, ::2]
    w, b = randn((N, K), dtype, K ** -0.5), randn((N,), dtype)
    w2, b2 = (randn((N, K), dtype, K ** -0.5), randn((N,), dtype)) if act == "swiglu" else (None, None)
    r, g = (randn((M, N), dtype), randn((N,), dtype)) if act is None and draw(st.booleans()) else (None, None)
    what = inject(draw, {"x": x, "weight": w, "bias": b}, ["x", "weight", "bias"], dtype)
    compare(counts, fused_linear, (x, w, b, act, w2, b2, r, g), {}, dtype, f"act={act}, {layout}, {what}")


def rope_attention_example(counts, draw):
    B, N, dtype = draw(st.sampled_from([1, 2])), draw(SIZES), draw(DTYPES)
    H = draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([16, 32, 48, 64, 2, 24]))
    qkv = randn((B, N, 3, H, D), dtype)  # a fused qkv projection's output, read as three views
    q, k, v = qkv.unbind(2)
    hw = draw(st.integers(0, N))
    cos = sin = None
    if hw and D % 2 == 0:
        angles = torch.rand(hw, D // 2, device=DEVICE) * 6.3
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    logits = None
    if N >= 2 and draw(st.booleans()):  # EoMT: M queries over the last K tokens, M + K <= N
        M = draw(st.integers(1, N - 1))
        logits = randn((B, M, draw(st.integers(1, N - M))), dtype)
    # Not where a row's scores would be all NaN or hold +Inf (q; k with one token; Inf in k): torch's
    # CPU SDPA (the reference here) gives finite rows there, the Triton kernel eager attention's NaN
    # (test_nan_inf pins that difference).
    names = ["v", "mask_logits"] + (["k"] if N > 1 else [])
    what = inject(draw, {"k": qkv[:, :, 1], "v": qkv[:, :, 2], "mask_logits": logits}, names, dtype,
                  nan_only=["k"])
    compare(counts, rope_attention, (q, k, v, cos, sin), {"mask_logits": logits, "scale": None}, dtype,
            f"D={D}, HW={hw}, {what}")


def masked_attention_example(counts, draw):
    B, Lq, Lk, dtype = draw(st.sampled_from([1, 2])), draw(SIZES), draw(SIZES), draw(DTYPES)
    H, D = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 8, 24, 32, 64]))
    # sequence-first projections, as nn.MultiheadAttention lays them out: (L, B, H * D) viewed as heads
    q = randn((Lq, B, H, D), dtype).transpose(0, 1)
    k, v = (randn((Lk, B, H, D), dtype).transpose(0, 1) for _ in range(2))
    logits = None
    if draw(st.booleans()):
        logits = randn((B, Lq, Lk), draw(st.sampled_from([torch.float32, dtype])), 2.0) - 1.0
        logits[:, ::4] = -5.0  # some rows with every key blocked
    what = inject(draw, {"q": q, "k": k, "v": v, "mask_logits": logits}, ["q", "k", "v", "mask_logits"],
                  dtype)
    compare(counts, masked_attention, (q, k, v, logits), {}, dtype, f"D={D}, {what}")


def ms_deform_attn_example(counts, draw):
    dtype = draw(DTYPES)
    shapes = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4))
    B, Lq, H = draw(st.sampled_from([1, 2])), draw(SIZES), draw(st.sampled_from([1, 2, 3]))
    Dh, P, L = draw(st.sampled_from([1, 2, 3, 8, 12, 24])), draw(st.sampled_from([1, 2, 4])), len(shapes)
    S = sum(h * w for h, w in shapes)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    value = randn((B, S, H, Dh), dtype)
    levels = torch.tensor(shapes, device=DEVICE), torch.tensor(starts, device=DEVICE)
    ref_points = None
    if draw(st.booleans()):  # locations in and around [0, 1], softmaxed weights
        loc = torch.rand(B, Lq, H, L, P, 2, device=DEVICE) * 1.4 - 0.2
        w = torch.rand(B, Lq, H, L, P, device=DEVICE).flatten(-2).softmax(-1).view(B, Lq, H, L, P)
    else:  # the fused form: raw offsets (pixels) and logits around reference points or boxes
        loc, w = torch.randn(B, Lq, H, L, P, 2, device=DEVICE) * 2, torch.randn(B, Lq, H, L, P, device=DEVICE)
        R = draw(st.sampled_from([2, 4]))  # points or boxes, one set for the batch or one per image
        ref_points = torch.rand(draw(st.sampled_from([1, B])), Lq, L, R, device=DEVICE)
    # weights: NaN only (an infinite weight, which no softmax gives, is outside the rule: see the op)
    what = inject(draw, {"value": value, "locations": loc, "weights": w}, ["value", "locations", "weights"],
                  dtype, nan_only=["weights"])
    compare(counts, ms_deform_attn, (value, *levels, loc, w), {"reference_points": ref_points}, dtype,
            f"shapes={shapes}, {what}")


EXAMPLE_BODIES = [add_layer_norm_example, dwconv_layer_norm_example, fused_linear_example,
                  rope_attention_example, masked_attention_example, ms_deform_attn_example]
BODY_IDS = [b.__name__.removesuffix("_example") for b in EXAMPLE_BODIES]


@pytest.mark.parametrize("body", EXAMPLE_BODIES, ids=BODY_IDS)
def test_fuzz(request, record_property, body):
    fuzz(request, record_property, body, EXAMPLES)


@pytest.mark.quick
@pytest.mark.parametrize("body", EXAMPLE_BODIES, ids=BODY_IDS)
def test_fuzz_quick(request, record_property, body):
    fuzz(request, record_property, body, QUICK_EXAMPLES)


def zeros_case(name):
    """Arguments with one size 0, on this machine's device."""
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    u = lambda *s: torch.rand(*s, device=DEVICE)  # noqa: E731
    level = torch.tensor([[2, 3]], device=DEVICE), torch.tensor([0], device=DEVICE)
    kv = lambda B: (r(B, 5, 2, 16), r(B, 5, 2, 16))  # noqa: E731
    samples = lambda B, Lq, P: (u(B, Lq, 2, 1, P, 2), u(B, Lq, 2, 1, P))  # noqa: E731
    return {
        "add_layer_norm rows=0": (add_layer_norm, (r(0, 8), r(0, 8), None, r(8), r(8))),
        "dwconv_layer_norm B=0": (dwconv_layer_norm, (r(0, 8, 3, 5), r(8, 1, 7, 7), r(8), r(8), r(8))),
        "dwconv_layer_norm H=0": (dwconv_layer_norm, (r(2, 8, 0, 5), r(8, 1, 7, 7), None, r(8), r(8))),
        "fused_linear M=0": (fused_linear, (r(0, 8), r(4, 8), None, "gelu")),
        "fused_linear N=0": (fused_linear, (r(3, 8), r(0, 8))),
        "rope_attention B=0": (rope_attention, (r(0, 5, 2, 16), r(0, 5, 2, 16), r(0, 5, 2, 16))),
        "rope_attention N=0": (rope_attention, (r(1, 0, 2, 16), r(1, 0, 2, 16), r(1, 0, 2, 16))),
        "rope_attention H=0": (rope_attention, (r(1, 5, 0, 16), r(1, 5, 0, 16), r(1, 5, 0, 16))),
        "masked_attention Lq=0": (masked_attention, (r(1, 0, 2, 16), *kv(1), r(1, 0, 5))),
        "masked_attention B=0": (masked_attention, (r(0, 3, 2, 16), *kv(0), r(0, 3, 5))),
        "ms_deform_attn Lq=0": (ms_deform_attn, (r(1, 6, 2, 4), *level, *samples(1, 0, 4))),
        "ms_deform_attn B=0": (ms_deform_attn, (r(0, 6, 2, 4), *level, *samples(0, 3, 4))),
        "ms_deform_attn P=0": (ms_deform_attn, (r(1, 6, 2, 4), *level, *samples(1, 3, 0))),
    }[name]


ZERO_REFUSED = {  # sizes 0 that no backend can give a meaning: named errors
    "fused_linear K=0": (lambda: (fused_linear, (torch.randn(3, 0), torch.randn(4, 0))), "no input features"),
    "ms_deform_attn level 0x3": (lambda: (ms_deform_attn, (torch.randn(1, 0, 2, 4), torch.tensor([[0, 3]]),
                                                           torch.tensor([0]), torch.rand(1, 3, 2, 1, 4, 2),
                                                           torch.rand(1, 3, 2, 1, 4))),
                                 r"spatial_shapes must be positive"),
}


@pytest.mark.parametrize("name", ["add_layer_norm rows=0", "dwconv_layer_norm B=0", "dwconv_layer_norm H=0",
                                  "fused_linear M=0", "fused_linear N=0",
                                  "rope_attention B=0", "rope_attention N=0", "rope_attention H=0",
                                  "masked_attention Lq=0", "masked_attention B=0", "ms_deform_attn Lq=0",
                                  "ms_deform_attn B=0", "ms_deform_attn P=0"])
def test_empty_sizes_give_the_references_empty_or_zero_result(name):
    op, args = zeros_case(name)
    ref = op(*args, backend="ref")
    for backend in KERNELS:
        out = op(*args, backend=backend)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert o.shape == r.shape and torch.equal(o, r), f"{name} {backend}"


@pytest.mark.parametrize("name", ZERO_REFUSED)
def test_sizes_without_meaning_are_named(name):
    make, match = ZERO_REFUSED[name]
    op, args = make()
    for backend in ["ref"] + KERNELS:
        with pytest.raises(ValueError, match=match):
            op(*args, backend=backend)


PUBLIC = {f.__name__: f for f in (add_layer_norm, dwconv_layer_norm, fused_linear, masked_attention,
                                   ms_deform_attn, rope_attention)}


MAY_BE_NONE = {"add_layer_norm": {"gamma"}, "dwconv_layer_norm": {"bias"},
               "fused_linear": {"bias", "weight2", "bias2", "residual", "gamma", "cos", "sin"},
               "masked_attention": {"mask_logits"},
               "ms_deform_attn": {"level_start_index", "reference_points"},
               "rope_attention": {"cos", "sin", "mask_logits"}}


@pytest.mark.quick
@pytest.mark.parametrize("name", list(OPS))
def test_an_argument_that_is_not_a_tensor_is_named(name):
    # A list or a missing tensor once gave an AttributeError from inside the check or the reference.
    op, fn = OPS[name], PUBLIC[name]
    args = op.sample(torch.device("cpu"), torch.float32)
    args = list(args[0] if isinstance(args, list) else args)
    params = list(inspect.signature(fn).parameters)
    fn(*args)  # the sample itself runs
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or params[i] == "spatial_shapes":  # shapes may be a list
            continue
        for bad in ([1.0], "x") + (() if params[i] in MAY_BE_NONE[name] else (None,)):
            for backend in [None, "ref"] + KERNELS:
                wrong = args[:i] + [bad] + args[i + 1:]
                with pytest.raises(ValueError, match=rf"{name}: {params[i]} must be a torch\.Tensor"):
                    fn(*wrong, backend=backend)


@pytest.mark.quick
@pytest.mark.parametrize("name", ["add_layer_norm", "dwconv_layer_norm", "masked_attention",
                                  "rope_attention"])
def test_a_scalar_that_is_not_a_number_and_an_unknown_backend_are_named(name):
    op, fn = OPS[name], PUBLIC[name]
    args = list(op.sample(torch.device("cpu"), torch.float32))
    param = "eps" if "layer_norm" in name else "scale"
    index = list(inspect.signature(fn).parameters).index(param)
    args = args + [None] * (index + 1 - len(args))
    args[index] = "a"
    for backend in [None, "ref"] + KERNELS:
        with pytest.raises(ValueError, match=rf"{name}: {param} must be a number( or None)?, got str"):
            fn(*args, backend=backend)
    args[index] = 0.5
    for backend in ("gpu", ["cpu"]):
        with pytest.raises(ValueError, match=rf"{name}: backend must be one of"):
            fn(*args, backend=backend)

