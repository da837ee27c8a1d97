"""Every kernel of every op once, at small odd shapes, for compute-sanitizer (memcheck, racecheck,
initcheck, synccheck): each op pinned to each of its kernel backends on the device (the C++ op and
the Triton kernel on CUDA; the C++ CPU op and the Triton interpreter with --device cpu, to try the
script without a GPU), in every dtype and input form the ops take. Prints one line per call and
exits 1 if a call raised. scripts/gpu_run.sh runs it under each sanitizer tool.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize.py
    valgrind --tool=memcheck python scripts/sanitize.py --device cpu --backends cpu   # C++ CPU kernels
"""

import argparse
import os
import sys


def cases(device, torch):
    """(op name, label, function of dtype giving the op's arguments): odd sizes (1029 tokens, 97
    channels, 1 and 3 queries, maps 3x5 and 1x1), strided views, both input forms (and both
    layouts of a ConvNeXt map)."""
    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    def ln(dt, C=97, gamma=True):
        return (randn(3, 7, C, dtype=dt), randn(3, 7, C, dtype=dt), randn(C, dtype=dt) if gamma else None,
                randn(C, dtype=dt), randn(C, dtype=dt), 1e-6)

    def dwconv(dt, C=97, H=9, W=13, channels_last=False, bias=True):
        x = randn(2, C, H, W, dtype=dt)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        return (x, randn(C, 1, 7, 7, dtype=dt, scale=0.2), randn(C, dtype=dt) if bias else None,
                randn(C, dtype=dt), randn(C, dtype=dt), 1e-6)

    def linear(dt, act=None, residual=False):
        x, w, b = randn(37, 33, dtype=dt), randn(97, 33, dtype=dt, scale=0.2), randn(97, dtype=dt)
        w2 = randn(97, 33, dtype=dt, scale=0.2) if act == "swiglu" else None
        b2 = randn(97, dtype=dt) if act == "swiglu" else None
        r, g = (randn(37, 97, dtype=dt), randn(97, dtype=dt)) if residual else (None, None)
        return x, w, b, act, w2, b2, r, g

    def rope(dt, D=64, N=1029, hw=1024, mask=False):
        q, k, v = randn(2, N, 3, 6, D, dtype=dt).unbind(2)  # a fused qkv output, read as views
        angles = torch.rand(hw, D // 2, device=device) * 6.3
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        logits = randn(2, 3, hw, dtype=dt) if mask else None
        return q, k, v, cos, sin, logits, None

    def masked(dt, D=24, mask=True):
        q = randn(3, 2, 4, D, dtype=dt).transpose(0, 1)  # sequence-first projections
        k, v = (randn(97, 2, 4, D, dtype=dt).transpose(0, 1) for _ in range(2))
        logits = randn(2, 3, 97, scale=2.0) - 1.0 if mask else None
        if mask:
            logits[:, 1] = -5.0  # every key blocked: the row attends to all
        return q, k, v, logits, None

    def deform(dt, fused=False, R=2, Dh=24):
        shapes = [(3, 5), (1, 1), (2, 3)]
        S, L, P, Lq, H = sum(h * w for h, w in shapes), len(shapes), 4, 37, 3
        value = randn(2, S, H, Dh, dtype=dt)
        levels = torch.tensor(shapes, device=device), torch.tensor([0, 15, 16], device=device)
        if fused:
            return (value, *levels, randn(2, Lq, H, L, P, 2, scale=2.0), randn(2, Lq, H, L, P),
                    torch.rand(1, Lq, L, R, device=device))
        loc = torch.rand(2, Lq, H, L, P, 2, device=device) * 1.4 - 0.2
        w = torch.rand(2, Lq, H, L, P, device=device)
        return value, *levels, loc, w, None

    out = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        n = str(dt).split(".")[1]
        out += [("add_layer_norm", f"{n} C=97", lambda dt=dt: ln(dt)),
                ("add_layer_norm", f"{n} C=384 no gamma", lambda dt=dt: ln(dt, 384, False)),
                ("dwconv_layer_norm", f"{n} C=97 9x13 NCHW", lambda dt=dt: dwconv(dt)),
                ("dwconv_layer_norm", f"{n} C=1536 3x5 channels-last no bias",
                 lambda dt=dt: dwconv(dt, 1536, 3, 5, True, False)),
                ("dwconv_layer_norm", f"{n} C=16 4x1 (narrower than the kernel)",
                 lambda dt=dt: dwconv(dt, 16, 4, 1)),
                ("fused_linear", f"{n} gelu", lambda dt=dt: linear(dt, "gelu")),
                ("fused_linear", f"{n} swiglu", lambda dt=dt: linear(dt, "swiglu")),
                ("fused_linear", f"{n} residual", lambda dt=dt: linear(dt, None, True)),
                ("rope_attention", f"{n} D=64 N=1029", lambda dt=dt: rope(dt)),
                ("rope_attention", f"{n} D=128 EoMT mask", lambda dt=dt: rope(dt, 128, 205, 196, True)),
                ("masked_attention", f"{n} D=24 mask", lambda dt=dt: masked(dt)),
                ("masked_attention", f"{n} D=2 no mask", lambda dt=dt: masked(dt, 2, False)),
                ("ms_deform_attn", f"{n} locations", lambda dt=dt: deform(dt)),
                ("ms_deform_attn", f"{n} points", lambda dt=dt: deform(dt, True, 2, 12)),
                ("ms_deform_attn", f"{n} boxes", lambda dt=dt: deform(dt, True, 4, 2))]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script")
    parser.add_argument("--backends", default=None,
                        help="comma-separated, of the device's C++ op and triton (default: both)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from fastdino import ops
    from fastdino.ops import OPS

    torch.manual_seed(0)
    device = torch.device(args.device)
    failed = 0
    for name, label, make in cases(device, torch):
        op = OPS[name]
        for backend in args.backends.split(",") if args.backends else (device.type, "triton"):
            call = make()
            why = op.reasons(backend, *call)
            if why:
                print(f"skip {name} {backend} {label}: {'; '.join(why)}")
                continue
            try:
                getattr(ops, name)(*call, backend=backend)  # the public function (it fills a default scale)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                print(f"ok   {name} {backend} {label}")
            except Exception as e:  # report every failure, then exit 1
                failed += 1
                print(f"FAIL {name} {backend} {label}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
