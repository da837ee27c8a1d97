"""Per-call cost of fastdino's Python dispatch, on the CPU with tiny tensors (so the kernel itself
costs little): each op called through its public function with a pinned backend and unpinned,
against the registered C++ op (`torch.ops.fastdino.<op>`) and the PyTorch reference called
directly. The difference is what every patched module pays per op call, on any device, when no
CUDA graph hides it.

    python benchmarks/bench_dispatch.py    # markdown tables, microseconds per call and per forward
"""

import argparse
import timeit

import pytest
import torch

from fastdino import _ext, ops


def _inputs():
    """(op, direct C++ call, reference call, public-function call) on tiny fp32 CPU tensors, for
    every op of fastdino.ops.OPS."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, branch, gamma, w, b = r(2, 5, 32), r(2, 5, 32), r(32), r(32), r(32)
    aln = (x, branch, gamma, w, b, 1e-5)
    dln = (r(1, 16, 5, 5).to(memory_format=torch.channels_last), r(16, 1, 7, 7), r(16), r(16), r(16), 1e-6)
    xl, wl, bl = r(4, 32), r(16, 32), r(16)
    q, k, v, cos, sin = r(1, 9, 2, 16), r(1, 9, 2, 16), r(1, 9, 2, 16), r(4, 16), r(4, 16)
    mq, mk, mv, logits = r(1, 5, 2, 16), r(1, 9, 2, 16), r(1, 9, 2, 16), r(1, 5, 9)
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    value, loc, attw = r(1, 20, 2, 8), torch.rand(1, 5, 2, 2, 2, 2, generator=g), r(1, 5, 2, 2, 2).softmax(-1)
    msda = (value, shapes, starts, loc, attw)
    return [
        ("add_layer_norm", lambda: torch.ops.fastdino.add_layer_norm(*aln),
         lambda: ops.add_layer_norm_ref(*aln),
         lambda backend: ops.add_layer_norm(*aln, backend=backend)),
        ("dwconv_layer_norm", lambda: torch.ops.fastdino.dwconv_layer_norm(*dln),
         lambda: ops.dwconv_layer_norm_ref(*dln),
         lambda backend: ops.dwconv_layer_norm(*dln, backend=backend)),
        ("fused_linear", lambda: torch.ops.fastdino.fused_linear(xl, wl, bl, "gelu", None, None, None, None),
         lambda: ops.fused_linear_ref(xl, wl, bl, "gelu"),
         lambda backend: ops.fused_linear(xl, wl, bl, "gelu", backend=backend)),
        ("rope_attention", lambda: torch.ops.fastdino.rope_attention(q, k, v, cos, sin, None, 0.25),
         lambda: ops.rope_attention_ref(q, k, v, cos, sin, 0.25),
         lambda backend: ops.rope_attention(q, k, v, cos, sin, scale=0.25, backend=backend)),
        ("masked_attention", lambda: torch.ops.fastdino.masked_attention(mq, mk, mv, logits, 0.25),
         lambda: ops.masked_attention_ref(mq, mk, mv, logits, 0.25),
         lambda backend: ops.masked_attention(mq, mk, mv, logits, scale=0.25, backend=backend)),
        ("ms_deform_attn", lambda: torch.ops.fastdino.ms_deform_attn(*msda),
         lambda: ops.ms_deform_attn_ref(*msda), lambda backend: ops.ms_deform_attn(*msda, backend=backend)),
    ]


def _us(fn, number, repeat=9):
    """Microseconds per call: the best of `repeat` runs of `number` calls (timeit's convention: the
    slower runs measure other processes, not the code)."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def _vit():
    """A 2-layer, 64-wide transformers DINOv3ViT on a 64x48 image (12 patches + 5 prefix tokens):
    tiny, so a forward costs mostly its Python and launch overhead."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_register_tokens=4, image_size=64, patch_size=16, layerscale_value=0.5)
    return DINOv3ViTModel(cfg).eval(), torch.randn(1, 3, 64, 48)


def measure_model(number=200):
    """µs per forward of the tiny ViT: original, patched (dispatch's pick: the original modules on
    the CPU) and patched with backend="cpu" (every op on its C++ kernel)."""
    import fastdino

    model, pixels = _vit()
    rows = []
    with torch.no_grad():
        rows.append(("original", _us(lambda: model(pixel_values=pixels), number)))
        fastdino.patch(model)
        rows.append(("patched", _us(lambda: model(pixel_values=pixels), number)))
        fastdino.unpatch(model)
        fastdino.patch(model, backend="cpu")
        rows.append(('patched, backend="cpu"', _us(lambda: model(pixel_values=pixels), number)))
    return rows


def measure(number=2000):
    """Rows of (op, µs: torch.ops direct, backend="cpu", reference direct, backend="ref", unpinned)."""
    rows = []
    with torch.no_grad():
        for op, direct, ref, public in _inputs():
            rows.append((op, _us(direct, number), _us(lambda: public("cpu"), number), _us(ref, number),
                         _us(lambda: public("ref"), number), _us(lambda: public(None), number)))
    return rows


@pytest.mark.skipif(not _ext.HAS_EXT, reason="needs fastdino._C")
@pytest.mark.parametrize("mode", ["direct", "cpu", "ref", "unpinned"])
@pytest.mark.parametrize("op", list(ops.OPS))
def test_bench_dispatch(benchmark, op, mode):
    _, direct, ref, public = next(row for row in _inputs() if row[0] == op)
    fn = {"direct": direct, "cpu": lambda: public("cpu"), "ref": lambda: public("ref"),
          "unpinned": lambda: public(None)}[mode]
    benchmark.group = f"dispatch {op}"
    with torch.no_grad():
        benchmark(fn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per timing run")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: thread wake-ups would dominate
    print("| op | torch.ops direct | backend=\"cpu\" | overhead | ref direct | backend=\"ref\" | overhead "
          "| unpinned |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for op, direct, cpu, ref, pinned_ref, unpinned in measure(args.number):
        print(f"| {op} | {direct:.1f} | {cpu:.1f} | {cpu - direct:+.1f} | {ref:.1f} | {pinned_ref:.1f} "
              f"| {pinned_ref - ref:+.1f} | {unpinned:.1f} |")
    print("\n| tiny DINOv3ViT (2 layers, 64 wide, 17 tokens) | µs per forward |\n|---|---:|")
    for name, us in measure_model(args.number // 10):
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
