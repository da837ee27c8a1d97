"""Triton kernel of add_layer_norm:  y = x + gamma * branch ;  z = LayerNorm(y).

One program normalises ROWS rows held whole in registers (BLOCK_C >= C), so x and branch are read
once and y, z written once: 4 passes over the activation, the minimum. Short rows are batched
ROWS at a time so that a program still moves a few KB. C is capped at MAX_C: beyond it a row no
longer fits in the registers of one program without spilling (checked by the sm_90 compile test).
"""

import triton
import triton.language as tl

MAX_C = 8192


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # (rows, C) contiguous
    BR,  # (rows, C) branch, same dtype as X
    G,  # (C,) LayerScale gamma; unused when HAS_GAMMA is False
    W,  # (C,) LayerNorm weight
    B,  # (C,) LayerNorm bias
    Y,  # (rows, C) out: x + gamma * branch
    Z,  # (rows, C) out: LayerNorm(y)
    rows,
    C,
    eps,
    HAS_GAMMA: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    # rows and offsets in int64: x may hold 2**31 elements or more
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    col_ok = c < C
    mask = (r < rows) & col_ok
    off = r * C + c
    # Statistics in fp32 whatever the storage type.
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    br = tl.load(BR + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        br = br * tl.load(G + c, mask=col_ok, other=0.0).to(tl.float32)
    y = (x + br).to(Y.dtype.element_ty)
    tl.store(Y + off, y, mask=mask)
    # Normalise the stored (rounded) y, as the unfused model does.
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    mean = tl.sum(yf, axis=1) / C
    d = tl.where(mask, yf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    w = tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + c, mask=col_ok, other=0.0).to(tl.float32)
    z = d * rstd[:, None] * w + b
    tl.store(Z + off, z.to(Z.dtype.element_ty), mask=mask)


def add_layer_norm_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps) for rows of C elements: about 8 elements per thread."""
    block_c = max(triton.next_power_of_2(C), 32)
    rows = max(1, 2048 // block_c)
    num_warps = min(16, max(1, block_c * rows // 256))
    return block_c, rows, num_warps


def add_layer_norm_fwd(x, branch, gamma, weight, bias, eps, y, z):
    """Launch on contiguous x, branch, y, z of shape (..., C), read as (rows, C), and (C,) gamma
    (or None), weight and bias; the caller has validated the arguments. One program per ROWS rows,
    along grid axis 0; offsets are int64."""
    C = x.shape[-1]
    rows = x.numel() // C
    if rows == 0:
        return
    block_c, rows_per_prog, num_warps = add_layer_norm_config(C)
    grid = (triton.cdiv(rows, rows_per_prog),)
    _add_layer_norm_fwd_kernel[grid](
        x, branch, gamma if gamma is not None else weight, weight, bias, y, z, rows, C, eps,
        HAS_GAMMA=gamma is not None, BLOCK_C=block_c, ROWS=rows_per_prog, num_warps=num_warps,
    )


def compile_configs():
    """Every (signature, constexprs, options) add_layer_norm_fwd can launch, for the sm_90 compile check."""
    block_c = 32
    while block_c <= MAX_C:
        _, rows, num_warps = add_layer_norm_config(block_c)
        for dtype in ("fp32", "fp16", "bf16"):
            for has_gamma in (True, False):
                signature = {n: f"*{dtype}" for n in ("X", "BR", "G", "W", "B", "Y", "Z")}
                signature.update(rows="i32", C="i32", eps="fp32", HAS_GAMMA="constexpr", BLOCK_C="constexpr",
                                 ROWS="constexpr")
                constexprs = {"HAS_GAMMA": has_gamma, "BLOCK_C": block_c, "ROWS": rows}
                yield _add_layer_norm_fwd_kernel, signature, constexprs, {"num_warps": num_warps}
        block_c *= 2
