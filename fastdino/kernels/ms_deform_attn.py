"""Triton kernel of ms_deform_attn: multi-scale deformable attention, forward.

One program takes BLOCK_Q queries of one (batch, head) and all Dh channels of that head
(BLOCK_D >= Dh, masked). It walks the levels in a loop unrolled at compile time (L is constexpr):
per level it reads the shape (H_l, W_l) from the device tensor once (no host synchronisation) and
carries the level's first row from the shapes before it (levels packed in order, level_start_index
is never read); an inner runtime loop over the P points then computes each sample's four bilinear
corners (F.grid_sample, align_corners=False, zero padding: out-of-map corners contribute 0),
gathers their value rows as (BLOCK_Q, BLOCK_D) tiles and accumulates weight * corner weight * value
in fp32; the output is written once, so there are no atomics. Rows outside [0, S) are never read,
so shapes that disagree with value's length cannot read out of bounds. NaN and Inf follow
F.grid_sample (see the op's docstring).

Given reference points (R = 2 or 4 coordinates per level), LOC and ATTW hold the module's raw
sampling offsets and attention logits: a first pass over the L * P logits of each query gives the
softmax's max and sum (fp32, two values per query, so no (BLOCK_Q, L * P) tile in registers), and
each sample's location and weight are formed where they are used (a level's reference point is
read once per level).
"""

import triton
import triton.language as tl


@triton.jit
def _ms_deform_attn_fwd_kernel(
    V,  # (B, S, Hh, Dh) value, contiguous
    SHAPES,  # (L, 2) int64: (H_l, W_l), levels packed in order
    LOC,  # (B, Lq, Hh, L, P, 2) sampling locations in [0, 1] (x, y), contiguous
    ATTW,  # (B, Lq, Hh, L, P) attention weights, contiguous
    REF,  # R > 0: (B or 1, Lq, L, R) fp32 reference points; LOC then holds offsets and ATTW logits
    OUT,  # (B, Lq, Hh * Dh)
    Lq, S, Hh, stride_ref_b,  # stride_ref_b: 0 when one set of reference points serves the batch
    Dh: tl.constexpr, L: tl.constexpr, P: tl.constexpr, R: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One grid axis for (query block, batch * head), query blocks fastest: axis 1 stops at 65535.
    pid = tl.program_id(0)
    blocks_q = tl.cdiv(Lq, BLOCK_Q)
    pid_q = pid % blocks_q
    bh = pid // blocks_q
    b = bh // Hh
    h = bh % Hh
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < Lq
    d_ok = d < Dh
    # 32-bit where the op's reasons bound the values (B * Lq * Hh and S * Hh * Dh at most
    # 2**31 - 1): int64 query-head and row indices cost this kernel up to 16 more registers and
    # a quarter more instructions on sm_90.
    qh = ((b * Lq + q) * Hh + h).to(tl.int64)  # (BLOCK_Q,) flattened (b, q, h); times L * P in int64
    v_head = V + (b.to(tl.int64) * S * Hh + h) * Dh  # value rows of one batch item: int32 below

    if R > 0:  # softmax statistics over the L * P logits, online
        m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_Q,), tl.float32)
        # L * P constexpr: the compiler unrolls this and issues all the logits' loads up front.
        for s in tl.range(L * P, num_stages=1):
            x = tl.load(ATTW + qh * (L * P) + s, mask=q_ok, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, x)
            total = total * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        inv_total = 1.0 / total
        ref_q = REF + b.to(tl.int64) * stride_ref_b + q.to(tl.int64) * (L * R)

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    # Levels unrolled, points a runtime loop: the shape, first row and reference point of a level are
    # read once, not per sample: on sm_90 a sample's loop body loses up to 17% of its instructions
    # and up to 14 of its 16-29 loads against one flat loop over the L * P samples, but the level's
    # values stay live across the point loop: up to 19 more registers (fewer CTAs per SM), no spills.
    start = 0  # first row of level l: the rows of the levels before it
    for l in tl.static_range(L):
        Hl_i = tl.load(SHAPES + 2 * l)
        Wl_i = tl.load(SHAPES + 2 * l + 1)
        Hl = Hl_i.to(tl.float32)
        Wl = Wl_i.to(tl.float32)
        if R > 0:
            rx = tl.load(ref_q + l * R, mask=q_ok, other=0.0)
            ry = tl.load(ref_q + l * R + 1, mask=q_ok, other=0.0)
            if R == 4:
                rw = tl.load(ref_q + l * R + 2, mask=q_ok, other=0.0)
                rh = tl.load(ref_q + l * R + 3, mask=q_ok, other=0.0)
        # Not unrolled and not pipelined: unrolled, the compiler keeps many gathers in flight and
        # takes 64-255 registers on sm_90, spilling in 4 of the fp32 configurations; multi-stage spills.
        for p in tl.range(P, num_stages=1):
            s = l * P + p
            lx = tl.load(LOC + (qh * (L * P) + s) * 2, mask=q_ok, other=0.0).to(tl.float32)
            ly = tl.load(LOC + (qh * (L * P) + s) * 2 + 1, mask=q_ok, other=0.0).to(tl.float32)
            a = tl.load(ATTW + qh * (L * P) + s, mask=q_ok, other=0.0).to(tl.float32)
            if R > 0:  # offsets and logits -> locations and weights, as Deformable DETR computes them
                a = tl.exp(a - m) * inv_total
                if R == 2:
                    lx = rx + lx / Wl
                    ly = ry + ly / Hl
                else:
                    lx = rx + lx / P * rw * 0.5
                    ly = ry + ly / P * rh * 0.5
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
                # Narrowed before the bounds test (cheaper): memory-safe, though a level past 2**31
                # rows, which disagrees with S, may wrap into [0, S) rather than be skipped.
                row = (start + tl.where(ok, cy, 0.0).to(tl.int64) * Wl_i
                       + tl.where(ok, cx, 0.0).to(tl.int64)).to(tl.int32)
                ok = ok & (row >= 0) & (row < S)
                # (row * Hh) * Dh with Dh constexpr: the compiler sees rows aligned to Dh and vectorises.
                vals = tl.load(v_head + ((row * Hh) * Dh)[:, None] + d[None, :],
                               mask=ok[:, None] & d_ok[None, :], other=0.0)
                # An off-map corner loads 0: it adds 0, or NaN where a * w is not finite (a NaN or
                # infinite location makes w NaN; a NaN weight), as grid_sample's NaN. An in-map corner
                # is read even at weight 0, as grid_sample reads it.
                acc += (a * w)[:, None] * vals.to(tl.float32)
        start += Hl_i * Wl_i
    out = OUT + qh[:, None] * Dh + d[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def ms_deform_attn_config(Dh: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, num_warps): about 1024 accumulators per program, 8 per thread; with
    four corner gathers in flight, 16 per thread already spilled at Dh 32 and 128."""
    block_d = triton.next_power_of_2(max(Dh, 1))
    block_q = max(8, min(128, 1024 // block_d))
    return block_q, block_d, 4


def ms_deform_attn_fwd(value, spatial_shapes, sampling_locations, attention_weights, out,
                       reference_points=None):
    """Launch on validated, contiguous arguments (see fastdino/ops/ms_deform_attn.py)."""
    B, S, Hh, Dh = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    if out.numel() == 0:
        return
    ref = reference_points
    R = 0 if ref is None else ref.shape[3]
    stride_ref_b = 0 if ref is None or ref.shape[0] == 1 else Lq * L * R
    block_q, block_d, num_warps = ms_deform_attn_config(Dh)
    grid = (triton.cdiv(Lq, block_q) * B * Hh,)
    _ms_deform_attn_fwd_kernel[grid](
        value, spatial_shapes, sampling_locations, attention_weights,
        sampling_locations if ref is None else ref, out, Lq, S, Hh, stride_ref_b,
        Dh=Dh, L=L, P=P, R=R, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps,
    )


# (Dh, L) of the real models: adapter extractors (L = 1, Dh = D/32: 12 for ViT-S, 128 for 7B) and
# pixel decoder layers (L = 3, Dh = hidden/16: 2, 24, 128); L = 4 for Deformable-DETR-style heads.
COMPILE_SHAPES = [(12, 1), (128, 1), (2, 3), (24, 3), (128, 3), (32, 4)]


def compile_configs():
    """(kernel, signature, constexprs, options) for the sm_90 compile check: both input forms
    (locations, R = 0; offsets from points, R = 2) for every shape, boxes (R = 4) at L = 4; fp32
    locations, and bf16 offsets with bf16 values as autocast gives them."""
    configs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for Dh, L in COMPILE_SHAPES:
            for R in (0, 2, 4) if L == 4 else (0, 2):
                block_q, block_d, num_warps = ms_deform_attn_config(Dh)
                ldtype = dtype if (R == 2 and dtype == "bf16") else "fp32"
                signature = {"V": f"*{dtype}", "SHAPES": "*i64", "LOC": f"*{ldtype}",
                             "ATTW": f"*{ldtype}", "REF": "*fp32", "OUT": f"*{dtype}", "Lq": "i32",
                             "S": "i32",
                             "Hh": "i32", "stride_ref_b": "i32"}
                constexprs = dict(Dh=Dh, L=L, P=4, R=R, BLOCK_Q=block_q, BLOCK_D=block_d)
                signature.update({name: "constexpr" for name in constexprs})
                # Fresh allocations are 16-byte aligned, and launch specialises on it: compile the same.
                order = list(_ms_deform_attn_fwd_kernel.arg_names)
                attrs = {(order.index(n),): [["tt.divisibility", 16]]
                         for n in ("V", "SHAPES", "LOC", "ATTW", "REF", "OUT")}
                configs.append((_ms_deform_attn_fwd_kernel, signature, constexprs, dict(num_warps=num_warps),
                                attrs))
    return configs
