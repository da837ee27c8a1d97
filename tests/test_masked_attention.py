"""masked_attention: every backend against the models' mask construction + attention in float64,
with the tolerance rule of helpers; the mask rule itself (sigmoid rounding, lifted rows)."""

import pytest
import torch
from helpers import ATOL, DEVICE, DTYPES, assert_close_to_ref, quick_cases, requires_cuda_ext, requires_ext

from fastdino import _ext
from fastdino.kernels.masked_attention import MASK_THRESHOLDS, masked_attention_config, masked_attention_fwd
from fastdino.ops._dispatch import Like
from fastdino.ops.masked_attention import (
    OP,
    blocked_keys,
    masked_attention,
    masked_attention_ref,
    masked_attention_triton,
    reasons,
)

# (B, Lq, Lk, H, D). Mask2Former's decoder: 100 queries over one level, 8 or 16 heads, head dim =
# hidden / heads (256/16 = 16, 384/16 = 24, 256/8 = 32, 2048/16 = 128, 32/16 = 2); odd sizes.
SHAPES_FULL = [(1, 100, 1024, 16, 16), (2, 100, 4096, 8, 32), (1, 100, 1024, 16, 24), (1, 100, 256, 16, 128),
               (2, 100, 256, 16, 2), (1, 100, 16384, 16, 24), (3, 7, 97, 3, 5), (1, 1, 1, 1, 2), (2, 37, 1029,
                                                                                                  4, 64)]
# Under the Triton interpreter every program runs serially on the CPU: fewer keys and queries.
SHAPES_INTERP = [(1, 10, 64, 4, 16), (2, 13, 97, 2, 24), (1, 9, 33, 3, 2), (1, 5, 70, 2, 128), (1, 1, 1, 1,
                                                                                                5),
                 (2, 17, 40, 2, 32)]
# `pytest -m quick`: odd queries and keys (partial tiles), a head dim that is not a power of 2
QUICK, QUICK_FULL = (2, 13, 97, 2, 24), (3, 7, 97, 3, 5)
TRITON_SHAPES = (quick_cases(SHAPES_FULL, QUICK_FULL) if DEVICE.type == "cuda"
                 else quick_cases(SHAPES_INTERP, QUICK))


def make_inputs(B, Lq, Lk, H, D, dtype, mask_dtype=None, device=DEVICE):
    """q, k, v as nn.MultiheadAttention's projections lay them out (sequence-first, strided views),
    and mask logits with a realistic mix: most keys blocked, some rows fully blocked, logits on and
    within a rounding of 0."""
    C = H * D
    q = torch.randn(Lq, B, C, device=device, dtype=dtype).view(Lq, B, H, D).transpose(0, 1)
    kv = torch.randn(Lk, B, 2 * C, device=device, dtype=dtype)
    k, v = (t.view(Lk, B, H, D).transpose(0, 1) for t in kv.split(C, dim=-1))
    logits = torch.randn(B, Lq, Lk, device=device) * 3 - 2  # ~75% blocked
    logits[:, ::4] = -torch.rand(B, (Lq + 3) // 4, Lk, device=device) - 0.1  # every 4th row fully blocked
    flat = logits.view(-1)
    flat[torch.randperm(flat.numel(), device=device)[: flat.numel() // 20]] = 0.0
    # sigmoid rounds to 0.5 in bf16
    flat[torch.randperm(flat.numel(), device=device)[: flat.numel() // 20]] = -1e-4
    return q, k, v, logits.to(mask_dtype or dtype)


def check_backend(backend, shape, dtype, mask_dtype=None, device=DEVICE, masked=True):
    q, k, v, logits = make_inputs(*shape, dtype, mask_dtype, device)
    if not masked:
        logits = None
    out = masked_attention(q, k, v, logits, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    exact = masked_attention_ref(q.double(), k.double(), v.double(), logits)  # the same logits: the same mask
    lowp = masked_attention_ref(q, k, v, logits)
    assert_close_to_ref(f"{backend} {shape} {dtype}", out, exact, lowp, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_masked_attention_triton_matches_ref(shape, dtype):
    check_backend("triton", shape, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_masked_attention_triton_fp32_logits_and_no_mask(dtype):
    shape = SHAPES_INTERP[1]
    check_backend("triton", shape, dtype, mask_dtype=torch.float32)
    check_backend("triton", shape, dtype, masked=False)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", quick_cases(SHAPES_INTERP + [(1, 100, 1024, 16, 16), (2, 100, 256, 8, 32)],
                                              QUICK), ids=str)
def test_masked_attention_cpu_matches_ref(shape, dtype):
    check_backend("cpu", shape, dtype, device="cpu")
    if dtype != torch.float32:
        check_backend("cpu", shape, dtype, mask_dtype=torch.float32, device="cpu")


@requires_ext
def test_masked_attention_cpu_without_mask():
    check_backend("cpu", (2, 13, 97, 2, 24), torch.float32, device="cpu", masked=False)


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", quick_cases(SHAPES_FULL, QUICK_FULL), ids=str)
def test_masked_attention_cuda_matches_ref(shape, dtype):
    check_backend("cuda", shape, dtype, device="cuda")
    if dtype != torch.float32:
        check_backend("cuda", shape, dtype, mask_dtype=torch.float32, device="cuda")
    check_backend("cuda", shape, dtype, device="cuda", masked=False)


def kernel_backends(device):
    backends = ["triton"]
    if _ext.HAS_EXT and (device.type == "cpu" or _ext.BUILD["cuda"]):
        backends.append(device.type)
    return backends


def test_blocked_keys_is_the_decoders_rule():
    """sigmoid < 0.5 in the logits' dtype, and an all-blocked row lifted, as the decoders build it."""
    logits = torch.tensor([[[-1e-4, 1e-4, 0.0, -3.0], [-1.0, -2.0, -0.5, -9.0]]])
    assert blocked_keys(logits.bfloat16()).tolist() == [[[False, False, False, True], [False] * 4]]
    assert blocked_keys(logits).tolist() == [[[True, False, False, True], [False] * 4]]
    # transformers' Mask2FormerMaskPredictor + its decoder's row rule, written out
    ref = (logits.sigmoid().unsqueeze(1).repeat(1, 3, 1, 1).flatten(0, 1) < 0.5).bool()
    ref = ref * (ref.sum(-1) != ref.shape[-1]).to(ref.dtype).unsqueeze(-1)
    assert torch.equal(blocked_keys(logits).repeat(3, 1, 1), ref)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mask_thresholds_are_torchs_sigmoid_test(dtype):
    """`logit < threshold` is `sigmoid(logit) < 0.5` in that dtype: checked on the threshold, its
    neighbours in the dtype, and a sweep of small negative logits. In float32 torch's own sigmoids
    disagree within (-2^-22, 0) (the CPU one flips at -3 * 2^-24, a correctly rounded one at
    -2^-24), so the sweep starts there."""
    t = torch.tensor(MASK_THRESHOLDS[str(dtype).split(".")[1]], dtype=dtype)
    if dtype == torch.float32:
        x = -torch.logspace(-22, 0, 20001, base=2)
    else:
        around = [torch.nextafter(t.float(), torch.tensor(-1.0)).to(dtype), t,
                  torch.nextafter(t.float(), torch.tensor(1.0)).to(dtype)]
        x = torch.cat([torch.stack(around), -torch.logspace(-30, 0, 20001, base=2).to(dtype)])
    for d in ("cpu", DEVICE):
        x = x.to(d)
        assert torch.equal(x.sigmoid() < 0.5, x < t.to(d)), d


@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_attention_kernels_apply_the_rule_exactly(logit_dtype):
    """One open key per row decides the output: a kernel that blocked by `logit < 0`, or did not
    lift blocked rows, returns another row of v."""
    B, Lq, Lk, H, D = 1, 6, 40, 2, 16
    q, k, v = (torch.randn(B, n, H, D, device=DEVICE, dtype=logit_dtype) for n in (Lq, Lk, Lk))
    logits = torch.full((B, Lq, Lk), -5.0, device=DEVICE)
    for i in range(Lq - 1):
        logits[0, i, 3 * i] = 0.0  # sigmoid(0) = 0.5: open
        logits[0, i, 3 * i + 1] = -1e-4  # open in bf16 (sigmoid rounds to 0.5), blocked in fp32
    logits = logits.to(logit_dtype)  # the last row has every key blocked: it attends to all
    exact = masked_attention_ref(q.double(), k.double(), v.double(), logits)
    for backend in kernel_backends(DEVICE):
        out = masked_attention(q, k, v, logits, backend=backend)
        tol = 1e-5 if logit_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol, msg=backend)
    if logit_dtype == torch.float32:  # one open key: the output is that key's value row
        torch.testing.assert_close(exact[0, 0], v[0, 0].double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_masked_attention_triton_split_keys_match_ref(splits, dtype):
    """The split-key schedule (what batch 1 runs on a GPU) forced on a small problem: each split's
    partial output and statistics, rescaled and combined. Rows open in the last split only, in the
    first only, fully blocked (lifted), and the usual mix."""
    B, Lq, Lk, H, D = 2, 9, 200, 2, 24  # 7 key blocks of 32: splits of 3, 3, 1 blocks at splits=3
    q, k, v, logits = make_inputs(B, Lq, Lk, H, D, dtype, torch.float32)
    logits[:, 1] = -5.0
    logits[:, 1, Lk - 1] = 1.0  # open only in the last split (the one partial key block)
    logits[:, 2] = -5.0
    logits[:, 2, :3] = 1.0  # open only in the first split
    logits[:, 3] = -5.0
    logits[:, 3, 100] = 1.0  # open only in a middle split (96..191 at splits=3)
    out = torch.empty(q.shape, dtype=dtype, device=DEVICE)
    masked_attention_fwd(q, k, v, logits, D**-0.5, out, interpret=_ext.INTERPRET, splits=splits)
    exact = masked_attention_ref(q.double(), k.double(), v.double(), logits)
    lowp = masked_attention_ref(q, k, v, logits)
    assert_close_to_ref(f"split {splits} {dtype}", out, exact, lowp, ATOL[dtype])
    # no mask: the decoder's self-attention, split the same way
    masked_attention_fwd(q, k, v, None, D**-0.5, out, interpret=_ext.INTERPRET, splits=splits)
    exact, lowp = masked_attention_ref(q.double(), k.double(), v.double()), masked_attention_ref(q, k, v)
    assert_close_to_ref(f"split {splits} {dtype} no mask", out, exact, lowp, ATOL[dtype])


def test_masked_attention_triton_split_keys_keep_nan_where_the_models_do():
    """A NaN in a blocked key's value row reaches every query's channel (weight 0 times NaN), and a
    NaN score of an open key its row, through the combine step as in one pass."""
    B, Lq, Lk, H, D = 1, 5, 130, 2, 16
    q, k, v, logits = make_inputs(B, Lq, Lk, H, D, torch.float32, torch.float32)
    logits[:, :, 128:] = -5.0  # the third of three splits (keys 128, 129): no open key for any row,
    v[0, 129, 1, 3] = float("nan")  # so only 0 * NaN in the combine step carries this NaN
    k[0, 5, 0, :] = float("nan")
    logits[0, 4, 5] = 1.0  # open for row 4 only: that row's head-0 output is NaN
    logits[0, :4, 5] = -5.0
    out = torch.empty(q.shape, dtype=q.dtype, device=DEVICE)
    masked_attention_fwd(q, k, v, logits, D**-0.5, out, interpret=_ext.INTERPRET, splits=3)
    ref = masked_attention_ref(q, k, v, logits)
    assert ref.isnan().any() and not ref.isnan().all()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-5)


def test_masked_attention_triton_packs_rows_longer_than_one_step():
    """Rows of more than PACK_BLOCK (1024) keys: the pack kernel's later steps and their words, a
    row lifted only after its last step, split keys over them."""
    B, Lq, Lk, H, D = 1, 4, 1100, 1, 16
    q, k, v, logits = make_inputs(B, Lq, Lk, H, D, torch.float32, torch.float32)
    logits[0, 1] = -5.0
    logits[0, 1, 1090] = 1.0  # its one open key in the pack kernel's second step
    logits[0, 2] = -5.0  # every key blocked: lifted after the second step
    out = torch.empty(q.shape, dtype=q.dtype, device=DEVICE)
    exact = masked_attention_ref(q.double(), k.double(), v.double(), logits)
    for splits in (1, 4):
        masked_attention_fwd(q, k, v, logits, D**-0.5, out, interpret=_ext.INTERPRET, splits=splits)
        lowp = masked_attention_ref(q, k, v, logits)
        assert_close_to_ref(f"pack 1100 keys, split {splits}", out, exact, lowp, ATOL[torch.float32])
    torch.testing.assert_close(out[0, 1, 0].double(), v[0, 1090, 0].double(), atol=1e-6, rtol=0)


def test_masked_attention_config_splits_keys_only_to_fill_the_sms():
    # batch 1, 8 heads, 100 queries over a 64x64 level: 8 programs unsplit, 16 splits of 8 key blocks
    assert masked_attention_config(1, 8, 100, 4096, 32, 2) == (128, 32, 8, 2, 16)
    assert masked_attention_config(32, 8, 100, 4096, 32, 2)[4] == 1  # 256 programs already
    assert masked_attention_config(1, 8, 100, 100, 32, 2)[4] == 1  # self-attention: 4 key blocks
    problems = [(1, 16, 100, 1024, 16, 2), (1, 8, 200, 16384, 128, 4), (2, 3, 7, 97, 5, 2)]
    for B, H, Lq, Lk, D, nbytes in problems:
        block_m, block_n, _, _, splits = masked_attention_config(B, H, Lq, Lk, D, nbytes)
        programs = B * H * -(-Lq // block_m)
        assert splits == 1 or (programs * splits <= 132 and -(-Lk // block_n) >= 4 * splits)


@pytest.mark.quick
def test_masked_attention_dispatch():
    q, k, v, logits = make_inputs(1, 4, 8, 2, 16, torch.float32, device="cpu")
    assert OP.pick(q, k, v, logits)[0] == "ref"  # measured faster than the C++ CPU kernel
    q.requires_grad_(True)
    with torch.enable_grad():  # grad: dispatch picks the reference on any device; pinned kernels still run
        on_cuda = [Like(torch.device("cuda"), t.dtype, t.shape, t.requires_grad) for t in (q, k, v, logits)]
        backend, skipped = OP.pick(*on_cuda)
        assert backend == "ref" and all("inputs require grad" in r[-1] for r in skipped.values())
        assert OP.choose("triton", q, k, v, logits) == "triton"
    qkv = Like(torch.device("cpu"), torch.float32, (1, 1, 1, 160))
    assert reasons("triton", qkv, qkv, qkv) == ["head dim 160 is not in 1..128"]


@pytest.mark.quick
@pytest.mark.parametrize("backend", ["triton", "cpu", "ref"])
def test_masked_attention_errors_name_the_argument(backend):
    if backend == "cpu" and not _ext.HAS_EXT:
        pytest.skip("fastdino._C not built")
    q, k, v, logits = make_inputs(2, 5, 9, 2, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="mask_logits must be .B=2, Lq=5, Lk=9."):
        masked_attention(q, k, v, logits[:, :4], backend=backend)
    with pytest.raises(ValueError, match="k must be .B=2, Lk, H=2, D=16."):
        masked_attention(q, k[..., :8], v, logits, backend=backend)
    with pytest.raises(ValueError, match="v has shape"):
        masked_attention(q, k, v[:, :3], logits, backend=backend)
    with pytest.raises(ValueError, match="no keys"):
        masked_attention(q, k[:, :0], v[:, :0], logits[..., :0], backend=backend)
    with pytest.raises(ValueError, match="q must be .B, Lq, H, D."):
        masked_attention(q[0], k, v, logits, backend=backend)
    if backend != "ref":
        with pytest.raises(ValueError, match="mask_logits has dtype torch.float64"):
            masked_attention(q, k, v, logits.double(), backend=backend)
        with pytest.raises(ValueError, match="k has dtype torch.float16 != q.dtype"):
            masked_attention(q, k.half(), v, logits, backend=backend)
        with pytest.raises(ValueError, match="q has stride 2 along the head dim"):
            masked_attention(torch.randn(2, 5, 2, 32)[..., ::2], k, v, logits, backend=backend)
        with pytest.raises(ValueError, match="head dim 130 is not in 1..128"):
            masked_attention(*(torch.randn(1, 3, 1, 130) for _ in range(3)), backend=backend)


@requires_ext
def test_masked_attention_cpp_checks_its_arguments():
    """The C++ op called directly (no Python checks in front) raises, never reads out of bounds."""
    q, k, v, logits = make_inputs(2, 5, 9, 2, 16, torch.float32, device="cpu")
    op = torch.ops.fastdino.masked_attention
    with pytest.raises(RuntimeError, match=r"mask_logits must be \(B=2, Lq=5, Lk=9\), got shape \(2, 5, 8\)"):
        op(q, k, v, logits[..., :8], 0.25)
    with pytest.raises(RuntimeError, match="mask_logits must be float32 or q's dtype"):
        op(q, k, v, logits.double(), 0.25)
    with pytest.raises(RuntimeError, match="head dim must be in 1..128, got 160"):
        op(*(torch.randn(1, 3, 1, 160) for _ in range(3)), None, 0.25)
    with pytest.raises(RuntimeError, match="k and v have no keys"):
        op(q, k[:, :0], v[:, :0], None, 0.25)


@requires_ext
def test_masked_attention_opcheck():
    q, k, v, logits = make_inputs(1, 6, 20, 2, 24, torch.float32, device="cpu")
    torch.library.opcheck(torch.ops.fastdino.masked_attention, (q, k, v, logits, 0.2))
    torch.library.opcheck(torch.ops.fastdino.masked_attention, (q, k, v, None, 0.2))


def test_masked_attention_triton_opcheck():
    q, k, v, logits = make_inputs(1, 6, 20, 2, 24, torch.float32, device=DEVICE)
    torch.library.opcheck(masked_attention_triton, (q, k, v, logits, 0.2))


@pytest.mark.parametrize("backend", [None, "triton", "ref"] + (["cpu"] if _ext.HAS_EXT else []))
def test_bool_mask_head_dim_0_and_integer_inputs_are_named(backend):
    # A boolean mask once ran as no mask at all on the default path.
    q, k, v, logits = make_inputs(1, 4, 9, 2, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="mask_logits must be the floating-point mask logits .*torch.bool"):
        masked_attention(q, k, v, logits > 0, backend=backend)
    with pytest.raises(ValueError, match="q has head dim 0"):
        masked_attention(*(torch.randn(1, 3, 2, 0) for _ in range(3)), backend=backend)
    with pytest.raises(ValueError, match="q must be floating point, got torch.int32"):
        masked_attention(*(torch.ones(1, 3, 2, 8, dtype=torch.int32) for _ in range(3)), backend=backend)
