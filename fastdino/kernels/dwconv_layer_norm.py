"""Triton kernel of dwconv_layer_norm: depthwise KxK conv (+ bias), then LayerNorm over channels.

One program computes BLOCK_W pixels of one image row with all their channels (BLOCK_C >= C), so
the conv output never leaves registers: it is rounded to the storage dtype (as the unfused conv
stores it), normalised with fp32 statistics and written once as (B, H, W, C) tokens. The input is
read through its strides, so NCHW and channels-last tensors take the same kernel; the K x K halo
of a row tile is re-read by its neighbours through L1/L2 (Triton has no explicit shared memory;
the CUDA kernel stages its halo there). C is capped at MAX_C: beyond it a pixel's channels no
longer fit in one program's registers (checked by the sm_90 compile test).

The kernel reads the conv weight transposed, (K * K, C) contiguous, so that each tap's load is one
coalesced vector of channels; the (C, 1, K, K) layout makes it a gather K * K elements apart, one
sector per channel: from C = 256 on, more sectors than the input's own loads (bf16). The launcher
makes the transposed copy on every call (`transposed_weight`): one small extra launch, against a
gather that grows with the batch.
"""

import triton
import triton.language as tl

MAX_C = 2048
K_SUPPORTED = 7  # ConvNeXt's depthwise kernel; the conv is unrolled over K * K taps


@triton.jit
def _dwconv_layer_norm_fwd_kernel(
    X,  # (B, C, H, W), any strides (NCHW or channels-last)
    WT,  # (K * K, C) contiguous: the conv weight transposed
    BC,  # (C,) conv bias; unused when HAS_BIAS is False
    NW,  # (C,) LayerNorm weight
    NB,  # (C,) LayerNorm bias
    Z,  # (B, H, W, C) contiguous out
    C,
    H,
    W,
    sxb,
    sxc,
    sxh,
    sxw,
    tiles_w,
    eps,
    HAS_BIAS: tl.constexpr,
    K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One axis for (b, h, w-tile): grid axes 1 and 2 stop at 65535.
    pid = tl.program_id(0)
    tile_w = pid % tiles_w
    bh = pid // tiles_w
    h = bh % H
    b = bh // H
    w = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    c_ok = c < C
    xb = X + b.to(tl.int64) * sxb + c.to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    w_in = w - K // 2  # input column of tap dx = 0
    for dy in range(K):  # a loop, not unrolled: 49 unrolled taps keep too many loads in flight
        # a (1, 1) tensor: the interpreter rejects masks combined with a scalar comparison
        hh = tl.full((1, 1), h + dy - K // 2, tl.int32)
        row_ok = c_ok & (hh >= 0) & (hh < H)
        # int64 offsets within the image too (it may span 2**31 elements): a scalar per kernel row,
        # a (BLOCK_W, 1) column per tap, next to the (BLOCK_W, BLOCK_C) load they address
        xr = xb + hh.to(tl.int64) * sxh
        for dx in tl.static_range(K):
            ww = w_in + dx
            m = row_ok & (ww >= 0) & (ww < W)
            xv = tl.load(xr + ww.to(tl.int64) * sxw, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(WT + (dy * K + dx) * C + c, mask=c_ok, other=0.0).to(tl.float32)
            acc += xv * wv
    if HAS_BIAS:
        acc += tl.load(BC + c, mask=c_ok, other=0.0).to(tl.float32)
    # The conv output as the unfused model stores it, then statistics over the rounded values.
    y = tl.where(c_ok, acc.to(Z.dtype.element_ty).to(tl.float32), 0.0)
    mean = tl.sum(y, axis=1) / C
    d = tl.where(c_ok, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    nw = tl.load(NW + c, mask=c_ok, other=0.0).to(tl.float32)
    nb = tl.load(NB + c, mask=c_ok, other=0.0).to(tl.float32)
    z = d * rstd[:, None] * nw + nb
    out = (bh.to(tl.int64) * W + w) * C + c
    tl.store(Z + out, z.to(Z.dtype.element_ty), mask=(w < W) & c_ok)


# BLOCK_C -> (BLOCK_W, num_warps): 2048 fp32 accumulators per program, the largest tile that
# compiles for sm_90 without spilled registers in all three dtypes with triton 3.6 and 3.9 (ptxas
# spills some neighbouring shapes, e.g. BLOCK_C 256 with 8 pixels on 8 warps in fp16, and every
# BLOCK_C 4096 tile with 3.6; tests/sm90_compile.py checks these). With the transposed weight, triton
# 3.9: 100-206 registers, none spilled (fewer than with the (C, 1, K, K) gather for BLOCK_C >= 64).
TILES = {16: (32, 2), 32: (32, 4), 64: (32, 8), 128: (16, 8), 256: (8, 4), 512: (4, 4), 1024: (2, 8),
         2048: (1, 8)}


def dwconv_layer_norm_config(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_W, num_warps) for C channels."""
    block_c = max(triton.next_power_of_2(C), 16)
    return (block_c, *TILES[block_c])


def transposed_weight(weight):
    """weight (C, 1, K, K) as (K * K, C) contiguous, copied on every call: C * K * K elements, one
    small launch. A copy kept across calls would go stale unseen where the weight is written through
    `.data` (an EMA teacher's update), which leaves the version counter unchanged."""
    C, taps = weight.shape[0], weight.shape[2] * weight.shape[3]
    return weight.detach().reshape(C, taps).t().contiguous()


def dwconv_layer_norm_fwd(x, weight, bias, norm_weight, norm_bias, eps, z):
    """Launch on x (B, C, H, W) with any strides and z (B, H, W, C) contiguous; the caller has
    validated the arguments (K == K_SUPPORTED, C <= MAX_C, one dtype, contiguous parameters)."""
    B, C, H, W = x.shape
    if z.numel() == 0:
        return
    block_c, block_w, num_warps = dwconv_layer_norm_config(C)
    tiles_w = triton.cdiv(W, block_w)
    grid = (B * H * tiles_w,)
    wt = transposed_weight(weight)
    _dwconv_layer_norm_fwd_kernel[grid](
        x, wt, bias if bias is not None else norm_bias, norm_weight, norm_bias, z, C, H, W,
        *x.stride(), tiles_w, eps,
        HAS_BIAS=bias is not None, K=weight.shape[-1], BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps,
    )


def compile_configs():
    """Every (signature, constexprs, options) dwconv_layer_norm_fwd can launch, for the sm_90
    compile check."""
    for block_c, (block_w, num_warps) in TILES.items():
        for dtype in ("fp32", "fp16", "bf16"):
            for has_bias in (True, False):
                signature = {n: f"*{dtype}" for n in ("X", "WT", "BC", "NW", "NB", "Z")}
                signature.update({n: "i32" for n in ("C", "H", "W", "sxb", "sxc", "sxh", "sxw", "tiles_w")})
                signature.update(eps="fp32", HAS_BIAS="constexpr", K="constexpr", BLOCK_W="constexpr",
                                 BLOCK_C="constexpr")
                constexprs = {"HAS_BIAS": has_bias, "K": K_SUPPORTED, "BLOCK_W": block_w, "BLOCK_C": block_c}
                yield _dwconv_layer_norm_fwd_kernel, signature, constexprs, {"num_warps": num_warps}
