"""ms_deform_attn against what the DINOv3 segmentor runs today between its projections and the
output projection: the softmax of the attention logits, the offset -> location arithmetic and
F.grid_sample per level, in fp32 (``grid_sample``, the dinov3 and transformers code path),
torch.compile of the same (``compile``), and fastdino's ``cuda`` and ``triton`` kernels, which
take the raw offsets and logits (the fused form the patched modules call), in fp32 (the models'
default precision) and with bf16 values, offsets and logits (the bf16 policy).

GB/s counts the bytes that must move once: value, offsets, logits, reference points and the output.
"""

import pytest
import torch
from test_ms_deform_attn import make_offset_inputs
from timing import bench_ms, cuda_timer, providers, quick

from fastdino import _ext
from fastdino.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_ref

CUDA = torch.cuda.is_available()
PIXEL_DECODER = {512: [(64, 64), (32, 32), (16, 16)], 896: [(112, 112), (56, 56), (28, 28)]}
# (name, Lq, heads, Dh, level shapes): pixel-decoder encoder layers (queries = the 3 levels' tokens:
# 5376 at 512^2, 16464 at 896^2) at hidden 384 and 2048 (Dh 24, 128); adapter extractors (queries =
# 5376 SPM tokens over the ViT's one 1/16 level) for ViT-S and 7B (Dh 12, 128).
SHAPES = [
    ("decoder-512-dh24", 5376, 16, 24, PIXEL_DECODER[512]),
    ("decoder-512-dh128", 5376, 16, 128, PIXEL_DECODER[512]),
    ("decoder-896-dh24", 16464, 16, 24, PIXEL_DECODER[896]),
    ("decoder-896-dh128", 16464, 16, 128, PIXEL_DECODER[896]),
    ("adapter-512-dh12", 5376, 16, 12, [(32, 32)]),
    ("adapter-512-dh128", 5376, 16, 128, [(32, 32)]),
] if CUDA else [("decoder-tiny-dh24", 336, 4, 24, [(16, 16), (8, 8), (4, 4)])]
CUDA_PROVIDERS = ["grid_sample", "compile", "triton", "triton-bf16"] + (
    ["cuda", "cuda-bf16"] if _ext.BUILD["cuda"] else [])
SHAPES = quick(SHAPES, (0, 4))  # pixel decoder (hidden 384) and ViT-S adapter at 512^2
PROVIDERS = providers(CUDA_PROVIDERS if CUDA else ["grid_sample"] + (["cpu"] if _ext.HAS_EXT else []))


@pytest.mark.benchmark(timer=cuda_timer)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name,Lq,heads,Dh,shapes", SHAPES,
                         ids=lambda v: str(v) if not isinstance(v, list) else "")
def test_bench_ms_deform_attn(benchmark, name, Lq, heads, Dh, shapes, provider):
    dtype = torch.bfloat16 if provider.endswith("-bf16") else torch.float32
    # The adapter's extractors pass one set of reference points for the batch.
    value, spatial_shapes, starts, offsets, logits, ref = make_offset_inputs(
        1, Lq, heads, Dh, shapes, dtype=dtype, device="cuda" if CUDA else "cpu")
    args = (value, spatial_shapes, starts, offsets, logits)
    if provider == "grid_sample":
        fn = lambda: ms_deform_attn_ref(*args, ref)  # noqa: E731
    elif provider == "compile":
        compiled = torch.compile(ms_deform_attn_ref)
        fn = lambda: compiled(*args, ref)  # noqa: E731
    else:
        backend = provider.removesuffix("-bf16")
        fn = lambda: ms_deform_attn(*args, backend=backend, reference_points=ref)  # noqa: E731
    benchmark.group = f"ms_deform_attn {name}"
    benchmark.extra_info.update(op="ms_deform_attn",
                                shape=f"{name} Lq={Lq} heads={heads} Dh={Dh} L={len(shapes)}",
                                dtype=str(dtype), provider=provider, baselines=["grid_sample", "compile"])
    ms = bench_ms(benchmark, fn)
    if ms:
        out_bytes = Lq * heads * Dh * value.element_size()
        moved = sum(t.numel() * t.element_size() for t in (value, offsets, logits, ref)) + out_bytes
        benchmark.extra_info.update(ms=ms, metric="GB/s", value=moved / ms / 1e6)
