"""rope_attention against what DINOv3 runs today, from the qkv projection output to the (B, N, C)
input of the output projection:

- ``sdpa+rope``: the official code path: unbind, transpose, RoPE in eager (fp32 with casts),
  F.scaled_dot_product_attention (best backend available), transpose back;
- ``sdpa``: the same without RoPE (the attention alone; the bar a fused kernel must reach);
- ``flex``: compiled FlexAttention without RoPE (it cannot rotate q and k);
- ``triton`` / ``cuda``: fastdino's two forms, with RoPE.

TFLOP/s counts the two matmuls: 4 * B * H * N^2 * D.

EoMT's masked blocks (test_bench_rope_attention_eomt: 200 queries prepended to cls + 4 registers
+ 40 x 40 patches of a 640^2 image, the queries masked to their predicted patches):

- ``sdpa+dense``: EoMT-DINOv3's path: eager RoPE, the (B, heads, N, N) additive mask built from
  the logits (bool N x N, query -> patch part from logit > 0, expanded, to float), SDPA with it;
- ``flex``: compiled FlexAttention with a block mask from the same logits, build included, no RoPE;
- ``triton`` / ``cuda``: fastdino with the logits as they are, with RoPE.
"""

import pytest
import torch
import torch.nn.functional as F
from timing import bench_device, bench_ms, cuda_timer, providers, quick

from fastdino.fused.vit import eomt_dense_mask
from fastdino.ops.rope_attention import rope_attention, rope_ref

CUDA = torch.cuda.is_available()
# (B, H, N, D): ViT-S/16 (6 heads) and ViT-L/16 (16 heads) at 512^2 (N = 1029) and 1024^2 (N = 4101).
SHAPES = [(b, h, n, 64) for h in (6, 16) for n in (1029, 4101) for b in (1, 32)] if CUDA else [(1, 6, 197,
                                                                                                64)]
SHAPES = quick(SHAPES, (0, 4))  # ViT-S and ViT-L at 512^2, batch 1
PROVIDERS = providers(["sdpa+rope", "sdpa", "flex", "triton", "cuda"] if CUDA else ["sdpa+rope", "cpu"])
PREFIX = 5  # cls + 4 registers


def official(qkv, cos, sin, rope=True):
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.unbind(2)
    if rope:
        q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(B, N, H * D)


def inputs(B, N, H, D, hw, device, dtype):
    """A fused qkv projection output (B, N, 3, H, D) and RoPE tables for the trailing hw tokens."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)
    angles = torch.rand(hw, D // 2, device=device) * 6.283
    angles = torch.cat((angles, angles), -1)
    return qkv, angles.cos(), angles.sin()


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,H,N,D", SHAPES, ids=lambda v: str(v))
def test_bench_rope_attention(benchmark, B, H, N, D, provider):
    device, dtype = bench_device(provider)
    qkv, cos, sin = inputs(B, N, H, D, N - PREFIX, device, dtype)
    if provider == "sdpa+rope":
        fn = lambda: official(qkv, cos, sin)  # noqa: E731
    elif provider == "sdpa":
        fn = lambda: official(qkv, cos, sin, rope=False)  # noqa: E731
    elif provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        fn = lambda: flex(q, k, v).transpose(1, 2).reshape(B, N, H * D)  # noqa: E731
    else:
        q, k, v = qkv.unbind(2)
        fn = lambda: rope_attention(q, k, v, cos, sin, backend=provider).reshape(B, N, H * D)  # noqa: E731
    benchmark.group = f"rope_attention B={B} H={H} N={N} D={D} {dtype}"
    benchmark.extra_info.update(op="rope_attention", shape=f"B={B} H={H} N={N} D={D}", dtype=str(dtype),
                                provider=provider, baselines=["sdpa+rope", "sdpa"])
    ms = bench_ms(benchmark, fn)
    if ms:
        benchmark.extra_info.update(ms=ms, metric="TFLOP/s", value=4 * B * H * N * N * D / ms / 1e9)


# The projection in front, for the RoPE epilogue (fused_linear with cos/sin): from the block's
# normed input x (B, N, C) to the attention's output, the qkv GEMM included in every provider.
PROJECTION_PROVIDERS = providers(["linear+sdpa+rope", "linear+sdpa", "linear+cuda", "epilogue+sdpa"] if CUDA
                                 else ["linear+sdpa+rope", "linear+cpu"])


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROJECTION_PROVIDERS)
@pytest.mark.parametrize("B,H,N,D", SHAPES, ids=lambda v: str(v))
def test_bench_rope_attention_projection(benchmark, B, H, N, D, provider):
    """- ``linear+sdpa+rope``: F.linear (cuBLAS), then the official path; ``linear+sdpa``: without
    RoPE (the bar); ``linear+cuda``: F.linear, then rope_attention's C++ form (a rotation pass, then
    SDPA); ``epilogue+sdpa``: fused_linear's Triton GEMM rotating q and k in its epilogue, then SDPA
    on them as they are. TFLOP/s counts the GEMM and the two attention matmuls."""
    from fastdino.ops.fused_linear import fused_linear

    device, dtype = bench_device(provider.split("+")[-1])
    C = H * D
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    w = (torch.randn(3 * C, C, device=device) / C**0.5).to(dtype)
    bias = torch.randn(3 * C, device=device, dtype=dtype)
    _, cos, sin = inputs(1, 1, 1, D, N - PREFIX, device, dtype)

    def attend(qkv, rope, backend=None):
        qkv = qkv.view(B, N, 3, H, D)
        if backend is None:
            return official(qkv, cos, sin, rope=rope)
        return rope_attention(*qkv.unbind(2), cos, sin, backend=backend).reshape(B, N, C)

    if provider == "epilogue+sdpa":
        fn = lambda: attend(fused_linear(x, w, bias, cos=cos, sin=sin, rope_cols=2 * C, backend="triton"),  # noqa: E731
                            rope=False)
    else:
        backend = None if "sdpa" in provider else provider.split("+")[-1]
        fn = lambda: attend(F.linear(x, w, bias), rope="rope" in provider, backend=backend)  # noqa: E731
    benchmark.group = f"rope_attention+qkv B={B} H={H} N={N} D={D} {dtype}"
    benchmark.extra_info.update(op="rope_attention+qkv", shape=f"B={B} H={H} N={N} D={D}", dtype=str(dtype),
                                provider=provider, baselines=["linear+sdpa+rope", "linear+sdpa"])
    ms = bench_ms(benchmark, fn)
    if ms:
        flops = 2 * B * N * C * 3 * C + 4 * B * H * N * N * D
        benchmark.extra_info.update(ms=ms, metric="TFLOP/s", value=flops / ms / 1e9)


# (B, H, queries, HW): EoMT-DINOv3 S (6 heads) and L (16 heads) at 640^2, 200 queries
EOMT_SHAPES = [(1, 6, 200, 1600), (1, 16, 200, 1600)] if CUDA else [(1, 6, 20, 64)]
EOMT_PROVIDERS = providers(["sdpa+dense", "flex", "triton", "cuda"] if CUDA else ["sdpa+dense", "cpu"])


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", EOMT_PROVIDERS)
@pytest.mark.parametrize("B,H,Q,HW", EOMT_SHAPES, ids=lambda v: str(v))
def test_bench_rope_attention_eomt(benchmark, B, H, Q, HW, provider):
    device, dtype = bench_device(provider)
    D, N = 64, Q + PREFIX + HW
    qkv, cos, sin = inputs(B, N, H, D, HW, device, dtype)
    logits = (torch.randn(B, Q, HW, device=device) * 3 - 1).to(dtype)  # about 60% of the patches blocked
    q, k, v = qkv.unbind(2)
    if provider == "sdpa+dense":
        def fn():
            qr, kr = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
            mask = eomt_dense_mask(logits, N, H, dtype)
            out = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                                 mask)
            return out.transpose(1, 2).reshape(B, N, H * D)
    elif provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def fn():
            open_ = logits > 0

            def open_key(b, h, i, j):
                return (i >= Q) | (j < N - HW) | open_[b, i.clamp(max=Q - 1), (j - (N - HW)).clamp(min=0)]

            block = create_block_mask(open_key, B, None, N, N, device=device)
            return flex(qt, kt, vt, block_mask=block).transpose(1, 2).reshape(B, N, H * D)
    else:
        fn = lambda: rope_attention(q, k, v, cos, sin, backend=provider,  # noqa: E731
                                    mask_logits=logits).reshape(B, N, H * D)
    benchmark.group = f"rope_attention EoMT B={B} H={H} Q={Q} HW={HW} {dtype}"
    benchmark.extra_info.update(op="rope_attention", shape=f"EoMT B={B} H={H} Q={Q} HW={HW} D={D}",
                                dtype=str(dtype), provider=provider, baselines=["sdpa+dense", "flex"])
    ms = bench_ms(benchmark, fn)
    if ms:
        benchmark.extra_info.update(ms=ms, metric="TFLOP/s", value=4 * B * H * N * N * D / ms / 1e9)
