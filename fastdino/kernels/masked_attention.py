"""Triton kernels of masked_attention: Mask2Former's masked cross-attention, the mask read as logits.

Two launches, no (B * heads, Q, HW) boolean mask anywhere:
1. ``_masked_attention_lift_kernel``: one program per (batch, query) row reads that row of the mask
   logits once and flags it when every key is blocked (the decoder then lifts the row's mask).
2. ``_masked_attention_fwd_kernel``: flash-style, one program per BLOCK_M queries of one
   (batch, head), streaming keys in blocks of BLOCK_N with an online softmax (exp2, fp32
   statistics). For each key block it loads the BLOCK_M x BLOCK_N tile of logits (one mask shared
   by every head) and blocks a key where sigmoid(logit), rounded to the logits' dtype, is below 0.5:
   the models' own test (not `logit < 0`: in bfloat16 they differ for logits in (-2^-8, 0)), done
   as one comparison with a per-dtype threshold. A blocked key's score gets -inf added, as the
   models' additive mask, and its value row is weighted 0: NaN and Inf in blocked keys and values
   reach the output exactly as in nn.MultiheadAttention.

q, k, v are read in place, token-major (B, L, heads, D) with any batch, token and head strides, so
the projections' outputs (sequence-first or batch-first) are never transposed or copied. Head dims
that are not a power of two, or below tl.dot's 16 (Mask2Former at hidden 32 with 16 heads has
D = 2), are padded inside the kernel with masked loads; the caller's tensors are untouched.
"""

import triton
import triton.language as tl

from .flash import head_program, online_softmax_step

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
LIFT_BLOCK = 1024  # keys per step of the lift kernel
# sigmoid(x) = 0.5 + x/4 - x^3/48 ...: rounded to nearest-even in a dtype whose spacing below 0.5 is
# 2^-e, it falls below 0.5 exactly when x < -2^-(e-1) (at x = -2^-(e-1) it sits on the midpoint's
# upper side and rounds to 0.5). So the models' `sigmoid(logit) < 0.5` is `logit < threshold`. In
# float32 that holds for a correctly rounded sigmoid; torch's own CPU and CUDA sigmoids disagree
# for logits in (-2^-22, 0), so there the models themselves are not one rule.
MASK_THRESHOLDS = {"float32": -2.0**-24, "float16": -2.0**-11, "bfloat16": -2.0**-8}


@triton.jit
def _blocked(x):
    """The decoders' test, sigmoid(logit) < 0.5 with the sigmoid rounded to the logits' dtype, as a
    comparison of the logit with that dtype's threshold (see MASK_THRESHOLDS): no exp per logit."""
    limit = -5.9604644775390625e-08  # -2^-24, float32
    if x.dtype == tl.bfloat16:
        limit = -0.00390625  # -2^-8
    elif x.dtype == tl.float16:
        limit = -0.00048828125  # -2^-11
    return x.to(tl.float32) < limit


@triton.jit
def _masked_attention_lift_kernel(
    M, LIFT,  # m: (B, Lq, Lk) logits, last dim contiguous; lift: (B, Lq) int8, 1 = every key blocked
    stride_mb, stride_mq, LQ, LK,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // LQ).to(tl.int64)
    q = (row % LQ).to(tl.int64)
    M += b * stride_mb + q * stride_mq
    open_keys = tl.zeros([BLOCK], tl.int32)
    for start in range(0, LK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < LK
        x = tl.load(M + offs, mask=ok, other=0.0)
        open_keys += (ok & ~_blocked(x)).to(tl.int32)
    tl.store(LIFT + row, (tl.sum(open_keys, 0) == 0).to(tl.int8))


@triton.jit
def _masked_attention_fwd_kernel(
    Q, K, V, M, LIFT, O,  # q, o: (B, Lq, H, D); k, v: (B, Lk, H, D); m: (B, Lq, Lk); lift: (B, Lq)
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_mb, stride_mq,
    stride_ob, stride_on, stride_oh,
    H, LQ, LK, qk_scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, b, h = head_program(LQ, BLOCK_M, H)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:  # the interpreter's 16-bit dots are wrong; fp32 holds 16-bit values exactly
        q = q.to(tl.float32)
    if MASK:
        M += b * stride_mb
        lift = tl.load(LIFT + b * LQ + offs_m, mask=m_ok, other=1) != 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK
        k = tl.load(K + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if MASK:
            x = tl.load(M + offs_m.to(tl.int64)[:, None] * stride_mq + offs_n[None, :],
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            # added, not substituted, as the models' -inf mask: a NaN or +Inf score of a blocked key stays NaN
            s += tl.where(~lift[:, None] & _blocked(x), float("-inf"), 0.0)
        v = tl.load(V + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, UPCAST, PRECISION, True)
    out = acc / l_i[:, None]  # l = 0 only where every open score is -inf: NaN, as softmax gives
    o_off = offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def masked_attention_config(B: int, H: int, Lq: int, D: int, dtype_bytes: int, sms: int = 132):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one problem.

    Mask2Former has ~100 queries, so a program per 64 queries gives B * heads * 2 programs: at batch
    1 that leaves most of an H100 idle. The query block shrinks (64, 32, 16: tl.dot's minimum) until
    the programs cover the SMs; smaller blocks reread k and v more, from L2. Keys come 32 at a
    time: with 64 the logits tile next to the scores spilled registers at 4 warps whatever the head
    dim (sm_90 compile check). fp32 at head dims above 64 takes 8 warps and at most 32 queries.
    """
    block_m = 64
    while block_m > 16 and triton.cdiv(Lq, block_m) * B * H < sms:
        block_m //= 2
    wide = max(16, triton.next_power_of_2(D)) > 64
    if dtype_bytes == 4:
        return (min(block_m, 32), 32, 8, 2) if wide else (block_m, 32, 4, 2)
    return (block_m, 32, 4, 2) if wide else (block_m, 32, 4, 3)


def masked_attention_fwd(q, k, v, mask_logits, scale, out, interpret=False):
    """Launch on (B, L, H, D) q, k, v, out (last dim contiguous) and (B, Lq, Lk) logits or None.

    The caller has validated the arguments. `interpret`: operands are upcast to fp32 under the
    Triton interpreter (its 16-bit dots are wrong; products are exact either way).
    """
    import torch

    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if B * Lq * H == 0:
        return
    mask = mask_logits is not None
    lift = None
    if mask:
        lift = torch.empty((B, Lq), dtype=torch.int8, device=q.device)
        if Lk:
            _masked_attention_lift_kernel[(B * Lq,)](
                mask_logits, lift, mask_logits.stride(0), mask_logits.stride(1), Lq, Lk, BLOCK=LIFT_BLOCK,
            )
    block_m, block_n, num_warps, num_stages = masked_attention_config(B, H, Lq, D, q.element_size())
    grid = (triton.cdiv(Lq, block_m) * B * H,)
    _masked_attention_fwd_kernel[grid](
        q, k, v, mask_logits if mask else q, lift if mask else q, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        mask_logits.stride(0) if mask else 0, mask_logits.stride(1) if mask else 0,
        *out.stride()[:3],
        H, Lq, Lk, scale * LOG2E,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n, MASK=mask,
        UPCAST=interpret and q.dtype != torch.float32,
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )


def compile_configs():
    """Every (signature, constexprs, options) masked_attention_fwd can launch, for the sm_90 compile check."""
    configs = []
    for mdtype in ("fp32", "bf16"):
        configs.append((_masked_attention_lift_kernel,
                        {"M": f"*{mdtype}", "LIFT": "*i8", "stride_mb": "i32", "stride_mq": "i32",
                         "LQ": "i32",
                         "LK": "i32", "BLOCK": "constexpr"}, {"BLOCK": LIFT_BLOCK}, dict(num_warps=4)))
    order = list(_masked_attention_fwd_kernel.arg_names)
    for dtype, nbytes in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        for d in (2, 24, 32, 64, 128):
            # batch 1 (16-row blocks) and batch 32 (64-row blocks) at 16 heads, 100 queries
            for block_m, block_n, num_warps, num_stages in sorted(
                {masked_attention_config(b, 16, 100, d, nbytes) for b in (1, 32)}
            ):
                for mask_dtype in ((dtype, "fp32") if dtype != "fp32" else ("fp32",)):
                    signature = {name: f"*{dtype}" for name in ("Q", "K", "V", "O")}
                    signature.update(M=f"*{mask_dtype}", LIFT="*i8")
                    signature.update({f"stride_{t}{s}": "i32" for t in "qkvo" for s in "bnh"})
                    signature.update(stride_mb="i32", stride_mq="i32", H="i32", LQ="i32", LK="i32",
                                     qk_scale="fp32")
                    constexprs = dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m,
                                      BLOCK_N=block_n, MASK=True, UPCAST=False,
                                      PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                    # Pointers and strides divisible by 16 as at launch on 16-aligned tensors (the
                    # logits' row stride, HW, need not be).
                    attrs = {(order.index(n),): [["tt.divisibility", 16]] for n in signature
                             if n in ("Q", "K", "V", "O",
                                      "M") or (n.startswith("stride_") and n != "stride_mq")}
                    signature = {n: signature[n] for n in order if n in signature}
                    signature.update({name: "constexpr" for name in constexprs})
                    configs.append((_masked_attention_fwd_kernel, signature, constexprs,
                                    dict(num_warps=num_warps, num_stages=num_stages), attrs))
    return configs
