"""Per-call cost of fastdino's Python dispatch, on the CPU with tiny tensors (so the kernel itself
costs little): each op called through its public function with a pinned backend and unpinned,
against the registered C++ op (`torch.ops.fastdino.<op>`) and the PyTorch reference called
directly. The difference is what every patched module pays per op call, on any device, when no
CUDA graph hides it. Also the Python function calls of one DINOv3ViTLayer forward, unpatched and
patched.

    python benchmarks/bench_dispatch.py    # markdown tables: us per call, ratios, calls per layer
    python benchmarks/bench_dispatch.py --device cuda    # host us per launch on the GPU, C++ and Triton

Targets: pinned `cpu` within 1.2x of the C++ op called directly; unpinned within 1 us of the same
backend pinned; a patched layer makes no more Python calls than the unpatched layer, running its
kernels or (untuned on the CPU) the original code; on the GPU, a Triton launch through dispatch
within 20 us of its launch function called directly (no check or reasons re-run on the host).
"""

import argparse
import math
import sys
import timeit

import pytest
import torch

from fastdino import _ext, ops


def _inputs(device="cpu"):
    """(op, the C++ op's arguments, reference call, public-function call) on tiny fp32 tensors on
    `device`, for every op of fastdino.ops.OPS."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, branch, gamma, w, b = r(2, 5, 32), r(2, 5, 32), r(32), r(32), r(32)
    aln = (x, branch, gamma, w, b, 1e-5)
    dln = (r(1, 16, 5, 5).to(memory_format=torch.channels_last), r(16, 1, 7, 7), r(16), r(16), r(16), 1e-6)
    xl, wl, bl = r(4, 32), r(16, 32), r(16)
    q, k, v, cos, sin = r(1, 9, 2, 16), r(1, 9, 2, 16), r(1, 9, 2, 16), r(4, 16), r(4, 16)
    mq, mk, mv, logits = r(1, 5, 2, 16), r(1, 9, 2, 16), r(1, 9, 2, 16), r(1, 5, 9)
    shapes = torch.tensor([[4, 4], [2, 2]], device=device)
    starts = torch.tensor([0, 16], device=device)
    value, attw = r(1, 20, 2, 8), r(1, 5, 2, 2, 2).softmax(-1)
    loc = torch.rand(1, 5, 2, 2, 2, 2, generator=g).to(device)
    msda = (value, shapes, starts, loc, attw)
    return [
        ("add_layer_norm", aln, lambda: ops.add_layer_norm_ref(*aln),
         lambda backend: ops.add_layer_norm(*aln, backend=backend)),
        ("dwconv_layer_norm", dln, lambda: ops.dwconv_layer_norm_ref(*dln),
         lambda backend: ops.dwconv_layer_norm(*dln, backend=backend)),
        ("fused_linear", (xl, wl, bl, "gelu", None, None, None, None),
         lambda: ops.fused_linear_ref(xl, wl, bl, "gelu"),
         lambda backend: ops.fused_linear(xl, wl, bl, "gelu", backend=backend)),
        ("rope_attention", (q, k, v, cos, sin, None, 0.25),
         lambda: ops.rope_attention_ref(q, k, v, cos, sin, scale=0.25),
         lambda backend: ops.rope_attention(q, k, v, cos, sin, scale=0.25, backend=backend)),
        ("masked_attention", (mq, mk, mv, logits, 0.25),
         lambda: ops.masked_attention_ref(mq, mk, mv, logits, 0.25),
         lambda backend: ops.masked_attention(mq, mk, mv, logits, scale=0.25, backend=backend)),
        ("ms_deform_attn", msda, lambda: ops.ms_deform_attn_ref(*msda),
         lambda backend: ops.ms_deform_attn(*msda, backend=backend)),
    ]


def _direct(op, native):
    """The C++ op called as a user writes it, `torch.ops.fastdino.<op>(...)`: the namespace and the
    overload packet looked up per call, as the spelled-out expression does."""
    namespace = torch.ops.fastdino
    return lambda: getattr(namespace, op)(*native)


def _entry(op, native):
    """The C++ op's own entry (the overload's `_op`, no Python frame): the floor of any Python call
    of the op."""
    entry = getattr(torch.ops.fastdino, op).default._op
    return lambda: entry(*native)


def _us(fns, number, repeat=15, sync=None):
    """Microseconds per call of each of `fns`: the best of `repeat` runs of `number` calls
    (timeit's convention: the slower runs measure other processes, not the code), the candidates'
    runs interleaved, so that a slow spell of the machine falls on all of them, not on one column.
    `sync` (the GPU's) ends each run, so a run of launches counts until the device has done them:
    per call, the host's launch cost where the kernels are shorter than it."""
    def run_of(fn):
        def run():
            for _ in range(number):
                fn()
            if sync is not None:
                sync()
        return run

    runs = [run_of(fn) for fn in fns]
    for fn in fns:
        fn()
    if sync is not None:
        sync()
    best = [math.inf] * len(fns)
    for _ in range(repeat):
        for i, run in enumerate(runs):
            best[i] = min(best[i], timeit.timeit(run, number=1))
    return [b / number * 1e6 for b in best]


def _vit():
    """A 2-layer, 64-wide transformers DINOv3ViT on a 64x48 image (12 patches + 5 prefix tokens):
    tiny, so a forward costs mostly its Python and launch overhead."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_register_tokens=4, image_size=64, patch_size=16, layerscale_value=0.5)
    return DINOv3ViTModel(cfg).eval(), torch.randn(1, 3, 64, 48)


def measure_model(number=200):
    """µs per forward of the tiny ViT, interleaved: original, patched (dispatch's pick: the original
    modules on the CPU) and patched with backend="cpu" (every op on its C++ kernel)."""
    import fastdino

    (original, pixels), (patched, _), (pinned, _) = _vit(), _vit(), _vit()  # the same weights
    fastdino.patch(patched)
    fastdino.patch(pinned, backend="cpu")
    names = ("original", "patched", 'patched, backend="cpu"')
    with torch.no_grad():
        times = _us([lambda m=m: m(pixel_values=pixels) for m in (original, patched, pinned)], number)
    return list(zip(names, times))


def measure(number=2000):
    """Rows of (op, µs: torch.ops direct, the C++ entry, backend="cpu", reference direct,
    backend="ref", unpinned, the backend unpinned calls run)."""
    from fastdino.ops._dispatch import observe

    rows = []
    with torch.no_grad():
        for op, native, ref, public in _inputs():
            ran = []
            with observe(lambda name, backend, args: ran.append(backend)):
                public(None)
            times = _us([_direct(op, native), _entry(op, native), lambda: public("cpu"), ref,
                         lambda: public("ref"), lambda: public(None)], number)
            rows.append((op, *times, ran[0] if ran else "cpu"))  # no run seen: a native call straight to C++
    return rows


def measure_cuda(number=2000):
    """On the GPU, µs per call of tiny problems, one row per op as it is measured: (op, torch.ops
    direct, backend="cuda", the Triton kernel's own launch function called directly,
    backend="triton", unpinned, the backend unpinned calls run). Where the host launches slower
    than the kernels run (tiny problems), that is the host's cost per launch, and backend="triton"
    less the launch function is what fastdino's dispatch adds to a Triton launch; where a kernel
    takes longer than its launch, the device's time hides part of the host's."""
    from fastdino.ops._dispatch import observe

    sync = torch.cuda.synchronize
    with torch.no_grad():
        for op, native, ref, public in _inputs("cuda"):
            launch = getattr(sys.modules[f"fastdino.ops.{op}"], f"_{op}_triton")
            ran = []
            with observe(lambda name, backend, args: ran.append(backend)):
                public(None)
            times = _us([_direct(op, native), lambda: public("cuda"), lambda: launch(*native),
                         lambda: public("triton"), lambda: public(None)], number, sync=sync)
            yield (op, *times, ran[0] if ran else "cuda")


def layer_calls() -> list[tuple[str, int]]:
    """Python function calls of one forward of the tiny ViT's first DINOv3ViTLayer (sys.setprofile
    'call' events), unpatched, patched (untuned: the original code on the CPU) and patched with
    backend="cpu" (its kernels), after a first call that makes the decisions."""
    import fastdino

    model, pixels = _vit()
    layer = next(m for m in model.modules() if type(m).__name__ == "DINOv3ViTLayer")
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        model(pixel_values=pixels)
    hook.remove()

    def calls() -> int:
        count = [0]

        def profile(frame, event, arg):
            if event == "call":
                count[0] += 1

        layer(*seen["a"], **seen["k"])
        sys.setprofile(profile)
        try:
            layer(*seen["a"], **seen["k"])
        finally:
            sys.setprofile(None)
        return count[0]

    rows = []
    with torch.no_grad():
        rows.append(("unpatched", calls()))
        fastdino.patch(model, cache=False)
        rows.append(("patched, untuned (the original code runs on CPU)", calls()))
        fastdino.patch(model, backend="cpu", cache=False)
        rows.append(('patched, backend="cpu" (its kernels run)', calls()))
    return rows


@pytest.mark.skipif(not _ext.HAS_EXT, reason="needs fastdino._C")
def test_patched_layer_makes_no_more_python_calls():
    pytest.importorskip("transformers")
    counts = dict(layer_calls())
    assert counts['patched, backend="cpu" (its kernels run)'] <= counts["unpatched"], counts
    assert counts["patched, untuned (the original code runs on CPU)"] <= counts["unpatched"], counts


@pytest.mark.skipif(not _ext.HAS_EXT, reason="needs fastdino._C")
@pytest.mark.parametrize("mode", ["direct", "cpu", "ref", "unpinned"])
@pytest.mark.parametrize("op", list(ops.OPS))
def test_bench_dispatch(benchmark, op, mode):
    _, native, ref, public = next(row for row in _inputs() if row[0] == op)
    fn = {"direct": _direct(op, native), "cpu": lambda: public("cpu"), "ref": lambda: public("ref"),
          "unpinned": lambda: public(None)}[mode]
    benchmark.group = f"dispatch {op}"
    with torch.no_grad():
        benchmark(fn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per timing run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: host cost per launch of the C++ and Triton kernels on the GPU")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: thread wake-ups would dominate
    if args.device == "cuda":
        print("| op | torch.ops direct | backend=\"cuda\" | ratio | Triton launch direct "
              "| backend=\"triton\" | dispatch adds | unpinned | runs |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for op, direct, cuda, launch, triton, unpinned, runs in measure_cuda(args.number):
            print(f"| {op} | {direct:.1f} | {cuda:.1f} | {cuda / direct:.2f}x | {launch:.1f} | {triton:.1f} "
                  f"| {triton - launch:+.1f} | {unpinned:.1f} | {runs} |", flush=True)
        return
    print("| op | torch.ops direct | C++ entry | backend=\"cpu\" | ratio | of entry | ref direct "
          "| backend=\"ref\" | overhead | unpinned | runs | unpinned - pinned |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for op, direct, entry, cpu, ref, pinned_ref, unpinned, runs in measure(args.number):
        pinned = cpu if runs == "cpu" else pinned_ref
        print(f"| {op} | {direct:.1f} | {entry:.1f} | {cpu:.1f} | {cpu / direct:.2f}x | {cpu / entry:.2f}x "
              f"| {ref:.1f} | {pinned_ref:.1f} | {pinned_ref - ref:+.1f} | {unpinned:.1f} | {runs} "
              f"| {unpinned - pinned:+.1f} |")
    print("\n| tiny DINOv3ViT (2 layers, 64 wide, 17 tokens) | µs per forward |\n|---|---:|")
    for name, us in measure_model(args.number // 10):
        print(f"| {name} | {us:.0f} |")
    print("\n| one DINOv3ViTLayer forward | Python calls |\n|---|---:|")
    for name, n in layer_calls():
        print(f"| {name} | {n} |")


if __name__ == "__main__":
    main()
