"""Triton kernels of masked_attention: Mask2Former's masked cross-attention, the mask read as logits.

Up to three launches, no (B * heads, Q, HW) boolean mask anywhere:
1. ``_masked_attention_pack_kernel``: one program per (batch, query) row reads that row of the mask
   logits once and writes it as bits, 1 = key blocked, 32 keys per int32 word: 1/16 of bf16 logits,
   read by every head. A key is blocked where sigmoid(logit), rounded to the logits' dtype, is
   below 0.5: the models' own test (not `logit < 0`: in bfloat16 they differ for logits in
   (-2^-8, 0)), done as one comparison with a per-dtype threshold. A row whose every key is blocked
   is written as all zeros: the decoder lifts that row's mask.
2. ``_masked_attention_fwd_kernel``: flash-style, one program per BLOCK_M queries of one
   (batch, head) and one split of the keys, streaming its keys in blocks of BLOCK_N with an online
   softmax (exp2, fp32 statistics). A blocked key's score gets -inf added, as the models' additive
   mask, and its value row is weighted 0: NaN and Inf in blocked keys and values reach the output
   exactly as in nn.MultiheadAttention. The decoders have ~100 queries and 8 or 16 heads, so at
   batch 1 a program per (query block, head) covers a fraction of the SMs: the keys are then split
   (flash-decoding) until the programs fill them, each split writing its unnormalised output and
   softmax statistics in fp32.
3. ``_masked_attention_combine_kernel`` (split keys only): rescales each split's partial output to
   the row's maximum and divides by the summed weights.

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
PACK_BLOCK = 1024  # keys per step of the pack kernel (a multiple of 32)
COMBINE_BLOCK_M = 16  # query rows per program of the combine kernel
# Key blocks per split at least. A split of n blocks reads 2 * 32n * D storage values of k and v and
# writes (then the combine reads) BLOCK_M * D fp32 partials: at n = 4 (128 keys, bf16) the partials
# are already twice the k and v bytes, all in L2 at batch 1; fewer would add traffic for little.
SPLIT_MIN_BLOCKS = 4
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
def _or(a, b):
    return a | b


@triton.jit
def _masked_attention_pack_kernel(
    M, BITS,  # m: (B, Lq, Lk) logits, last dim contiguous; bits: (B, Lq, WORDS) int32
    stride_mb, stride_mq, LQ, LK, WORDS,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // LQ).to(tl.int64)
    q = (row % LQ).to(tl.int64)
    M += b * stride_mb + q * stride_mq
    BITS += row.to(tl.int64) * WORDS
    # the row as (words, 32) tiles: each word's 32 keys along the contiguous axis
    word = tl.arange(0, BLOCK // 32)
    bit = tl.arange(0, 32)
    open_keys = tl.zeros([BLOCK // 32, 32], tl.int32)
    for start in range(0, LK, BLOCK):
        offs = start + word[:, None] * 32 + bit[None, :]
        ok = offs < LK
        x = tl.load(M + offs, mask=ok, other=0.0)
        blocked = ok & _blocked(x)
        open_keys += (ok & ~blocked).to(tl.int32)
        words = tl.reduce(blocked.to(tl.int32) << bit[None, :], 1, _or)
        w = start // 32 + word
        tl.store(BITS + w, words, mask=w < WORDS)
    tl.debug_barrier()  # the zeros below land after the words above, whatever the reduction lowers to
    if tl.sum(tl.sum(open_keys, 1), 0) == 0:  # every key blocked: the decoder lifts the row's mask
        for start in range(0, WORDS, BLOCK):
            w = start + tl.arange(0, BLOCK)
            tl.store(BITS + w, tl.zeros([BLOCK], tl.int32), mask=w < WORDS)


@triton.jit
def _masked_attention_fwd_kernel(
    Q, K, V, BITS, O,  # q, o: (B, Lq, H, D); k, v: (B, Lk, H, D); bits: (B, Lq, WORDS)
    PO, PML,  # split keys: (SPLITS, B, H, Lq, D) partial outputs, (SPLITS, B, H, Lq, 2) max and sum, fp32
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    H, LQ, LK, WORDS, SPLITS, SPLIT_KEYS, ROWS, qk_scale,  # SPLIT_KEYS: whole key blocks; ROWS: B * H * LQ
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_N == 32, "the mask is read one 32-key word per query row and key block")
    # One grid axis: query blocks fastest, then splits, then (batch, head), so the programs that
    # share a split's k and v rows run together.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(LQ, BLOCK_M)
    pid_m = pid % blocks_m
    split = (pid // blocks_m) % SPLITS
    bh = pid // blocks_m // SPLITS
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

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
        bits_row = (b * LQ + offs_m).to(tl.int64) * WORDS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * SPLIT_KEYS
    hi = lo + tl.minimum(SPLIT_KEYS, LK - lo)  # lo + SPLIT_KEYS may pass 2**31 - 1 near the limit
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK  # a split ends on a block boundary or at LK
        k = tl.load(K + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if MASK:
            # a block is 32 keys from a multiple of 32: one word per query row holds its bits
            w = tl.load(BITS + bits_row + start_n // 32, mask=m_ok, other=0)
            blocked = ((w[:, None] >> tl.arange(0, BLOCK_N)[None, :]) & 1) != 0
            # added, not substituted, as the models' -inf mask: a NaN or +Inf score of a blocked key stays NaN
            s += tl.where(blocked, float("-inf"), 0.0)
        v = tl.load(V + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, UPCAST, PRECISION, True)
    if SPLIT:
        row = split.to(tl.int64) * ROWS + bh.to(tl.int64) * LQ + offs_m  # (split, b, h, query)
        tl.store(PO + row[:, None] * D + offs_d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
        tl.store(PML + row * 2, m_i, mask=m_ok)
        tl.store(PML + row * 2 + 1, l_i, mask=m_ok)
    else:
        out = acc / l_i[:, None]  # l = 0 only where every open score is -inf: NaN, as softmax gives
        O += b * stride_ob + h * stride_oh
        o_off = offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
        tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _masked_attention_combine_kernel(
    PO, PML, O,  # the fwd kernel's partials; o: (B, Lq, H, D)
    stride_ob, stride_on, stride_oh,
    H, LQ, SPLITS, ROWS,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, b, h = head_program(LQ, BLOCK_M, H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row = (b * H + h) * LQ + offs_m
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(PML + (s * ROWS + row) * 2, mask=m_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)  # no open key in any split: weights 0, sum 0, NaN out
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    for s in range(SPLITS):
        r = s * ROWS + row
        # a split without an open key for the row (max -inf) weighs 0; its partial is 0, or NaN where
        # a blocked key's value was NaN or Inf (0 * NaN), as in one unsplit pass
        alpha = tl.math.exp2(tl.load(PML + r * 2, mask=m_ok, other=float("-inf")) - m_use)
        l_sum += alpha * tl.load(PML + r * 2 + 1, mask=m_ok, other=0.0)
        part = tl.load(PO + r[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += alpha[:, None] * part
    out = acc / l_sum[:, None]
    o_off = b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def masked_attention_config(B: int, H: int, Lq: int, Lk: int, D: int, dtype_bytes: int, sms: int = 132):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, splits) for one problem.

    A program takes a head's queries in blocks of up to 128 (64 at head dims above 64 or in fp32,
    16 at both, where the accumulator would spill), so k and v are read once per query block; keys
    come 32 at a time. Where those programs leave SMs idle (batch 1: B * heads * query blocks = 8 or 16), the
    keys are split into chunks of at least SPLIT_MIN_BLOCKS blocks until the programs cover the SMs.
    """
    block_d = max(16, triton.next_power_of_2(D))
    wide = block_d > 64
    # fp32 at head dims above 64: 16 queries on 4 warps (32 on 8 or 4 warps spilled with triton 3.6,
    # 64 with 3.9: sm_90 compile check)
    widest = 16 if (wide and dtype_bytes == 4) else 64 if (wide or dtype_bytes == 4) else 128
    block_m = min(widest, max(16, triton.next_power_of_2(Lq)))
    block_n = 32
    if dtype_bytes == 4:
        num_warps, num_stages = 4, 2
    else:
        num_warps, num_stages = (8, 2) if (wide or block_m == 128) else (4, 3)
    programs = triton.cdiv(Lq, block_m) * B * H
    key_blocks = triton.cdiv(Lk, block_n)
    # at most one program per SM: a second one on some SMs would double the time of the launch
    splits = max(1, min(sms // max(programs, 1), key_blocks // SPLIT_MIN_BLOCKS))
    if splits > 1:  # equal chunks of whole blocks; no split left empty
        chunk = triton.cdiv(key_blocks, splits)
        splits = triton.cdiv(key_blocks, chunk)
    return block_m, block_n, num_warps, num_stages, splits


_SMS: dict = {}


def sm_count(device) -> int:
    """The SMs of a CUDA device (132 on an H100 SXM or H200, 114 on an H100 PCIe); 132 elsewhere
    (the interpreter, meta tensors)."""
    if device.type != "cuda":
        return 132
    if device.index not in _SMS:
        import torch

        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def split_keys(Lk: int, block_n: int, splits: int) -> int:
    """Keys per split: whole key blocks, the last split takes the rest."""
    return triton.cdiv(triton.cdiv(Lk, block_n), splits) * block_n


def masked_attention_fwd(q, k, v, mask_logits, scale, out, interpret=False, splits=None):
    """Launch on (B, L, H, D) q, k, v, out (last dim contiguous) and (B, Lq, Lk) logits or None.

    The caller has validated the arguments. `interpret`: operands are upcast to fp32 under the
    Triton interpreter (its 16-bit dots are wrong; products are exact either way). `splits`
    overrides the configured number of key splits (tests).
    """
    import torch

    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if B * Lq * H == 0:
        return
    mask = mask_logits is not None
    words = triton.cdiv(Lk, 32)
    bits = q
    if mask:
        bits = torch.empty((B, Lq, words), dtype=torch.int32, device=q.device)
        _masked_attention_pack_kernel[(B * Lq,)](
            mask_logits, bits, mask_logits.stride(0), mask_logits.stride(1), Lq, Lk, words, BLOCK=PACK_BLOCK,
        )
    config = masked_attention_config(B, H, Lq, Lk, D, q.element_size(), sm_count(q.device))
    block_m, block_n, num_warps, num_stages, n_splits = config
    if splits is not None and Lk:
        n_splits = triton.cdiv(Lk, split_keys(Lk, block_n, splits))
    block_d = max(16, triton.next_power_of_2(D))
    rows = B * H * Lq
    po = pml = q
    if n_splits > 1:
        po = torch.empty((n_splits, B, H, Lq, D), dtype=torch.float32, device=q.device)
        pml = torch.empty((n_splits, B, H, Lq, 2), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Lq, block_m) * n_splits * B * H,)
    _masked_attention_fwd_kernel[grid](
        q, k, v, bits, out, po, pml,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, Lq, Lk, words, n_splits, split_keys(Lk, block_n, n_splits), rows, scale * LOG2E,
        D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MASK=mask, SPLIT=n_splits > 1,
        UPCAST=interpret and q.dtype != torch.float32,
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if n_splits > 1:
        _masked_attention_combine_kernel[(triton.cdiv(Lq, COMBINE_BLOCK_M) * B * H,)](
            po, pml, out, *out.stride()[:3], H, Lq, n_splits, rows,
            D=D, BLOCK_D=block_d, BLOCK_M=COMBINE_BLOCK_M, num_warps=4,
        )



def compile_configs():
    """Every (signature, constexprs, options) masked_attention_fwd can launch, for the sm_90 compile check."""
    configs = []
    for mdtype in ("fp32", "fp16", "bf16"):
        configs.append((_masked_attention_pack_kernel,
                        {"M": f"*{mdtype}", "BITS": "*i32", "stride_mb": "i32", "stride_mq": "i32",
                         "LQ": "i32", "LK": "i32", "WORDS": "i32", "BLOCK": "constexpr"},
                        {"BLOCK": PACK_BLOCK}, dict(num_warps=4)))
    order = list(_masked_attention_fwd_kernel.arg_names)
    for dtype, nbytes in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        for d in (2, 24, 32, 64, 128):
            block_d = max(16, triton.next_power_of_2(d))
            configs.append((_masked_attention_combine_kernel,
                            {"PO": "*fp32", "PML": "*fp32", "O": f"*{dtype}", "stride_ob": "i32",
                             "stride_on": "i32", "stride_oh": "i32", "H": "i32", "LQ": "i32", "SPLITS": "i32",
                             "ROWS": "i32", "D": "constexpr", "BLOCK_D": "constexpr", "BLOCK_M": "constexpr"},
                            dict(D=d, BLOCK_D=block_d, BLOCK_M=COMBINE_BLOCK_M), dict(num_warps=4)))
            # batch 1 (keys split) and batch 32 (one pass) at 16 heads, 100 queries, a 64x64 level;
            # the decoder's self-attention (no mask, 100 keys)
            launches = {(masked_attention_config(b, 16, 100, 4096, d, nbytes), True) for b in (1, 32)}
            launches.add((masked_attention_config(1, 16, 100, 100, d, nbytes), False))
            for (block_m, block_n, num_warps, num_stages, splits), mask in sorted(launches):
                signature = {name: f"*{dtype}" for name in ("Q", "K", "V", "O")}
                # what the launcher passes: q in place of the bits and partials it does not make
                signature.update(BITS="*i32" if mask else f"*{dtype}",
                                 **{n: "*fp32" if splits > 1 else f"*{dtype}" for n in ("PO", "PML")})
                signature.update({f"stride_{t}{s}": "i32" for t in "qkvo" for s in "bnh"})
                signature.update(H="i32", LQ="i32", LK="i32", WORDS="i32", SPLITS="i32", SPLIT_KEYS="i32",
                                 ROWS="i32", qk_scale="fp32")
                constexprs = dict(D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MASK=mask,
                                  SPLIT=splits > 1, UPCAST=False,
                                  PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                # Pointers and strides divisible by 16 as at launch on 16-aligned tensors.
                attrs = {(order.index(n),): [["tt.divisibility", 16]] for n in signature
                         if n in ("Q", "K", "V", "O", "BITS", "PO", "PML") or n.startswith("stride_")}
                signature = {n: signature[n] for n in order if n in signature}
                signature.update({name: "constexpr" for name in constexprs})
                configs.append((_masked_attention_fwd_kernel, signature, constexprs,
                                dict(num_warps=num_warps, num_stages=num_stages), attrs))
    return configs
