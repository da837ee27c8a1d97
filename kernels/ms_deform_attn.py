"""Triton kernel of ms_deform_attn: multi-scale deformable attention, forward.

One program takes BLOCK_Q queries of one (batch, head) and all Dh channels of that head
(BLOCK_D >= Dh, masked). For each of the L * P samples it computes the four bilinear corners
(F.grid_sample, align_corners=False, zero padding: out-of-map corners contribute 0), gathers their
value rows as (BLOCK_Q, BLOCK_D) tiles and accumulates weight * corner weight * value in fp32; the
output is written once, so there are no atomics. The level shapes and start offsets are read from
the device tensors (no host synchronisation); rows outside [0, S) are never read, so shapes that
disagree with value's length cannot read out of bounds.
"""

import triton
import triton.language as tl


@triton.jit
def _ms_deform_attn_fwd_kernel(
    V,  # (B, S, Hh, Dh) value, contiguous
    SHAPES,  # (L, 2) int64: (H_l, W_l)
    STARTS,  # (L,) int64: first row of each level
    LOC,  # (B, Lq, Hh, L, P, 2) sampling locations in [0, 1] (x, y), contiguous
    ATTW,  # (B, Lq, Hh, L, P) attention weights, contiguous
    OUT,  # (B, Lq, Hh * Dh)
    Lq, S, Hh,
    Dh: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hh
    h = bh % Hh
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < Lq
    d_ok = d < Dh
    qh = ((b * Lq + q) * Hh + h).to(tl.int64)  # (BLOCK_Q,) flattened (b, q, h)
    v_head = V + (b.to(tl.int64) * S * Hh + h) * Dh  # offsets within one batch fit int32

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    # A runtime loop over the L * P samples, not pipelined: unrolled or multi-stage, the compiler
    # keeps many gathers in flight and spills.
    for s in tl.range(L * P, num_stages=1):
        l = s // P
        Hl = tl.load(SHAPES + 2 * l).to(tl.float32)
        Wl_i = tl.load(SHAPES + 2 * l + 1)
        Wl = Wl_i.to(tl.float32)
        start = tl.load(STARTS + l)
        lx = tl.load(LOC + (qh * (L * P) + s) * 2, mask=q_ok, other=0.0).to(tl.float32)
        ly = tl.load(LOC + (qh * (L * P) + s) * 2 + 1, mask=q_ok, other=0.0).to(tl.float32)
        a = tl.load(ATTW + qh * (L * P) + s, mask=q_ok, other=0.0).to(tl.float32)
        x = lx * Wl - 0.5
        y = ly * Hl - 0.5
        x0 = tl.floor(x)
        y0 = tl.floor(y)
        fx = x - x0
        fy = y - y0
        for corner in tl.static_range(4):
            dy = corner // 2
            dx = corner % 2
            cx = x0 + dx
            cy = y0 + dy
            # Validity in float: far-out (or NaN) locations need not fit an int.
            ok = q_ok & (cx >= 0.0) & (cx <= Wl - 1.0) & (cy >= 0.0) & (cy <= Hl - 1.0)
            w = (fy if dy == 1 else 1.0 - fy) * (fx if dx == 1 else 1.0 - fx)
            row = (start + tl.where(ok, cy, 0.0).to(tl.int64) * Wl_i + tl.where(ok, cx, 0.0).to(tl.int64)).to(tl.int32)
            ok = ok & (row >= 0) & (row < S)
            # (row * Hh) * Dh with Dh constexpr: the compiler sees rows aligned to Dh and vectorises.
            vals = tl.load(v_head + ((row * Hh) * Dh)[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :],
                           other=0.0)
            acc += (a * w)[:, None] * vals.to(tl.float32)
    out = OUT + qh[:, None] * Dh + d[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def ms_deform_attn_config(Dh: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, num_warps): about 1024 accumulators per program, 8 per thread; with
    four corner gathers in flight, 16 per thread already spilled at Dh 32 and 128."""
    block_d = triton.next_power_of_2(max(Dh, 1))
    block_q = max(8, min(128, 1024 // block_d))
    return block_q, block_d, 4


def ms_deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out):
    """Launch on validated, contiguous arguments (see fastdino/ops/ms_deform_attn.py)."""
    B, S, Hh, Dh = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    if out.numel() == 0:
        return
    block_q, block_d, num_warps = ms_deform_attn_config(Dh)
    grid = (triton.cdiv(Lq, block_q), B * Hh)
    _ms_deform_attn_fwd_kernel[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        Lq, S, Hh, Dh=Dh, L=L, P=P, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps,
    )


# (Dh, L) of the real models: adapter extractors (L = 1, Dh = D/32: 12 for ViT-S, 128 for 7B) and
# pixel decoder layers (L = 3, Dh = hidden/16: 2, 24, 128); L = 4 for Deformable-DETR-style heads.
COMPILE_SHAPES = [(12, 1), (128, 1), (2, 3), (24, 3), (128, 3), (32, 4)]


def compile_configs():
    """(kernel, signature, constexprs, options) for the sm_90 compile check."""
    configs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for Dh, L in COMPILE_SHAPES:
            block_q, block_d, num_warps = ms_deform_attn_config(Dh)
            signature = {"V": f"*{dtype}", "SHAPES": "*i64", "STARTS": "*i64", "LOC": "*fp32", "ATTW": "*fp32",
                         "OUT": f"*{dtype}", "Lq": "i32", "S": "i32", "Hh": "i32"}
            constexprs = dict(Dh=Dh, L=L, P=4, BLOCK_Q=block_q, BLOCK_D=block_d)
            signature.update({name: "constexpr" for name in constexprs})
            # Fresh allocations are 16-byte aligned, and launch specialises on it: compile the same.
            order = list(_ms_deform_attn_fwd_kernel.arg_names)
            attrs = {(order.index(n),): [["tt.divisibility", 16]] for n in ("V", "SHAPES", "STARTS", "LOC", "ATTW", "OUT")}
            configs.append((_ms_deform_attn_fwd_kernel, signature, constexprs, dict(num_warps=num_warps), attrs))
    return configs
