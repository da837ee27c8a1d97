"""The main job: build a DINOv3 ViT-S/16 (random init unless --weights is given), patch it, check
that patched and original outputs agree, and time original vs patched on the best device."""

import statistics
import time

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
                        help="a Hugging Face model directory or id, or a state_dict file (.pth/.safetensors)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, help="timed iterations (default: 50 on cuda, 5 on cpu)")
    parser.add_argument("--backend", choices=["cuda", "triton", "cpu", "ref"], help="pin the kernel backend")


def build_model(weights=None):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    if weights is None:
        torch.manual_seed(0)
        return DINOv3ViTModel(DINOv3ViTConfig(**VITS16))
    if weights.endswith((".pth", ".pt", ".bin", ".safetensors")):
        model = DINOv3ViTModel(DINOv3ViTConfig(**VITS16))
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model
    return DINOv3ViTModel.from_pretrained(weights)


def _time(fn, device, iters):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> int:
    import fastdino

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    iters = args.iters or (50 if device.type == "cuda" else 5)
    model = build_model(args.weights).to(device=device, dtype=dtype).eval()
    torch.manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)

    with torch.inference_mode():
        forward = lambda: model(pixel_values=pixels).last_hidden_state  # noqa: E731
        ref = forward().float()
        t_orig = _time(forward, device, iters)
        report = fastdino.patch(model, backend=args.backend)
        print(report)
        out = forward().float()
        t_fused = _time(forward, device, iters)

    rel = ((out - ref).norm() / ref.norm()).item()
    ok = rel <= TOLERANCE[dtype]
    print(f"\noutputs: max |patched - original| = {(out - ref).abs().max().item():.3e}, "
          f"relative = {rel:.3e} (tolerance {TOLERANCE[dtype]:.0e}): {'OK' if ok else 'MISMATCH'}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nDINOv3 ViT-S/16, {args.resolution}x{args.resolution}, batch {args.batch}, {dtype}, {name}, "
          f"median of {iters}")
    print(f"{'variant':<12}{'ms/batch':>10}{'img/s':>10}{'speed-up':>10}")
    for label, t in (("original", t_orig), ("patched", t_fused)):
        print(f"{label:<12}{t:>10.2f}{args.batch * 1e3 / t:>10.1f}{t_orig / t:>9.2f}x")
    return 0 if ok else 1
