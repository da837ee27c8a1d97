"""masked_attention against what Mask2Former's decoder runs today, one masked cross-attention layer
at a time (in/out projections included in every provider, so the comparison is the layer):

- ``mha``: the models' path: sigmoid of the resized mask logits, repeat per head, `< 0.5`, the
  all-blocked-row fix-up, then nn.MultiheadAttention with that (B * heads, Q, HW) boolean mask;
- ``flex``: FlexAttention (compiled) with a block mask built from the same logits, build included;
- ``sdpa``: F.scaled_dot_product_attention with the same mask as a float (B, 1, Q, HW) additive mask
  (0 or -inf), built from the logits in the timed region: eager PyTorch's fused path for this layer;
- ``triton`` / ``cuda``: the projections, then fastdino's kernels reading the logits directly.

bf16 on the GPU, Q = 100 queries, 16 heads, HW 1024/4096/16384 keys (a 1/8, 1/16 or 1/32 level),
C = 256/384/2048. TFLOP/s counts the dense attention products (4 * B * heads * Q * HW * D).
"""

import pytest
import torch
from timing import bench_ms, cuda_timer, providers, quick

from fastdino import _ext
from fastdino.ops.masked_attention import blocked_keys, masked_attention

CUDA = torch.cuda.is_available()
SHAPES = [(1, 100, hw, c) for hw in (1024, 4096, 16384) for c in (256, 384, 2048)] if CUDA else [(1, 100, 256,
                                                                                                  256)]
SHAPES = quick(SHAPES, (0, 3))  # C 256 with HW 1024 and 4096 keys (1/16 and 1/8 of 512^2)
GPU_PROVIDERS = ["mha", "flex", "sdpa", "triton"] + (["cuda"] if _ext.BUILD["cuda"] else [])
PROVIDERS = providers(GPU_PROVIDERS if CUDA else (["mha"] + (["cpu"] if _ext.HAS_EXT else [])))
HEADS = 16


def make_layer(B, Q, HW, C, dtype, device):
    attn = torch.nn.MultiheadAttention(C, HEADS).to(device, dtype).eval()
    query, qpos = (torch.randn(Q, B, C, device=device, dtype=dtype) for _ in range(2))
    memory, pos = (torch.randn(HW, B, C, device=device, dtype=dtype) for _ in range(2))
    logits = torch.randn(B, Q, HW, device=device, dtype=dtype) * 3 - 1  # about 60% of keys blocked
    return attn, query, qpos, memory, pos, logits


def mha_layer(attn, query, qpos, memory, pos, logits):
    mask = (logits.sigmoid().unsqueeze(1).repeat(1, HEADS, 1, 1).flatten(0, 1) < 0.5).bool()
    mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
    return attn(query + qpos, memory + pos, memory, attn_mask=mask)[0]


def projections(attn, query, qpos, memory, pos):
    C = query.shape[-1]
    w, b = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    q = torch.nn.functional.linear(query + qpos, w[0], b[0])
    k = torch.nn.functional.linear(memory + pos, w[1], b[1])
    v = torch.nn.functional.linear(memory, w[2], b[2])
    return [t.view(t.shape[0], t.shape[1], HEADS, C // HEADS).transpose(0, 1) for t in (q, k, v)]


def fused_layer(backend):
    def run(attn, query, qpos, memory, pos, logits):
        q, k, v = projections(attn, query, qpos, memory, pos)
        out = masked_attention(q, k, v, logits, backend=backend)
        return attn.out_proj(out.transpose(0, 1).flatten(2))

    return run


def sdpa_layer(attn, query, qpos, memory, pos, logits):
    q, k, v = (t.transpose(1, 2) for t in projections(attn, query, qpos, memory, pos))
    mask = torch.zeros(logits.shape, dtype=q.dtype, device=q.device).masked_fill(blocked_keys(logits),
                                                                                  float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return attn.out_proj(out.permute(2, 0, 1, 3).flatten(2))


def flex_layer():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)

    def run(attn, query, qpos, memory, pos, logits):
        q, k, v = (t.transpose(1, 2) for t in projections(attn, query, qpos, memory, pos))
        open_keys = ~blocked_keys(logits)
        B, Q, HW = open_keys.shape
        block_mask = create_block_mask(lambda b, h, i, j: open_keys[b, i, j], B, None, Q, HW,
                                       device=query.device)
        out = flex(q, k, v, block_mask=block_mask)
        return attn.out_proj(out.permute(2, 0, 1, 3).flatten(2))

    return run


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,Q,HW,C", SHAPES)
def test_bench_masked_attention(benchmark, B, Q, HW, C, provider):
    dtype = torch.bfloat16 if CUDA else torch.float32
    args = make_layer(B, Q, HW, C, dtype, "cuda" if CUDA else "cpu")
    layers = {"mha": lambda: mha_layer, "flex": flex_layer, "sdpa": lambda: sdpa_layer}
    fn = layers.get(provider, lambda: fused_layer(provider))()
    benchmark.group = f"masked_attention Q={Q} HW={HW} C={C}"
    benchmark.extra_info.update(op="masked_attention", shape=f"B={B} Q={Q} HW={HW} C={C} heads={HEADS}",
                                dtype=str(dtype), provider=provider, baselines=["mha", "flex", "sdpa"])
    with torch.no_grad():
        ms = bench_ms(benchmark, lambda: fn(*args))
    if ms:
        benchmark.extra_info.update(ms=ms, metric="TFLOP/s",
                                    value=4 * B * HEADS * Q * HW * (C // HEADS) / ms / 1e9)
