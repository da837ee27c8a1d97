"""What the flash-style attention kernels share (rope_attention, masked_attention): the online-softmax
step and the program -> (query block, batch, head) decode."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        EMPTY_ROWS: tl.constexpr):
    """Fold one key block into the running (acc, max, sum): s are the block's log2-scaled scores
    (-inf where a key is out of range or blocked), v its value rows. EMPTY_ROWS: a row may have no
    open key yet (m = -inf); it is shifted by 0 instead, so exp2 gives 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if EMPTY_ROWS:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)  # rounded to the storage type like any flash kernel's P
    if UPCAST:  # the interpreter's 16-bit dots are wrong; fp32 holds 16-bit values exactly
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def head_program(rows, BLOCK_M: tl.constexpr, H):
    """(query block, batch, head) of this program on a 1-D grid over (query block, batch * head),
    query blocks fastest (a head's programs share its k and v in L2; grid axis 1 stops at 65535).
    Batch and head in int64: they scale strides."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(rows, BLOCK_M)
    bh = pid // blocks_m
    return pid % blocks_m, (bh // H).to(tl.int64), (bh % H).to(tl.int64)
