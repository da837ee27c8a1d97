"""rope_attention against what DINOv3 runs today, from the qkv projection output to the (B, N, C)
input of the output projection:

- ``sdpa+rope``: the official code path: unbind, transpose, RoPE in eager (fp32 with casts),
  F.scaled_dot_product_attention (best backend available), transpose back;
- ``sdpa``: the same without RoPE (the attention alone; the bar a fused kernel must reach);
- ``flex``: compiled FlexAttention without RoPE (it cannot rotate q and k);
- ``triton`` / ``cuda``: fastdino's two forms, with RoPE.

TFLOP/s counts the two matmuls: 4 * B * H * N^2 * D.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import bench_ms, cuda_timer

from fastdino import _ext
from fastdino.ops.rope_attention import rope_attention, rope_ref

CUDA = torch.cuda.is_available()
# (B, H, N, D): ViT-S/16 (6 heads) and ViT-L/16 (16 heads) at 512^2 (N = 1029) and 1024^2 (N = 4101).
SHAPES = [(b, h, n, 64) for h in (6, 16) for n in (1029, 4101) for b in (1, 32)] if CUDA else [(1, 6, 197, 64)]
PROVIDERS = ["sdpa+rope", "sdpa", "flex", "triton", "cuda"] if CUDA else ["sdpa+rope", "cpu"]
PREFIX = 5  # cls + 4 registers


def official(qkv, cos, sin, rope=True):
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.unbind(2)
    if rope:
        q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(B, N, H * D)


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,H,N,D", SHAPES, ids=lambda v: str(v))
def test_bench_rope_attention(benchmark, B, H, N, D, provider):
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    if provider in ("cuda", "cpu") and _ext.ext_reasons(device):
        pytest.skip("; ".join(_ext.ext_reasons(device)))
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)
    angles = torch.rand(N - PREFIX, D // 2, device=device) * 6.283
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
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
