"""Triton kernel of fused_linear: a Linear (x @ W^T + b) with the MLP's elementwise work in the
GEMM epilogue, so the wide hidden activation is written once and never re-read for it.

    ACT_GELU    y = gelu_erf(x @ W^T + b)                        (Mlp.fc1 + GELU)
    ACT_SWIGLU  y = silu(x @ W^T + b) * (x @ W2^T + b2)          (SwiGLU: both input projections,
                                                                  two accumulators, one pass over x)
    ACT_NONE    y = x @ W^T + b
    + residual  y = residual + gamma * y                        (fc2 + LayerScale + residual add)

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
    M, N, K,
    stride_xm, stride_wn, stride_w2n, stride_rm, stride_ym,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr,
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
    if HAS_RESIDUAL:
        if HAS_GAMMA:
            acc = acc * tl.load(G + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        r = tl.load(R + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc += r.to(tl.float32)
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask)


def fused_linear_config(M: int, N: int, K: int, dtype_bytes: int, act: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Two accumulators (SwiGLU) or fp32's
    three-pass tf32 dots take half the tile so that registers do not spill (sm_90 compile check)."""
    if dtype_bytes == 4:
        return 64, 64, 32, 4, 2
    if act == ACT_SWIGLU:
        return 128, 64, 64, 8, 3
    return 128, 128, 64, 8, 3


def fused_linear_fwd(x, weight, bias, weight2, bias2, residual, gamma, act, out, interpret=False):
    """Launch on x (M, K), weight(s) (N, K), out (M, N); rows with unit column stride. The caller has
    validated the arguments."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return
    act_id = ACTS[act]
    block_m, block_n, block_k, num_warps, num_stages = fused_linear_config(M, N, K, x.element_size(), act_id)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    w2 = weight2 if weight2 is not None else weight
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, w2, bias2 if bias2 is not None else weight,
        residual if residual is not None else out, gamma if gamma is not None else weight, out,
        M, N, K,
        x.stride(0), weight.stride(0), w2.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0),
        ACT=act_id, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None,
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
    for dtype, nbytes in (("fp32", 4), ("fp16", 2), ("bf16", 2)):
        for act in (ACT_NONE, ACT_GELU, ACT_SWIGLU):
            for residual in (False, True):
                block_m, block_n, block_k, num_warps, num_stages = fused_linear_config(4096, 4096, 1024,
                                                                                       nbytes, act)
                signature = {n: f"*{dtype}" for n in ("X", "W", "B", "W2", "B2", "R", "G", "Y")}
                signature.update(M="i32", N="i32", K="i32")
                signature.update({n: "i32" for n in names if n.startswith("stride_")})
                constexprs = dict(ACT=act, HAS_BIAS=True, HAS_RESIDUAL=residual, HAS_GAMMA=residual,
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, UPCAST=False,
                                  PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in signature
                         if n.startswith("stride_") or signature[n].startswith("*") or n in ("N", "K")}
                signature = {n: signature[n] for n in names if n in signature}
                signature.update({n: "constexpr" for n in constexprs})
                configs.append((_fused_linear_kernel, signature, constexprs,
                                dict(num_warps=num_warps, num_stages=num_stages), attrs))
    return configs
