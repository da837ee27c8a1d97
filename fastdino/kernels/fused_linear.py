"""Triton kernel of fused_linear: a Linear (x @ W^T + b) with the MLP's elementwise work in the
GEMM epilogue, so the wide hidden activation is written once and never re-read for it.

    ACT_GELU    y = gelu_erf(x @ W^T + b)                        (Mlp.fc1 + GELU)
    ACT_SWIGLU  y = silu(x @ W^T + b) * (x @ W2^T + b2)          (SwiGLU: both input projections,
                                                                  two accumulators, one pass over x)
    ACT_NONE    y = x @ W^T + b
    + residual  y = residual + gamma * y                        (fc2 + LayerScale + residual add)
    + ROPE      y[:, :ROPE_COLS] = rope(y[:, :ROPE_COLS])         (attention's q/k projection: DINOv3's
                                                                  2D RoPE on the trailing HW tokens)

The RoPE epilogue rotates whole heads of HEAD_DIM columns (a column tile holds whole heads: the
half-split partner of a column is in the same tile) on the rows whose token, row % NTOK, is one
of the last HW of its image; the GEMM output is rounded to the storage dtype first, then rotated
in fp32 and rounded again, as the model's projection and its rope step round. The attention then
runs on the rotated q and k with no further pass over them.

W (and W2) are the modules' own nn.Linear weights, (N, K) row-major, read as (K, N) tiles through
their strides: no transposed or concatenated copy exists, so load_state_dict is always seen.
Accumulation and the epilogue are fp32; the output is rounded once.
"""

import triton
import triton.language as tl

ACT_NONE, ACT_GELU, ACT_SWIGLU = 0, 1, 2
ACTS = {None: ACT_NONE, "gelu": ACT_GELU, "swiglu": ACT_SWIGLU}


@triton.jit
def _fused_linear_kernel(
    X, W, B, W2, B2, R, G, Y,  # x (M, K); w, w2 (N, K); b, b2, g (N,); r, y (M, N)
    COS, SIN,  # ROPE: (HW, HEAD_DIM) tables, rows stride_cos / stride_sin apart, columns contiguous
    M, N, K,
    stride_xm, stride_wn, stride_w2n, stride_rm, stride_ym,
    NTOK, HW, ROPE_COLS, stride_cos, stride_sin,  # ROPE: tokens per image, rotated tokens and columns
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr,
    ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks share each column block of W while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    if ACT == 2:
        w2_ptrs = W2 + offs_n.to(tl.int64)[None, :] * stride_w2n + offs_k[:, None]
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (offs_k + k) < K
        x = tl.load(x_ptrs + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit dots are wrong; fp32 holds 16-bit values exactly
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if ACT == 2:
            w2 = tl.load(w2_ptrs + k, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(x, w2, acc2, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        if HAS_BIAS:
            acc2 += tl.load(B2 + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    mask = m_ok[:, None] & n_ok[None, :]
    if ROPE:
        tl.static_assert(BLOCK_N % HEAD_DIM == 0, "a column tile holds whole heads")
        acc = acc.to(Y.dtype.element_ty).to(tl.float32)  # the projection's output as stored
        tok = offs_m % NTOK - (NTOK - HW)  # the row's place among its image's rotated tokens
        turn = mask & (tok >= 0)[:, None] & (offs_n < ROPE_COLS)[None, :]
        tok = tl.where(tok >= 0, tok, 0)[:, None]
        d = (offs_n % HEAD_DIM)[None, :]
        cos = tl.load(COS + tok * stride_cos + d, mask=turn, other=1.0).to(tl.float32)
        sin = tl.load(SIN + tok * stride_sin + d, mask=turn, other=0.0).to(tl.float32)
        # rotate_half per head, in registers: (x1, x2) -> (-x2, x1) over each head's two halves
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, BLOCK_N // HEAD_DIM, 2, HEAD_DIM // 2)), (0, 1, 3, 2))
        x1, x2 = tl.split(halves)
        turned = tl.reshape(tl.permute(tl.join(-x2, x1), (0, 1, 3, 2)), (BLOCK_M, BLOCK_N))
        acc = tl.where(turn, acc * cos + turned * sin, acc)
    if HAS_RESIDUAL:
        if HAS_GAMMA:
            acc = acc * tl.load(G + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        r = tl.load(R + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc += r.to(tl.float32)
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask)


def fused_linear_config(M: int, N: int, K: int, dtype_bytes: int, act: int, head_dim: int = 0):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Two accumulators (SwiGLU) or fp32's
    three-pass tf32 dots take half the tile so that registers do not spill (sm_90 compile check).
    With the RoPE epilogue (head_dim > 0) a column tile holds whole heads and the tile is halved
    (its tables and rotated copy spilled at 128 x 128): 64 x 128, in fp32 32 x 128 at head dim 128."""
    if dtype_bytes == 4:
        return (32, 128, 32, 4, 2) if head_dim > 64 else (64, 64, 32, 4, 2)
    if head_dim:  # the tables and the rotated copy of the tile: 128 x 128 spilled
        return 64, 128, 64, 8, 3
    if act == ACT_SWIGLU:
        return 128, 64, 64, 8, 3
    return 128, 128, 64, 8, 3


ROPE_HEAD_DIMS = (16, 32, 64, 128)  # powers of two a column tile holds whole (DINOv3: 64; 7B: 128)


def fused_linear_fwd(x, weight, bias, weight2, bias2, residual, gamma, act, out, interpret=False,
                     cos=None, sin=None, ntok=1, rope_cols=0):
    """Launch on x (M, K), weight(s) (N, K), out (M, N); rows with unit column stride. With cos/sin
    ((HW, D), unit column stride), the first rope_cols columns of each row are rotated where the row's token
    (row % ntok) is one of the last HW. The caller has validated the arguments."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return
    act_id = ACTS[act]
    head_dim = cos.shape[1] if cos is not None else 0
    block_m, block_n, block_k, num_warps, num_stages = fused_linear_config(M, N, K, x.element_size(), act_id,
                                                                           head_dim)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    w2 = weight2 if weight2 is not None else weight
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, w2, bias2 if bias2 is not None else weight,
        residual if residual is not None else out, gamma if gamma is not None else weight, out,
        cos if cos is not None else weight, sin if sin is not None else weight,
        M, N, K,
        x.stride(0), weight.stride(0), w2.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), ntok, cos.shape[0] if cos is not None else 0, rope_cols,
        cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
        ACT=act_id, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None,
        ROPE=cos is not None, HEAD_DIM=max(head_dim, 1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        UPCAST=interpret and x.dtype != torch.float32,
        PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )


def compile_configs():
    """Every (signature, constexprs, options, attrs) fused_linear_fwd can launch, for the sm_90 compile
    check."""
    configs = []
    names = list(_fused_linear_kernel.arg_names)
    # the MLP epilogues, and the RoPE epilogue (no activation) at DINOv3's head dims 64 and 128 with
    # fp32 tables (dinov3) or tables in the activation dtype (transformers)
    variants = [(act, residual, 0, None) for act in (ACT_NONE, ACT_GELU, ACT_SWIGLU)
                for residual in (False, True)]
    variants += [(ACT_NONE, False, d, table) for d in (64, 128) for table in ("fp32", None)]
    for dtype, nbytes in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        for act, residual, head_dim, table in variants:
            if head_dim and table is None and dtype == "fp32":
                continue  # the same configuration as fp32 tables
            block_m, block_n, block_k, num_warps, num_stages = fused_linear_config(4096, 4096, 1024, nbytes,
                                                                                   act, head_dim)
            signature = {n: f"*{dtype}" for n in ("X", "W", "B", "W2", "B2", "R", "G", "Y")}
            signature.update(COS=f"*{table or dtype}", SIN=f"*{table or dtype}", M="i32", N="i32", K="i32")
            signature.update({n: "i32" for n in names if n.startswith("stride_")})
            signature.update(NTOK="i32", HW="i32", ROPE_COLS="i32", stride_cos="i32", stride_sin="i32")
            constexprs = dict(ACT=act, HAS_BIAS=True, HAS_RESIDUAL=residual, HAS_GAMMA=residual,
                              ROPE=head_dim > 0, HEAD_DIM=max(head_dim, 1),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, UPCAST=False,
                              PRECISION="tf32x3" if dtype == "fp32" else "tf32")
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in signature
                     if n.startswith("stride_") or signature[n].startswith("*") or n in ("N", "K")}
            signature = {n: signature[n] for n in names if n in signature}
            signature.update({n: "constexpr" for n in constexprs})
            configs.append((_fused_linear_kernel, signature, constexprs,
                            dict(num_warps=num_warps, num_stages=num_stages), attrs))
    return configs
