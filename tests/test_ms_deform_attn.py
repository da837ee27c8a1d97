"""ms_deform_attn: the C++ (CPU/CUDA) and Triton kernels against grid_sample in float64, with the
tolerance rule of helpers; locations partly outside [0, 1] and exactly on borders and pixel
centres; the (Dh, L) combinations of the real models; odd query counts. Both input forms:
locations and softmaxed weights, and the fused form (reference points, raw offsets and logits)."""

import pytest
import torch
from helpers import ATOL, DEVICE, DTYPES, assert_close_to_ref, quick_cases, requires_cuda_ext, requires_ext

from fastdino import _ext
from fastdino.ops.ms_deform_attn import OP, ms_deform_attn, ms_deform_attn_ref, offset_locations

KERNEL_BACKENDS = (["cuda" if DEVICE.type == "cuda" else "cpu"] if _ext.HAS_EXT else []) + ["triton"]
# (Dh, level shapes): adapter extractor (one level, Dh 12 / 128), pixel decoder (3 levels, Dh 2 / 24 /
# 128), a 4-level Deformable-DETR head; maps with odd sides and a 1-pixel-wide level.
CASES = {
    "adapter-dh12": (12, [(8, 6)]),
    "adapter-dh128": (128, [(5, 7)]),
    "decoder-dh2": (2, [(9, 7), (5, 4), (3, 2)]),
    "decoder-dh24": (24, [(8, 8), (4, 4), (2, 2)]),
    "decoder-dh128": (128, [(6, 5), (3, 3), (1, 2)]),
    "detr-dh32": (32, [(7, 9), (4, 5), (2, 3), (1, 1)]),
}
CASES_FULL = {  # the real pixel-decoder level shapes at 512^2, batch 2
    "decoder-512-dh24": (24, [(64, 64), (32, 32), (16, 16)]),
    "adapter-512-dh12": (12, [(32, 32)]),
}


def level_tensors(shapes, device=DEVICE):
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return (torch.tensor(shapes, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device))


def make_inputs(B, Lq, heads, Dh, shapes, P=4, dtype=torch.float32, loc_dtype=torch.float32, device=DEVICE):
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(B, S, heads, Dh, device=device).to(dtype)
    loc = torch.rand(B, Lq, heads, L, P, 2, device=device) * 1.3 - 0.15  # about 20% of corners off the map
    # Exact borders and pixel centres/edges of every level: x in {0, 1, (k + 0.5) / W, k / W}.
    wh = torch.tensor([[w, h] for h, w in shapes], device=device, dtype=torch.float32)  # (L, 2) as (x, y)
    k = torch.randint(0, 4, loc.shape, device=device).float()
    special = torch.stack([torch.zeros_like(k), torch.ones_like(k), (k + 0.5) / wh[:, None], k / wh[:, None]])
    pick = torch.randint(0, 6, loc.shape, device=device)  # 0-3: a special value, else keep the random one
    loc = torch.where(pick < 4, special.gather(0, pick.clamp(max=3)[None]).squeeze(0), loc)
    weights = torch.randn(B, Lq, heads, L, P, device=device).flatten(-2).softmax(-1).view(B, Lq, heads, L, P)
    spatial_shapes, starts = level_tensors(shapes, device)
    return value, spatial_shapes, starts, loc.to(loc_dtype), weights.to(loc_dtype)


def make_offset_inputs(B, Lq, heads, Dh, shapes, R=2, P=4, dtype=torch.float32, off_dtype=None,
                       ref_batch=None,
                       device=DEVICE):
    """The fused form: (value, shapes, starts, offsets, logits, reference_points) as the modules'
    projections give them. About a fifth of the offsets are exactly 0 on references at exact
    borders and pixel centres; the others move a sample by up to a few pixels (or, for boxes, up to
    the box's size), some off the map."""
    off_dtype = off_dtype or dtype
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(B, S, heads, Dh, device=device).to(dtype)
    ref = torch.rand(ref_batch or B, Lq, L, R, device=device)
    wh = torch.tensor([[w, h] for h, w in shapes], device=device, dtype=torch.float32)  # (L, 2) as (x, y)
    k = torch.randint(0, 4, ref[..., :2].shape, device=device).float()
    special = torch.stack([torch.zeros_like(k), torch.ones_like(k), (k + 0.5) / wh, k / wh])
    pick = torch.randint(0, 6, ref[..., :2].shape, device=device)
    ref[..., :2] = torch.where(pick < 4, special.gather(0, pick.clamp(max=3)[None]).squeeze(0), ref[..., :2])
    if R == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05  # box sizes
    offsets = torch.randn(B, Lq, heads, L, P, 2, device=device) * (2.0 if R == 2 else 1.5)
    offsets = torch.where(torch.rand(B, Lq, heads, L, P, 1, device=device) < 0.2, 0.0, offsets)
    logits = torch.randn(B, Lq, heads, L, P, device=device) * 2
    spatial_shapes, starts = level_tensors(shapes, device)
    return value, spatial_shapes, starts, offsets.to(off_dtype), logits.to(off_dtype), ref


def exact_and_lowp(args):
    value, shapes, starts, loc, w, *ref = args
    ref = [r.double() for r in ref]
    exact = ms_deform_attn_ref(value.double(), shapes, starts, loc.double(), w.double(), *ref)
    return exact, ms_deform_attn_ref(*args)


def run(args, backend):
    """ms_deform_attn on either form of arguments (the fused form's reference points by keyword)."""
    return ms_deform_attn(*args[:5], backend=backend, reference_points=args[5] if len(args) > 5 else None)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", quick_cases(list(CASES), "decoder-dh2"))  # quick: three levels, odd sides
@pytest.mark.parametrize("Lq", [1, 37])
def test_ms_deform_attn_matches_grid_sample(backend, dtype, case, Lq):
    Dh, shapes = CASES[case]
    heads = 3 if Dh >= 128 else 4
    args = make_inputs(2, Lq, heads, Dh, shapes, dtype=dtype)
    out = ms_deform_attn(*args, backend=backend)
    assert out.shape == (2, Lq, heads * Dh) and out.dtype == dtype
    exact, lowp = exact_and_lowp(args)
    assert_close_to_ref(f"{backend} {case} Lq={Lq}", out, exact, lowp, ATOL[dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES)
def test_fused_softmax_and_locations_match_the_modules_steps(backend, dtype, case):
    # The adapter's one set of reference points serves the whole batch (batch 1 broadcast).
    Dh, shapes = CASES[case]
    heads = 3 if Dh >= 128 else 4
    ref_batch = 1 if case.startswith("adapter") else None
    args = make_offset_inputs(2, 37, heads, Dh, shapes, dtype=dtype, ref_batch=ref_batch)
    out = run(args, backend)
    assert out.shape == (2, 37, heads * Dh) and out.dtype == dtype
    exact, lowp = exact_and_lowp(args)
    assert_close_to_ref(f"{backend} fused {case}", out, exact, lowp, ATOL[dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("Lq", [1, 29])
def test_fused_box_references(backend, dtype, Lq):
    # Deformable DETR's decoder with box refinement: 4-coordinate references (x, y, w, h).
    args = make_offset_inputs(2, Lq, 4, 32, CASES["detr-dh32"][1], R=4, dtype=dtype)
    exact, lowp = exact_and_lowp(args)
    assert_close_to_ref(f"{backend} boxes Lq={Lq}", run(args, backend), exact, lowp, ATOL[dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_fp32_offsets_with_bf16_values(backend):
    # The original's fp32 cast under autocast hands fp32 projections next to values in any dtype.
    args = make_offset_inputs(2, 37, 4, 24, CASES["decoder-dh24"][1], dtype=torch.bfloat16,
                              off_dtype=torch.float32)
    exact, lowp = exact_and_lowp(args)
    assert_close_to_ref(f"{backend} fp32 offsets", run(args, backend), exact, lowp, ATOL[torch.bfloat16])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_softmax_is_stable_for_large_logits(backend):
    # exp(90) overflows fp32: the kernels must subtract the maximum as softmax does.
    value, shapes, starts, offsets, logits, ref = make_offset_inputs(1, 17, 2, 12, [(5, 4), (2, 3)])
    logits = logits * 45
    out = ms_deform_attn(value, shapes, starts, offsets, logits, backend=backend, reference_points=ref)
    exact = ms_deform_attn_ref(value.double(), shapes, starts, offsets.double(), logits.double(),
                               ref.double())
    assert torch.isfinite(out).all()
    assert_close_to_ref(f"{backend} large logits", out, exact, exact, ATOL[torch.float32])


def test_offset_locations_is_deformable_detrs_arithmetic():
    # The reference's pre-sampling steps, written out once more from Deformable DETR's formulas.
    value, shapes, starts, offsets, logits, ref = make_offset_inputs(2, 5, 3, 8, [(4, 6), (2, 3)],
                                                                     device="cpu")
    loc, w = offset_locations(ref, offsets, logits, shapes)
    W = shapes[:, 1].float()
    expect_x = ref[:, :, None, :, None, 0] + offsets[..., 0] / W[:, None]
    torch.testing.assert_close(loc[..., 0], expect_x, atol=0, rtol=0)
    torch.testing.assert_close(w.sum((-2, -1)), torch.ones(2, 5, 3))
    box = torch.rand(2, 5, 2, 4)
    loc, _ = offset_locations(box, offsets, logits, shapes)
    y, h = box[:, :, None, :, None, 1], box[:, :, None, :, None, 3]
    torch.testing.assert_close(loc[..., 1], y + offsets[..., 1] / 4 * h * 0.5, atol=0, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES_FULL)
def test_ms_deform_attn_full_level_shapes(backend, case):
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("the interpreter takes minutes at full size; the GPU run covers it")
    Dh, shapes = CASES_FULL[case]
    args = make_inputs(2, 1029, 16, Dh, shapes,
                       dtype=torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    exact, lowp = exact_and_lowp(args)
    assert_close_to_ref(case, ms_deform_attn(*args, backend=backend), exact, lowp, ATOL[args[0].dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_locations_in_the_value_dtype(backend, dtype):
    # Locations and weights may come in value's dtype; the kernel reads them as they are.
    args = make_inputs(1, 29, 2, 24, CASES["decoder-dh24"][1], dtype=dtype, loc_dtype=dtype)
    exact, lowp = exact_and_lowp(args)
    assert_close_to_ref(f"{backend} loc {dtype}", ms_deform_attn(*args, backend=backend), exact, lowp,
                        ATOL[dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_far_and_nan_locations_contribute_nothing(backend):
    args = list(make_inputs(1, 5, 2, 12, [(4, 4), (2, 2)]))
    loc = args[3]
    loc[0, 0] = 1e9  # would overflow an int pixel index
    loc[0, 1] = -1e9
    out = ms_deform_attn(*args, backend=backend)
    assert torch.all(out[0, :2] == 0) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ms_deform_attn_ref(*args), atol=1e-5, rtol=1e-5)


@requires_ext
def test_the_cpu_kernel_refuses_level_shapes_and_starts_that_disagree_with_value():
    # With the CPU kernel the levels live on the host, so the C++ op checks them itself (Python
    # dispatch calls it without reading them): shapes covering more or fewer rows than value has,
    # a non-positive shape and a wrong start are refused before any row is read.
    value, shapes, starts, loc, w = make_inputs(1, 7, 2, 12, [(4, 4)], device="cpu")
    for bad, match in (([[400, 400]], "cover more rows than value has"), ([[0, 4]], "must be positive"),
                       ([[3, 4]], "cover 12 rows but value has S=16"), ([[2**40, 2**40]], "cover more rows")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastdino.ms_deform_attn(value, torch.tensor(bad), starts, loc, w)
    with pytest.raises(RuntimeError, match="level_start_index must be where the levels"):
        torch.ops.fastdino.ms_deform_attn(value, shapes, torch.tensor([3]), loc, w)


@requires_cuda_ext
@pytest.mark.cuda
def test_shapes_that_disagree_with_value_read_nothing_out_of_bounds():
    # On the device the shapes are not checked against value (that would synchronise): rows past
    # value's end must be skipped, not read.
    value, shapes, starts, loc, w = make_inputs(1, 7, 2, 12, [(4, 4)], device="cuda")
    big = torch.tensor([[400, 400]], dtype=torch.int64, device="cuda")
    out = torch.ops.fastdino.ms_deform_attn(value, big, starts, loc, w)
    assert torch.isfinite(out).all()


@pytest.mark.quick
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0].flatten(2)),
         r"value must be \(B, S, heads, Dh\), got \(1, 16, 24\)"),
        (lambda a: a.__setitem__(3, a[3][:, :, :1]), r"sampling_locations must be \(B=1, Lq, heads=2"),
        (lambda a: a.__setitem__(4, a[4][..., :3]), r"attention_weights must be \(1, 7, 2, 1, 4\)"),
        (lambda a: a.__setitem__(1, torch.tensor([[4, 5]])),
         "spatial_shapes cover 20 rows but value has S=16"),
        (lambda a: a.__setitem__(2, torch.zeros(2, dtype=torch.int64)),
         r"level_start_index must be \(L=1,\)"),
    ],
    ids=["value", "locations", "weights", "shapes", "starts"],
)
def test_bad_arguments_are_named(mutate, match):
    args = list(make_inputs(1, 7, 2, 12, [(4, 4)], device="cpu"))
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*args)


def test_bad_reference_points_are_named():
    value, shapes, starts, offsets, logits, ref = make_offset_inputs(2, 7, 2, 12, [(4, 4)], device="cpu")
    expected = r"reference_points must be \(B=2 or 1, Lq=7, L=1, 2 or 4\), got \(2, 7, 1, 3\)"
    with pytest.raises(ValueError, match=expected):
        ms_deform_attn(value, shapes, starts, offsets, logits, reference_points=torch.rand(2, 7, 1, 3))
    with pytest.raises(ValueError, match="reference_points is torch.float64, not torch.float32"):
        ms_deform_attn(value, shapes, starts, offsets, logits, backend="triton",
                       reference_points=ref.double())
    with pytest.raises(ValueError, match="reference_points is not contiguous"):
        ms_deform_attn(value, shapes, starts, offsets, logits, backend="triton",
                       reference_points=ref.transpose(0, 1).contiguous().transpose(0, 1))
    # dispatch takes the reference for what no kernel reads, and gives the same numbers
    assert OP.pick(value, shapes, starts, offsets, logits, ref.double())[0] == "ref"
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, offsets, logits,
                                              reference_points=ref.double()),
                               ms_deform_attn_ref(value, shapes, starts, offsets, logits, ref))


@pytest.mark.quick
def test_kernels_refuse_bad_layouts_by_name():
    value, shapes, starts, loc, w = make_inputs(1, 7, 2, 12, [(4, 4)], device="cpu")
    with pytest.raises(ValueError, match="spatial_shapes is torch.int32, not torch.int64"):
        ms_deform_attn(value, shapes.int(), starts, loc, w, backend="triton")
    with pytest.raises(ValueError, match="value is not contiguous"):
        ms_deform_attn(value.transpose(1, 2).contiguous().transpose(1, 2), shapes, starts, loc, w,
                       backend="triton")
    with pytest.raises(ValueError, match="sampling_locations is torch.float64, not float32"):
        ms_deform_attn(value, shapes, starts, loc.double(), w.double(), backend="triton")
    assert OP.pick(value, shapes, starts, loc, w)[0] == ("cpu" if _ext.HAS_EXT else "ref")


@requires_ext
def test_cpp_op_names_bad_arguments():
    value, shapes, starts, loc, w = make_inputs(1, 7, 2, 12, [(4, 4)], device="cpu")
    with pytest.raises(RuntimeError, match="spatial_shapes must be int64"):
        torch.ops.fastdino.ms_deform_attn(value, shapes.int(), starts, loc, w)
    with pytest.raises(RuntimeError,
                       match="attention_weights has dtype Half but sampling_locations has Float"):
        torch.ops.fastdino.ms_deform_attn(value, shapes, starts, loc, w.half())
    with pytest.raises(RuntimeError, match="reference_points must be float32, got Double"):
        torch.ops.fastdino.ms_deform_attn(value, shapes, starts, loc, w, torch.rand(1, 7, 1, 2,
                                                                                    dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"reference_points must be \(B=1 or 1, Lq=7, L=1, 2 or 4\)"):
        torch.ops.fastdino.ms_deform_attn(value, shapes, starts, loc, w, torch.rand(1, 7, 2, 2))


OPCHECK_INPUTS = {"locations": lambda: make_inputs(1, 5, 2, 12, [(4, 3), (2, 2)]),
                  "offsets": lambda: make_offset_inputs(2, 5, 2, 12, [(4, 3), (2, 2)], ref_batch=1)}


@pytest.mark.parametrize("form", OPCHECK_INPUTS)
def test_opcheck_triton(form):
    from fastdino.ops.ms_deform_attn import ms_deform_attn_triton

    torch.library.opcheck(ms_deform_attn_triton, OPCHECK_INPUTS[form]())


@requires_ext
@pytest.mark.parametrize("form", OPCHECK_INPUTS)
def test_opcheck_cpp(form):
    torch.library.opcheck(torch.ops.fastdino.ms_deform_attn.default, OPCHECK_INPUTS[form]())


@requires_cuda_ext
def test_cuda_path_does_not_synchronise():
    args = make_inputs(2, 97, 4, 24, CASES["decoder-dh24"][1], dtype=torch.bfloat16)
    fused = make_offset_inputs(2, 97, 4, 24, CASES["decoder-dh24"][1], dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ("cuda", "triton"):
            run(args, backend)
            run(fused, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


BACKENDS_ON_CPU = [None, "triton", "ref"] + (["cpu"] if _ext.HAS_EXT else [])


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("starts", [[0, 1000], [6, 0]], ids=["past-the-end", "reordered"])
def test_level_start_index_must_be_the_packed_levels(starts, backend):
    # Starts past the value's end once ran on every backend, and reordered starts gave kernels and
    # reference different answers (the reference assumes packed levels).
    value, shapes, _, loc, w = make_inputs(2, 3, 2, 4, [(4, 5), (2, 3)], device="cpu")
    with pytest.raises(ValueError, match=r"level_start_index must be \[0, 20\]"):
        ms_deform_attn(value, shapes, torch.tensor(starts), loc, w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_value_length_float_shapes_and_integer_values_are_named(backend):
    value, shapes, starts, loc, w = make_inputs(2, 3, 2, 4, [(4, 5), (2, 3)], device="cpu")
    with pytest.raises(ValueError, match="spatial_shapes cover 26 rows but value has S=10"):
        ms_deform_attn(value[:, :10].contiguous(), [(4, 5), (2, 3)], None, loc, w, backend=backend)
    with pytest.raises(ValueError, match=r"spatial_shapes must be L=2 pairs of int \(H, W\)"):
        ms_deform_attn(value, [(4.0, 5.0), (2.0, 3.0)], None, loc, w, backend=backend)
    with pytest.raises(ValueError, match="spatial_shapes must hold integer"):
        ms_deform_attn(value, shapes.float(), starts, loc, w, backend=backend)
    with pytest.raises(ValueError, match="value must be floating point, got torch.int32"):
        ms_deform_attn(value.int(), shapes, starts, loc, w, backend=backend)


@requires_cuda_ext
@pytest.mark.cuda
def test_kernels_derive_level_starts_from_the_shapes():
    # On CUDA tensors the index cannot be checked without a host sync. The kernels never read it:
    # each level's first row comes from the shapes (packed levels), so a wrong index, here passed to
    # the C++ op directly past the Python checks, changes nothing and reads nothing out of bounds.
    value, shapes, starts, loc, w = make_inputs(2, 7, 2, 4, [(4, 5), (2, 3)], device="cuda")
    expected = ms_deform_attn_ref(value, shapes, starts, loc, w)
    for wrong in ([0, 1000], [6, 0], [-50, 3]):
        wrong = torch.tensor(wrong, device="cuda")
        out = torch.ops.fastdino.ms_deform_attn(value, shapes, wrong, loc, w, None)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_shapes_past_the_value_read_nothing_beyond_it(backend):
    # Level shapes held on the device that cover more rows than value has (unchecked there): rows
    # past S are never read, so the result is the reference's on value padded with zero rows.
    value, shapes, starts, loc, w = make_inputs(1, 9, 2, 4, [(4, 5), (2, 3)])
    big = torch.tensor([[4, 5], [3, 3]], device=DEVICE)  # 29 rows
    starts = torch.tensor([0, 20], device=DEVICE)
    padded = torch.cat([value, value.new_zeros(1, 3, 2, 4)], dim=1)
    expected = ms_deform_attn_ref(padded, big, starts, loc, w)
    if backend == "cpu":  # host-held levels: the C++ op checks them (test above)
        with pytest.raises(RuntimeError, match="cover more rows"):
            torch.ops.fastdino.ms_deform_attn(value, big, starts, loc, w, None)
        return
    if backend == "triton":
        from fastdino.kernels.ms_deform_attn import ms_deform_attn_fwd

        out = torch.empty(1, 9, 8, device=DEVICE)
        ms_deform_attn_fwd(value, big, loc, w, out)
    else:
        out = torch.ops.fastdino.ms_deform_attn(value, big, starts, loc, w, None)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, "ref"] + (["cpu"] if _ext.HAS_EXT else []))
def test_host_level_shapes_are_checked_on_every_call(backend):
    # Dispatch keeps its decision per signature (shapes, dtypes, strides), which says nothing of the
    # values of level shapes held on the host: those are read on every call, an in-place edit too.
    value, shapes, starts, loc, w = make_inputs(1, 5, 2, 8, [(4, 4), (2, 2)], device="cpu")
    for _ in range(2):
        ms_deform_attn(value, shapes, starts, loc, w, backend=backend)
    shapes[0, 1] = 5
    with pytest.raises(ValueError, match="spatial_shapes cover 24 rows but value has S=20"):
        ms_deform_attn(value, shapes, starts, loc, w, backend=backend)
    shapes[0, 1] = 4
    ms_deform_attn(value, shapes, starts, loc, w, backend=backend)
    with pytest.raises(ValueError, match="level_start_index must be"):
        ms_deform_attn(value, shapes, torch.tensor([0, 15]), loc, w, backend=backend)
