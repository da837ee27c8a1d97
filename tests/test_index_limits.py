"""Index and grid limits: every kernel indexes in 64 bits, or its op's reasons refuse the input with
the argument and the limit named, so that dispatch passes that backend by and a pinned one raises
ValueError; and every launch runs along grid axis 0 (axes 1 and 2 stop at 65535).

Nothing large is allocated: the arguments are `Like` descriptions or meta tensors, and the Triton
launchers run against a stand-in that records the grid instead of launching. Each limit is tested
on both sides (one element more is refused, the limit itself is accepted). The tests marked
requires_cuda launch past 65535 programs on a GPU, with small tensors.
"""

import importlib
import re

import pytest
import torch
import triton
from helpers import requires_cuda, requires_cuda_ext, requires_ext

import fastdino.kernels.add_layer_norm as k_add_layer_norm
import fastdino.kernels.dwconv_layer_norm as k_dwconv_layer_norm
import fastdino.kernels.fused_linear as k_fused_linear
import fastdino.kernels.masked_attention as k_masked_attention
import fastdino.kernels.ms_deform_attn as k_ms_deform_attn
import fastdino.kernels.rope_attention as k_rope_attention
from fastdino import _ext, selfcheck
from fastdino.kernels import GRID_LIMIT, INDEX_LIMIT, TILED_LIMIT
from fastdino.ops import _dispatch
from fastdino.ops._dispatch import Like

# the op modules (fastdino.ops' attributes of these names are the functionals)
add_layer_norm_op = importlib.import_module("fastdino.ops.add_layer_norm")
dwconv_layer_norm_op = importlib.import_module("fastdino.ops.dwconv_layer_norm")
fused_linear_op = importlib.import_module("fastdino.ops.fused_linear")
masked_attention_op = importlib.import_module("fastdino.ops.masked_attention")
ms_deform_attn_op = importlib.import_module("fastdino.ops.ms_deform_attn")
rope_attention_op = importlib.import_module("fastdino.ops.rope_attention")

CUDA = torch.device("cuda")
META = torch.device("meta")
BF16 = torch.bfloat16
LIMIT = "(limit 2**31 - 1)"
TILED = "(limit 2**31 - 1025)"


def test_the_limits_are_what_the_kernels_hold():
    assert INDEX_LIMIT == torch.iinfo(torch.int32).max
    assert GRID_LIMIT == 2**31 - 1  # CUDA's grid axis 0; axes 1 and 2 hold 65535
    # the widest tile along a dim the Triton kernels number: the pack kernel's keys
    assert TILED_LIMIT == INDEX_LIMIT - k_masked_attention.PACK_BLOCK


@pytest.fixture
def gpu_build(monkeypatch):
    """Dispatch as on a machine with a GPU and a CUDA build of fastdino._C whose self-checks passed:
    the build and the self-check give no reasons, so what remains are the ops' own."""
    monkeypatch.setattr(_ext, "HAS_EXT", True)
    monkeypatch.setitem(_ext.BUILD, "cuda", True)
    monkeypatch.setattr(_dispatch, "_KERNEL_REASONS", {})
    monkeypatch.setattr(selfcheck, "reasons", lambda *args: [])


def first_then_ref(monkeypatch, op, backend):
    """The op's CUDA priority with `backend` alone before the reference."""
    monkeypatch.setitem(op.priority, "cuda", (backend, "ref"))


def limit_reasons(op, backend, args, text):
    """The reasons of `op.runnable(backend, *args)` that mention `text`."""
    return [r for r in op.runnable(backend, *args) if text in r]


def assert_refused(monkeypatch, op, backend, args, *texts):
    """`backend` is refused with one reason holding every text; pick passes it by for the reference,
    and pinned it raises ValueError with that reason."""
    why = limit_reasons(op, backend, args, texts[0])
    assert len(why) == 1 and all(t in why[0] for t in texts), op.runnable(backend, *args)
    first_then_ref(monkeypatch, op, backend)
    picked, skipped = op.pick(*args)
    assert picked == "ref" and why[0] in skipped[backend]
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run: .*{re.escape(texts[0])}"):
        op.choose(backend, *args)


def assert_accepted(monkeypatch, op, backend, args):
    """`backend` can run `args`: no reasons at all, and pick chooses it."""
    assert op.runnable(backend, *args) == []
    first_then_ref(monkeypatch, op, backend)
    assert op.pick(*args) == (backend, {})
    assert op.choose(backend, *args) == backend


class Recorder:
    """Stands in for a @triton.jit kernel: records the grid of each launch and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def record(monkeypatch, module, *names):
    recorders = [Recorder() for _ in names]
    for name, rec in zip(names, recorders):
        monkeypatch.setattr(module, name, rec)
    return recorders


def meta(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device=META)


# -- ms_deform_attn ------------------------------------------------------------------------------


def ms_args(B, S, Hh, Dh, Lq=64, L=3, P=4, device=CUDA):
    L2 = Like(device, torch.int64, (L, 2)), Like(device, torch.int64, (L,))
    return (Like(device, BF16, (B, S, Hh, Dh)), *L2, Like(device, torch.float32, (B, Lq, Hh, L, P, 2)),
            Like(device, torch.float32, (B, Lq, Hh, L, P)), Like(device, torch.float32, (B, Lq, L, 2)))


def test_ms_deform_attn_triton_refuses_a_batch_item_of_value_past_int32(gpu_build, monkeypatch):
    op = ms_deform_attn_op.OP
    S = 2**31 // (8 * 32)  # S * heads * Dh = 2**31
    assert_refused(monkeypatch, op, "triton", ms_args(2, S, 8, 32),
                   "value has 2147483648 elements per batch item", "32-bit offsets", LIMIT)
    assert_accepted(monkeypatch, op, "triton", ms_args(2, S - 1, 8, 32))
    # the C++ kernels index in 64 bits
    assert_accepted(monkeypatch, op, "cuda", ms_args(2, S, 8, 32))


def test_ms_deform_attn_triton_refuses_query_heads_past_int32(gpu_build, monkeypatch):
    op = ms_deform_attn_op.OP
    B, Lq, Hh = 2**10, 2**18, 8  # 2**31 query-heads, numbered in int32 by the Triton kernel
    assert_refused(monkeypatch, op, "triton", ms_args(B, 100, Hh, 32, Lq=Lq),
                   "sampling_locations has 2147483648 query-heads", "32-bit integers", LIMIT)
    assert_accepted(monkeypatch, op, "triton", ms_args(B, 100, Hh, 32, Lq=Lq - 1))
    # the C++ kernels index in 64 bits
    assert_accepted(monkeypatch, op, "cuda", ms_args(B, 100, Hh, 32, Lq=Lq))
    # 131072 (batch, head) pairs: past 65535, on the Triton grid's one axis
    assert_accepted(monkeypatch, op, "triton", ms_args(2**14, 100, 8, 32, Lq=5376))


def test_ms_deform_attn_refuses_counts_past_int32(gpu_build, monkeypatch):
    op = ms_deform_attn_op.OP
    # the Triton kernel numbers queries as block * BLOCK_Q + arange(BLOCK_Q)
    assert_refused(monkeypatch, op, "triton", ms_args(1, 100, 1, 32, Lq=TILED_LIMIT + 1),
                   f"sampling_locations has {TILED_LIMIT + 1} queries (Lq)", TILED)
    assert_accepted(monkeypatch, op, "triton", ms_args(1, 100, 1, 32, Lq=TILED_LIMIT))
    # the C++ kernels hold the samples of a query-head (L * P) in an int
    for backend in ("cuda", "cpu"):
        device = torch.device(backend)
        monkeypatch.setitem(op.priority, backend, (backend, "ref"))
        args = ms_args(1, 100, 8, 32, L=2**16, P=2**15, device=device)
        why = [r for r in op.runnable(backend, *args) if "samples per query-head" in r]
        assert why == ["value has 8 heads of 32 channels, sampling_locations 65536 * 32768 samples per "
                       "query-head; the C++ kernels count each in 32 bits (limit 2**31 - 1)"]
        assert op.pick(*args)[0] == "ref"
        assert op.runnable(backend, *ms_args(1, 100, 8, 32, L=2**31 - 1, P=1, device=device)) == []


def test_ms_deform_attn_pinned_triton_names_value(monkeypatch):
    value = meta(1, 2**31 // 8 + 1, 8, 1)
    L = 1
    shapes, starts = meta(L, 2, dtype=torch.int64), meta(L, dtype=torch.int64)
    loc, attw = meta(1, 3, 8, L, 4, 2, dtype=torch.float32), meta(1, 3, 8, L, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"value has 2147483656 elements per batch item.*limit 2\*\*31 - 1"):
        ms_deform_attn_op.ms_deform_attn(value, shapes, starts, loc, attw, backend="triton")


def test_ms_deform_attn_triton_grid_has_one_axis(monkeypatch):
    B, S, Hh, Dh, Lq, L, P = 8192, 20, 16, 32, 10, 2, 2
    (rec,) = record(monkeypatch, k_ms_deform_attn, "_ms_deform_attn_fwd_kernel")
    k_ms_deform_attn.ms_deform_attn_fwd(meta(B, S, Hh, Dh), meta(L, 2, dtype=torch.int64),
                                        meta(B, Lq, Hh, L, P, 2, dtype=torch.float32),
                                        meta(B, Lq, Hh, L, P, dtype=torch.float32), meta(B, Lq, Hh * Dh))
    block_q = k_ms_deform_attn.ms_deform_attn_config(Dh)[0]
    assert rec.grids == [(triton.cdiv(Lq, block_q) * B * Hh,)]


# -- rope_attention ------------------------------------------------------------------------------


def rope_args(N, M, K, B=1, H=16, D=64, device=CUDA):
    qkv = Like(device, BF16, (B, N, H, D))
    return qkv, qkv, qkv, None, None, Like(device, BF16, (B, M, K)), 0.125


def test_rope_attention_triton_refuses_mask_logits_past_int32(gpu_build, monkeypatch):
    op = rope_attention_op.OP
    M, K = 2**16, 2**15  # the largest offset into one batch item's logits is M * K - 1 = 2**31 - 1
    assert_refused(monkeypatch, op, "triton", rope_args(M + K + 1, M, K + 1),
                   "mask_logits reaches offset 2147549183 within one batch item", "32-bit offsets", LIMIT)
    assert_accepted(monkeypatch, op, "triton", rope_args(M + K, M, K))
    # the C++ form hands the logits to ATen; q, k, v take 64-bit offsets everywhere
    assert_accepted(monkeypatch, op, "cuda", rope_args(M + K + 1, M, K + 1))


def test_rope_attention_refuses_token_counts_past_int32(gpu_build, monkeypatch):
    op = rope_attention_op.OP
    qkv = Like(CUDA, BF16, (1, TILED_LIMIT + 1, 1, 64))
    assert_refused(monkeypatch, op, "triton", (qkv, qkv, qkv), f"q has {TILED_LIMIT + 1} tokens (N)", TILED)
    qkv = Like(CUDA, BF16, (1, TILED_LIMIT, 1, 64))
    assert_accepted(monkeypatch, op, "triton", (qkv, qkv, qkv))
    # the C++ form's rotation kernel holds N and H in an int
    qkv = Like(CUDA, BF16, (1, 2**31, 1, 64))
    assert_refused(monkeypatch, op, "cuda", (qkv, qkv, qkv), "q has N=2147483648 tokens, H=1 heads", LIMIT)
    qkv = Like(CUDA, BF16, (1, 2**31 - 1, 1, 64))
    assert_accepted(monkeypatch, op, "cuda", (qkv, qkv, qkv))


def test_rope_attention_triton_measures_the_logits_span_not_their_count(monkeypatch):
    # six logits, but strided 2**31 apart along the queries
    logits = torch.empty_strided((1, 2, 3), (2**32, 2**31, 1), dtype=BF16, device=META)
    qkv = meta(1, 5, 2, 64)
    why = rope_attention_op.reasons("triton", qkv, qkv, qkv, None, None, logits)
    assert any("mask_logits reaches offset 2147483650" in r and LIMIT in r for r in why)
    close = torch.empty_strided((1, 2, 3), (2**32, 2**31 - 3, 1), dtype=BF16, device=META)
    assert not any("mask_logits" in r for r in rope_attention_op.reasons("triton", qkv, qkv, qkv, None, None,
                                                                          close))


def test_rope_attention_pinned_triton_names_mask_logits():
    qkv = meta(1, 2**16 + 2**15 + 1, 1, 16)
    with pytest.raises(ValueError, match=r"mask_logits reaches offset .*limit 2\*\*31 - 1"):
        rope_attention_op.rope_attention(qkv, qkv, qkv, mask_logits=meta(1, 2**16, 2**15 + 1),
                                         backend="triton")


def test_rope_attention_triton_grids_have_one_axis(monkeypatch):
    B, N, H, D, M, K = 4096, 40, 32, 64, 3, 30  # B * H = 131072 > 65535
    (rec,) = record(monkeypatch, k_rope_attention, "_rope_attention_fwd_kernel")
    q = meta(B, N, H, D)
    k_rope_attention.rope_attention_fwd(q, q, q, None, None, 0.125, q, mask_logits=meta(B, M, K))
    expected = []
    for rows, masked in ((M, True), (N - M, False)):
        block_m = k_rope_attention.rope_attention_config(B, H, rows, D, 2, masked=masked)[0]
        expected.append((triton.cdiv(rows, block_m) * B * H,))
    assert rec.grids == expected


# -- masked_attention ----------------------------------------------------------------------------


def masked_args(B, Lq, H, D=2, Lk=16, mask=True, device=CUDA):
    kv = Like(device, BF16, (B, Lk, H, D))
    return Like(device, BF16, (B, Lq, H, D)), kv, kv, Like(device, BF16, (B, Lq, Lk)) if mask else None, 0.5


def test_masked_attention_cuda_refuses_more_blocks_than_a_grid_holds(gpu_build, monkeypatch):
    op, rows = masked_attention_op.OP, masked_attention_op.CUDA_ROWS_PER_BLOCK
    assert_refused(monkeypatch, op, "cuda", masked_args(1, rows * GRID_LIMIT + 1, 1, mask=False),
                   f"q has {rows * GRID_LIMIT + 1} query rows (B * H * Lq)", "2147483648 blocks", LIMIT)
    assert_accepted(monkeypatch, op, "cuda", masked_args(1, rows * GRID_LIMIT, 1, mask=False))


def test_masked_attention_triton_refuses_more_programs_than_a_grid_holds(gpu_build, monkeypatch):
    op = masked_attention_op.OP
    # the pack kernel: one program per row of mask_logits
    assert_refused(monkeypatch, op, "triton", masked_args(2, 2**30, 1), "mask_logits has 2147483648 rows",
                   LIMIT)
    assert_accepted(monkeypatch, op, "triton", masked_args(2, 2**30 - 1, 1))
    assert_accepted(monkeypatch, op, "triton", masked_args(2, 2**30, 1, mask=False))
    # the attention kernel: 128 query rows per program here (bf16, head dim 2)
    H = 2**27
    assert masked_attention_op.masked_attention_config(1, H, 2**11, 1, 2, 2)[0] == 128
    assert_refused(monkeypatch, op, "triton", masked_args(1, 2**11, H, mask=False), "2147483648 programs",
                   LIMIT)
    assert_accepted(monkeypatch, op, "triton", masked_args(1, 2**11 - 128, H, mask=False))


def test_masked_attention_triton_refuses_row_counts_past_int32(gpu_build, monkeypatch):
    op = masked_attention_op.OP
    assert_refused(monkeypatch, op, "triton", masked_args(1, TILED_LIMIT + 1, 1, mask=False),
                   f"q has {TILED_LIMIT + 1} queries (Lq)", TILED)
    assert_refused(monkeypatch, op, "triton", masked_args(1, 1, 1, Lk=TILED_LIMIT + 1),
                   f"k has {TILED_LIMIT + 1} keys (Lk)", TILED)
    assert_accepted(monkeypatch, op, "triton", masked_args(1, TILED_LIMIT, 1, Lk=TILED_LIMIT, mask=False))
    assert_accepted(monkeypatch, op, "cuda", masked_args(1, TILED_LIMIT + 1, 1, Lk=TILED_LIMIT + 1))


def test_masked_attention_offsets_are_64_bit(gpu_build, monkeypatch):
    # q, k, v and the logits each hold more than 2**31 elements, with few enough rows for the grid
    for backend in ("triton", "cuda"):
        args = masked_args(64, 200, 16, D=128, Lk=2**19)
        assert_accepted(monkeypatch, masked_attention_op.OP, backend, args)


def test_masked_attention_pinned_cuda_names_q():
    q, kv = meta(1, 4 * GRID_LIMIT + 1, 1, 2), meta(1, 3, 1, 2)
    with pytest.raises(ValueError, match=r"q has 8589934589 query rows .*limit 2\*\*31 - 1"):
        masked_attention_op.masked_attention(q, kv, kv, backend="cuda")


def test_masked_attention_triton_grids_have_one_axis(monkeypatch):
    B, Lq, H, D, Lk = 4096, 100, 32, 32, 50  # B * H = 131072 > 65535
    pack, fwd = record(monkeypatch, k_masked_attention, "_masked_attention_pack_kernel",
                       "_masked_attention_fwd_kernel")
    q, kv = meta(B, Lq, H, D), meta(B, Lk, H, D)
    k_masked_attention.masked_attention_fwd(q, kv, kv, meta(B, Lq, Lk), 0.5, q)
    block_m, _, _, _, splits = k_masked_attention.masked_attention_config(B, H, Lq, Lk, D, 2)
    assert pack.grids == [(B * Lq,)]
    assert splits == 1 and fwd.grids == [(triton.cdiv(Lq, block_m) * B * H,)]


# -- add_layer_norm, dwconv_layer_norm, fused_linear: 64-bit offsets -----------------------------


def test_add_layer_norm_takes_more_than_2_31_elements(gpu_build, monkeypatch):
    x, vec = Like(CUDA, BF16, (2**21 + 1, 1024)), Like(CUDA, BF16, (1024,))
    for backend in ("triton", "cuda"):
        assert_accepted(monkeypatch, add_layer_norm_op.OP, backend, (x, x, vec, vec, vec, 1e-6))


def test_add_layer_norm_triton_grid(monkeypatch):
    (rec,) = record(monkeypatch, k_add_layer_norm, "_add_layer_norm_fwd_kernel")
    x, vec = meta(2**21 + 1, 1024), meta(1024)
    k_add_layer_norm.add_layer_norm_fwd(x, x, vec, vec, vec, 1e-6, x, x)
    rows = k_add_layer_norm.add_layer_norm_config(1024)[1]
    assert rec.grids == [(triton.cdiv(2**21 + 1, rows),)]


def dwconv_args(B, C, H, W, device=CUDA):
    vec = Like(device, BF16, (C,))
    return Like(device, BF16, (B, C, H, W)), Like(device, BF16, (C, 1, 7, 7)), vec, vec, vec, 1e-6


def test_dwconv_layer_norm_takes_images_of_2_31_elements_or_more(gpu_build, monkeypatch):
    for backend in ("triton", "cuda"):
        assert_accepted(monkeypatch, dwconv_layer_norm_op.OP, backend, dwconv_args(2, 2048, 1024, 1025))


def test_dwconv_layer_norm_refuses_a_side_past_2_30(gpu_build, monkeypatch):
    side = dwconv_layer_norm_op.MAX_SIDE
    for backend in ("triton", "cuda"):
        assert_refused(monkeypatch, dwconv_layer_norm_op.OP, backend, dwconv_args(1, 1, side + 1, 1),
                       f"x has H={side + 1}, W=1", "(limit 2**30 each)")
        assert_refused(monkeypatch, dwconv_layer_norm_op.OP, backend, dwconv_args(1, 1, 2, side + 1),
                       f"x has H=2, W={side + 1}", "(limit 2**30 each)")
        assert_accepted(monkeypatch, dwconv_layer_norm_op.OP, backend, dwconv_args(1, 1, side, side))


@requires_ext
def test_dwconv_layer_norm_cpu_kernel_checks_the_side_itself():
    # untouched memory: the check refuses before anything is read or the output allocated
    x = torch.empty((1, 1, 2**30 + 1, 1), dtype=BF16)
    weight, vec = torch.zeros(1, 1, 7, 7, dtype=BF16), torch.zeros(1, dtype=BF16)
    with pytest.raises(RuntimeError, match=r"x has H=1073741825, W=1; .*limit 2\*\*30 each"):
        torch.ops.fastdino.dwconv_layer_norm(x, weight, vec, vec, vec, 1e-6)
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run: x has H=1073741825"):
        dwconv_layer_norm_op.dwconv_layer_norm(x, weight, vec, vec, vec, backend="cpu")


def test_dwconv_layer_norm_triton_grid(monkeypatch):
    B, C, H, W = 70000, 96, 2, 40  # B * H = 140000 > 65535
    (rec,) = record(monkeypatch, k_dwconv_layer_norm, "_dwconv_layer_norm_fwd_kernel")
    vec = meta(C)
    k_dwconv_layer_norm.dwconv_layer_norm_fwd(meta(B, C, H, W), meta(C, 1, 7, 7), vec, vec, vec, 1e-6,
                                              meta(B, H, W, C))
    block_w = k_dwconv_layer_norm.dwconv_layer_norm_config(C)[1]
    assert rec.grids == [(B * H * triton.cdiv(W, block_w),)]


def test_fused_linear_takes_more_than_2_31_elements(gpu_build):
    x, w = Like(CUDA, BF16, (2**20 + 1, 4096)), Like(CUDA, BF16, (4096, 4096))
    out = Like(CUDA, BF16, (2**20 + 1, 4096))
    for backend in ("triton", "cuda"):
        assert fused_linear_op.OP.runnable(backend, x, w, None, "gelu", None, None, out, None) == []


def test_fused_linear_triton_refuses_row_and_column_counts_past_int32(gpu_build):
    op = fused_linear_op.OP
    rows, features = Like(CUDA, BF16, (2, (TILED_LIMIT + 1) // 2, 64)), Like(CUDA, BF16, (1, TILED_LIMIT + 1))
    for x, text in ((rows, "x has 2147482624 rows (its leading dims)"),
                    (features, "x has 2147482624 input features")):
        w = Like(CUDA, BF16, (64, x.shape[-1]))
        why = [r for r in op.runnable("triton", x, w) if text in r]
        assert len(why) == 1 and TILED in why[0]
        with pytest.raises(ValueError, match=re.escape(text)):
            op.choose("triton", x, w)
        assert op.runnable("cuda", x, w) == []
    x = Like(CUDA, BF16, (3, 64))
    why = op.runnable("triton", x, Like(CUDA, BF16, (TILED_LIMIT + 1, 64)))
    assert why == [f"weight has {TILED_LIMIT + 1} rows (output features); the Triton kernel numbers them "
                   f"with 32-bit integers {TILED}"]
    at_limit = Like(CUDA, BF16, (TILED_LIMIT, 64))
    assert op.runnable("triton", at_limit, at_limit) == []


def test_fused_linear_triton_grid(monkeypatch):
    M, N, K = 2**20 + 1, 4096, 1024
    (rec,) = record(monkeypatch, k_fused_linear, "_fused_linear_kernel")
    k_fused_linear.fused_linear_fwd(meta(M, K), meta(N, K), None, None, None, None, None, "gelu", meta(M, N))
    bm, bn = k_fused_linear.fused_linear_config(M, N, K, 2, k_fused_linear.ACT_GELU)[:2]
    assert rec.grids == [(triton.cdiv(M, bm) * triton.cdiv(N, bn),)]


# -- on a GPU: launches past 65535 programs along what used to be grid axis 1 --------------------


@requires_cuda
def test_ms_deform_attn_past_65535_heads_on_gpu():
    B, Hh, S, Dh, Lq, P = 16385, 4, 4, 8, 3, 2  # B * heads = 65540
    g = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(B, S, Hh, Dh, device="cuda", generator=g)
    shapes = torch.tensor([[2, 2]], device="cuda")
    starts = torch.tensor([0], device="cuda")
    loc = torch.rand(B, Lq, Hh, 1, P, 2, device="cuda", generator=g)
    attw = torch.rand(B, Lq, Hh, 1, P, device="cuda", generator=g)
    backends = ["triton"] + (["cuda"] if _ext.BUILD["cuda"] else [])
    for backend in backends:
        out = ms_deform_attn_op.ms_deform_attn(value, shapes, starts, loc, attw, backend=backend)
        last = slice(B - 2, B)  # the batch items past axis 1's 65535 in the old layout
        ref = ms_deform_attn_op.ms_deform_attn_ref(value[last], shapes, starts, loc[last], attw[last])
        torch.testing.assert_close(out[last], ref, atol=1e-5, rtol=1e-5)


@requires_cuda
def test_rope_and_masked_attention_triton_past_65535_heads_on_gpu():
    B, N, H, D = 4097, 8, 16, 16  # B * H = 65552
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
    logits = torch.randn(B, 2, 4, device="cuda", generator=g, dtype=torch.float16)
    last = slice(B - 2, B)
    out = rope_attention_op.rope_attention(q, k, v, mask_logits=logits, backend="triton")
    ref = rope_attention_op.rope_attention_ref(q[last], k[last], v[last], mask_logits=logits[last],
                                               scale=D**-0.5)
    torch.testing.assert_close(out[last], ref, atol=1e-2, rtol=1e-2)
    logits = torch.randn(B, N, N, device="cuda", generator=g, dtype=torch.float16)
    out = masked_attention_op.masked_attention(q, k, v, logits, backend="triton")
    ref = masked_attention_op.masked_attention_ref(q[last], k[last], v[last], logits[last])
    torch.testing.assert_close(out[last], ref, atol=1e-2, rtol=1e-2)


@requires_cuda_ext
def test_masked_attention_cuda_past_65535_query_blocks_on_gpu():
    Lq = 4 * 65535 + 9  # query blocks of 4 rows: past 65535, the old grid's axis 1
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Lq, 1, 2, device="cuda", generator=g)
    k, v = (torch.randn(1, 3, 1, 2, device="cuda", generator=g) for _ in range(2))
    logits = torch.randn(1, Lq, 3, device="cuda", generator=g)
    out = masked_attention_op.masked_attention(q, k, v, logits, backend="cuda")
    last = slice(Lq - 8, Lq)
    ref = masked_attention_op.masked_attention_ref(q[:, last], k, v, logits[:, last])
    torch.testing.assert_close(out[:, last], ref, atol=1e-5, rtol=1e-5)
