"""The main job: build a DINOv3 ViT-S/16 (random init unless --weights is given), patch it, tune it
on this machine (fastdino.tune: each module's kernels against its own code, kept in the timing
cache), check that patched and original outputs agree, and time original vs patched on the best
device."""

import statistics
from collections import Counter

import torch

# ViT-S/16 as published (facebook/dinov3-vits16-pretrain-lvd1689m).
VITS16 = dict(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
    num_register_tokens=4,
    patch_size=16, image_size=224, layer_norm_eps=1e-5, rope_theta=100.0, hidden_act="gelu",
    query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True, use_gated_mlp=False,
)
# Relative error ||patched - original|| / ||original|| allowed on the last hidden state.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def add_arguments(parser):
    parser.add_argument("--weights",
                        help="a transformers model directory, or a DINOv3 ViT state_dict file (.pth/.pt/.bin/"
                             ".safetensors) in transformers' or the official dinov3 key layout, ViT-S/B/L/16")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int,
                        help="timed iterations per round (default: 20 on cuda, 3 on cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="original/patched timing rounds, alternating")
    parser.add_argument("--backend", choices=["cuda", "triton", "cpu", "ref"],
                        help="pin the kernel backend (then nothing is tuned)")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip fastdino.tune: dispatch's untuned default (or the timing cache) decides")


class DemoError(Exception):
    """A problem with the demo's arguments or machine, said in one line."""


def build_model(weights=None):
    """ViT-S/16 at random init, or the model `weights` describe (see fastdino.checkpoints)."""
    import os

    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from .checkpoints import ACCEPTED, load_state, vit_from_state_dict

    if weights is None:
        torch.manual_seed(0)
        return DINOv3ViTModel(DINOv3ViTConfig(**VITS16))
    if os.path.isfile(weights):
        try:
            return vit_from_state_dict(load_state(weights))
        except ValueError as e:
            raise DemoError(str(e)) from None
    if os.path.isdir(weights):
        return DINOv3ViTModel.from_pretrained(weights)
    try:  # a hub id only from the local Hugging Face cache: no waiting on the network
        return DINOv3ViTModel.from_pretrained(weights, local_files_only=True)
    except OSError:
        raise DemoError(f"--weights {weights}: no such file or directory, and not in the local Hugging Face "
                        f"cache (download it first, e.g. `huggingface-cli download {weights}`). The demo "
                        f"accepts {ACCEPTED}") from None


def _device(name):
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU build (torch.version.cuda is None)" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise DemoError(f"--device {name}: {why}; run on --device cpu, or install a CUDA build of torch")
    if device.type not in ("cuda", "cpu"):
        raise DemoError(f"--device {name}: the demo runs on cuda or cpu")
    return device


def _time(fn, device, iters):
    """Median ms of `iters` calls after 2 warm-up calls (CUDA events on the GPU, wall clock on CPU)."""
    from .bench import times_ms

    return statistics.median(times_ms(fn, device, iters, 2))


def run(args) -> int:
    import fastdino
    from fastdino.verify import counting_runs, ran_summary

    try:
        device = _device(args.device)
        model = build_model(args.weights)
    except DemoError as e:
        print(f"fastdino demo: {e}")
        return 2
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    iters = args.iters or (20 if device.type == "cuda" else 3)
    model = model.to(device=device, dtype=dtype).eval()
    cfg = model.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    source = f"weights {args.weights}" if args.weights else "random init"
    print(f"model: DINOv3 ViT ({cfg.hidden_size} wide, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads{', SwiGLU' if cfg.use_gated_mlp else ''}), {source}")
    print(f"input: {args.batch} x 3 x {args.resolution} x {args.resolution}, "
          f"{str(dtype).replace('torch.', '')}, on {name}\n")
    torch.manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)

    forward = lambda: model(pixel_values=pixels).last_hidden_state  # noqa: E731
    ran = Counter()
    with torch.inference_mode():
        ref = forward().float()
        report = fastdino.patch(model, backend=args.backend)
        print(report)
        if args.backend is None and not args.no_tune:
            tuned = fastdino.tune(model, {"pixel_values": pixels}, rounds=5 if device.type == "cuda" else 2)
            where = f"kept in {tuned.cache}" if tuned.cache else "not written: the cache is not writable"
            print(f"\nfastdino.tune: {tuned.summary()} ({tuned.seconds:.1f} s; {where})")
        with counting_runs(ran):
            out = forward().float()
        times = {"original": [], "patched": []}
        for _ in range(args.rounds):  # alternate, so drift hits both alike
            fastdino.unpatch(model)
            times["original"].append(_time(forward, device, iters))
            fastdino.patch(model, backend=args.backend)
            times["patched"].append(_time(forward, device, iters))

    rel = ((out - ref).norm() / ref.norm()).item()
    ok = rel <= TOLERANCE[dtype]
    print(f"\noutputs: max |patched - original| = {(out - ref).abs().max().item():.3e}, "
          f"relative = {rel:.3e} (tolerance {TOLERANCE[dtype]:.0e}): {'OK' if ok else 'MISMATCH'}")
    print("kernels: " + ran_summary(ran))
    ratios = [o / p for o, p in zip(times["original"], times["patched"])]
    print(f"\ntimes: median ms per batch of {iters} calls, in each of {args.rounds} alternating rounds")
    for label, ts in times.items():
        print(f"  {label:<9} {statistics.median(ts):9.2f} ms  (rounds: {min(ts):.2f} to {max(ts):.2f})  "
              f"{args.batch * 1e3 / statistics.median(ts):8.1f} img/s")
    print(f"  original / patched: {statistics.median(ratios):.2f}x "
          f"(rounds: {min(ratios):.2f}x to {max(ratios):.2f}x)")
    if device.type == "cpu":
        print("\nOn CPU fastdino is not a speed-up: its kernels are for NVIDIA GPUs, and a ratio within the "
              "spread of the rounds above is noise. Run on a GPU to see what it does.")
    return 0 if ok else 1
