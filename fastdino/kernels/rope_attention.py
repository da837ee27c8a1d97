"""Triton kernel of rope_attention: softmax(rope(q) rope(k)^T * scale) v, flash-style.

One program owns BLOCK_M query rows of one (batch, head) and streams the keys in blocks of
BLOCK_N with an online softmax (exp2, fp32 statistics), so the N x N scores never exist.
q, k, v are read in place from the projection output, token-major (B, N, H, D) with any batch,
token and head strides, so neither the split of a fused qkv nor a transpose is ever copied; the
output is written token-major too, ready for the output projection.

DINOv3's 2D RoPE is applied on load, in fp32 and rounded once to the storage type as the official
code does: q once per program, each k block as it is streamed. Only the trailing HW tokens turn;
the first N - HW (cls, registers, any prepended queries) pass through. The half-split layout
(rotate_half = cat(-x2, x1)) is why every head row is loaded as two halves: the rotation is then
two fused multiply-adds per element, and q.k^T is the sum of two dots over the halves.

EoMT's query-to-patch mask (MASKED): the first M query rows see the trailing keys from
`mask_start` on only where their logit is > 0. Those rows get a launch of their own (rows
[0, M), MASKED) and the rest another (rows [M, N), plain), so no program of the large launch
carries the mask and the masked one can use smaller tiles: a logits tile beside every key block
of a 128 x 64 tile spills registers on sm_90. In the masked launch the key blocks from the one
holding mask_start on load a (BLOCK_M, BLOCK_N) tile of the (B, M, N - mask_start) logits and
compare it in fp32.
"""

import triton
import triton.language as tl

from .flash import head_program, online_softmax_step

LOG2E = 1.4426950408889634
HEAD_DIMS = tuple(range(16, 129, 16))  # head dims the kernel is built and tested for
FP32_MAX_HEAD_DIM = 64  # fp32 beyond this spills registers on sm_90 whatever the tiles


@triton.jit
def _rope_rows(x_lo, x_hi, rows, prefix, N, COS, SIN, stride_cs, offs_h, h_ok, HALF: tl.constexpr):
    """x * cos + rotate_half(x) * sin on the rows >= prefix, in fp32; other rows unchanged."""
    turn = (rows >= prefix) & (rows < N)
    pos = tl.where(turn, rows - prefix, 0).to(tl.int64)
    m = turn[:, None] & h_ok[None, :]
    off = pos[:, None] * stride_cs + offs_h[None, :]
    c_lo = tl.load(COS + off, mask=m, other=1.0).to(tl.float32)
    c_hi = tl.load(COS + off + HALF, mask=m, other=1.0).to(tl.float32)
    s_lo = tl.load(SIN + off, mask=m, other=0.0).to(tl.float32)
    s_hi = tl.load(SIN + off + HALF, mask=m, other=0.0).to(tl.float32)
    return x_lo * c_lo - x_hi * s_lo, x_hi * c_hi + x_lo * s_hi


@triton.jit
def _load_halves(P, rows, mask, stride_n, prefix, N, COS, SIN, stride_cs, offs_h, h_ok,
                 HALF: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr):
    """Rows of one head as its two halves, rotated when ROPE (fp32, rounded once to the storage
    type), ready for tl.dot; UPCAST: the interpreter's 16-bit dots are wrong, fp32 holds 16-bit
    values exactly."""
    off = rows.to(tl.int64)[:, None] * stride_n + offs_h[None, :]
    lo = tl.load(P + off, mask=mask, other=0.0)
    hi = tl.load(P + off + HALF, mask=mask, other=0.0)
    if ROPE:
        lo, hi = _rope_rows(lo.to(tl.float32), hi.to(tl.float32), rows, prefix, N, COS, SIN, stride_cs,
                            offs_h, h_ok,
                            HALF)
        lo = lo.to(P.dtype.element_ty)
        hi = hi.to(P.dtype.element_ty)
    if UPCAST:
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
    return lo, hi


@triton.jit
def _attend_block(
    acc, m_i, l_i, q_lo, q_hi, K, V, COS, SIN, ML, stride_kn, stride_vn, stride_cs, stride_mq, stride_mk,
    start_n, N,
    prefix, qk_scale, offs_m, M, mask_start, offs_h, h_ok, offs_d, d_ok,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block of the online softmax. MASK_N only on the last, partial block; MASK_KEYS on the
    blocks that reach the masked keys, in programs that hold masked rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    km = (n_ok[:, None] & h_ok[None, :]) if MASK_N else h_ok[None, :]
    k_lo, k_hi = _load_halves(K, offs_n, km, stride_kn, prefix, N, COS, SIN, stride_cs, offs_h, h_ok, HALF,
                              ROPE,
                              UPCAST)
    s = tl.dot(q_lo, tl.trans(k_lo), input_precision=PRECISION)
    s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=PRECISION)
    s = s * qk_scale
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    if MASK_KEYS:
        ruled = (offs_m < M)[:, None] & ((offs_n >= mask_start) & n_ok)[None, :]
        col = offs_n - mask_start  # negative only where `ruled` is False; kept contiguous so loads vectorise
        # int32 within one batch item: the op's reasons bound the logits' span by 2**31 - 1
        logit = tl.load(ML + offs_m[:, None] * stride_mq + col[None, :] * stride_mk, mask=ruled,
                        other=1.0).to(tl.float32)  # exact; the interpreter compares raw bf16 bits otherwise
        # NaN blocks, as `logit > 0` is False; -inf is added, as the models' additive mask, so a NaN or
        # +Inf score of a blocked key stays NaN
        s += tl.where(ruled & ~(logit > 0), float("-inf"), 0.0)
    v_off = offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
    vm = (n_ok[:, None] & d_ok[None, :]) if MASK_N else d_ok[None, :]
    v = tl.load(V + v_off, mask=vm, other=0.0)
    return online_softmax_step(acc, m_i, l_i, s, v, UPCAST, PRECISION, False)


@triton.jit
def _rope_attention_fwd_kernel(
    Q, K, V, COS, SIN, ML, O,  # q, k, v, o: (B, N, H, D) strided, last dim contiguous; cos, sin: (HW, D)
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_cs,
    stride_mb, stride_mq, stride_mk,  # mask logits (B, M, N - mask_start), any strides
    H, N, row_start, row_end, prefix, M, mask_start, qk_scale,  # qk_scale = scale * log2(e)
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    pid_m, b, h = head_program(row_end - row_start, BLOCK_M, H)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    ML += b * stride_mb

    offs_m = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < row_end
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_lo, q_hi = _load_halves(Q, offs_m, m_ok[:, None] & h_ok[None, :], stride_qn, prefix, N, COS, SIN,
                              stride_cs,
                              offs_h, h_ok, HALF, ROPE, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    # Full key blocks before mask_from run unmasked; with MASKED the ones from the block holding
    # mask_start on read the logits.
    mask_from = n_full
    if MASKED:
        mask_from = (mask_start // BLOCK_N) * BLOCK_N
    for start_n in range(0, mask_from, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_lo, q_hi, K, V, COS, SIN, ML, stride_kn, stride_vn, stride_cs, stride_mq,
            stride_mk,
            start_n, N, prefix, qk_scale, offs_m, M, mask_start, offs_h, h_ok, offs_d, d_ok,
            HALF, BLOCK_N, ROPE, False, False, UPCAST, PRECISION,
        )
    if MASKED:
        for start_n in range(mask_from, n_full, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q_lo, q_hi, K, V, COS, SIN, ML, stride_kn, stride_vn, stride_cs, stride_mq,
                stride_mk,
                start_n, N, prefix, qk_scale, offs_m, M, mask_start, offs_h, h_ok, offs_d, d_ok,
                HALF, BLOCK_N, ROPE, False, True, UPCAST, PRECISION,
            )
    if n_full < N:
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_lo, q_hi, K, V, COS, SIN, ML, stride_kn, stride_vn, stride_cs, stride_mq,
            stride_mk,
            n_full, N, prefix, qk_scale, offs_m, M, mask_start, offs_h, h_ok, offs_d, d_ok,
            HALF, BLOCK_N, ROPE, True, MASKED, UPCAST, PRECISION,
        )
    out = acc / l_i[:, None]
    o_off = offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def rope_attention_config(B: int, H: int, N: int, D: int, dtype_bytes: int, sms: int = 132,
                          masked: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one launch over N query rows.

    128 query rows per program when that still gives every SM a program, else 64 (batch 1 of a
    small model: 6 heads x 17 blocks of 64 rows at N = 1029). fp32 uses 64 x 16 tiles: its dots
    (three tf32 products each, for fp32 accuracy) need more than twice the registers per element,
    and above FP32_MAX_HEAD_DIM no tile shape avoids spills (sm_90 compile check).
    """
    if dtype_bytes == 4:
        return 64, 16, 4, 2
    if masked:  # the logits tile is one more (BLOCK_M, BLOCK_N) fp32 tile: 64 x 32 keeps it in registers
        return (64, 32, 8, 2) if D > 64 else (64, 32, 4, 3)
    block_m = 128 if triton.cdiv(N, 128) * B * H >= sms else 64
    # Head dims above 64 hold twice the q and accumulator registers: 8 warps, or 255 regs + spills;
    # and two stages, as three of the k, v and RoPE-table tiles need 240 KB of shared memory.
    return (block_m, 64, 8, 2) if D > 64 else (block_m, 64, 4, 3)


def rope_attention_fwd(q, k, v, cos, sin, scale, out, mask_logits=None, interpret=False):
    """Launch on (B, N, H, D) q, k, v, out (last dim contiguous), (HW, D) cos/sin or None and
    (B, M, K) mask_logits or None.

    The caller has validated the arguments. `interpret`: the Triton interpreter's 16-bit dots are
    wrong, so operands are upcast to fp32 there (products are exact either way).
    """
    import torch

    B, N, H, D = q.shape
    if B * N * H == 0:
        return
    bytes_ = q.element_size()
    rope = cos is not None
    hw = cos.shape[0] if rope else 0
    rows = mask_logits.shape[1] if mask_logits is not None else 0
    mask_keys = mask_logits.shape[2] if mask_logits is not None else 0
    # (row_start, row_end, MASKED): EoMT's masked query rows first, in a launch of their own
    for row_start, row_end, masked in ((0, rows, True), (rows, N, False)):
        if row_end == row_start:
            continue
        block_m, block_n, num_warps, num_stages = rope_attention_config(B, H, row_end - row_start, D, bytes_,
                                                                        masked=masked)
        grid = (triton.cdiv(row_end - row_start, block_m) * B * H,)
        _rope_attention_fwd_kernel[grid](
            q, k, v, cos if rope else q, sin if rope else q, mask_logits if masked else q, out,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            cos.stride(0) if rope else 0,
            *(mask_logits.stride() if masked else (0, 0, 0)),
            H, N, row_start, row_end, N - hw, rows, N - mask_keys, scale * LOG2E,
            D=D, BLOCK_H=max(16, triton.next_power_of_2(D // 2)), BLOCK_D=max(16, triton.next_power_of_2(D)),
            BLOCK_M=block_m, BLOCK_N=block_n, ROPE=rope, MASKED=masked,
            UPCAST=interpret and q.dtype != torch.float32,
            PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )


def compile_configs():
    """Every (signature, constexprs, options) rope_attention_fwd can launch, for the sm_90 compile check."""
    configs = []
    for dtype, nbytes in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        for d in HEAD_DIMS if nbytes == 2 else [d for d in HEAD_DIMS if d <= FP32_MAX_HEAD_DIM]:
            # a few programs (batch 1) and many (batch 32): both BLOCK_M choices
            # and EoMT's masked rows, their logits in the activation dtype as the models make them
            for (block_m, block_n, num_warps, num_stages), masked in sorted(
                {(rope_attention_config(b, 16, n, d, nbytes), False) for b, n in ((1, 197), (32, 4101))}
                | {(rope_attention_config(1, 16, 100, d, nbytes, masked=True), True)}
            ):
                signature = {name: f"*{dtype}" for name in ("Q", "K", "V", "ML", "O")}
                signature.update(COS="*fp32", SIN="*fp32")  # the tables the modules pass are fp32
                signature.update({f"stride_{t}{s}": "i32" for t in "qkvo" for s in "bnh"})
                signature.update(stride_mb="i32", stride_mq="i32")
                signature.update(stride_cs="i32", H="i32", N="i32", row_start="i32", row_end="i32",
                                 prefix="i32",
                                 M="i32", mask_start="i32", qk_scale="fp32")
                constexprs = dict(D=d, BLOCK_H=max(16, triton.next_power_of_2(d // 2)),
                                  BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m,
                                  BLOCK_N=block_n,
                                  stride_mk=1, ROPE=True, MASKED=masked, UPCAST=False,
                                  PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                # Pointers and strides divisible by 16, as at launch for 16-multiple head dims: this
                # specialisation is what turns on the pipelined copies that fill shared memory.
                order = list(_rope_attention_fwd_kernel.arg_names)
                attrs = {(order.index(n),): [["tt.divisibility", 16]] for n in signature
                         if n in ("Q", "K", "V", "COS", "SIN", "O")
                         or (n.startswith("stride_") and not n.startswith("stride_m"))}
                signature = {n: signature[n] for n in order if n in signature}
                signature.update({name: "constexpr" for name in constexprs})
                configs.append((_rope_attention_fwd_kernel, signature, constexprs,
                                dict(num_warps=num_warps, num_stages=num_stages), attrs))
    return configs
