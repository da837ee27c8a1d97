"""Whole DINOv3 ViT backbones (transformers' DINOv3ViTModel, random init) in one run, side by side:

  eager          the original model
  compile        torch.compile(original)
  max-autotune   torch.compile(original, mode="max-autotune")
  fastdino       fastdino.patch(model)
  fastdino+graph the patched model replayed from a CUDA graph

Reports ms per batch, ms/img, img/s and peak memory, and checks each variant's output against
eager. Usage (GPU):
  python benchmarks/bench_backbone.py --models vits16,vitb16,vitl16 --resolutions 512,1024 \\
      --batches 1,32 --json out.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import fastdino
from fastdino.bench import times_ms
from fastdino.info import build_info

# Published configurations (github.com/facebookresearch/dinov3, arXiv 2508.10104); all ViT/16 with
# 4 registers.
MODELS = {
    "vits16": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    "vitb16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "vitl16": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
}
VARIANTS = ["eager", "compile", "max-autotune", "fastdino", "fastdino+graph"]


def build(name, dtype, device):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(**MODELS[name], num_register_tokens=4, patch_size=16, hidden_act="gelu",
                          query_bias=True, key_bias=False, value_bias=True, layerscale_value=1.0)
    torch.manual_seed(0)
    return DINOv3ViTModel(cfg).to(device=device, dtype=dtype).eval()


def time_ms(fn, iters, warmup=3):
    return statistics.median(times_ms(fn, torch.device("cuda"), iters, warmup))


def graphed(model, pixels):
    static_in = pixels.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(pixel_values=static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(pixel_values=static_in).last_hidden_state

    def run():
        graph.replay()
        return out

    return run


def run_variants(model, forward, variants, iters, row, graph=None):
    """Time `forward(module)` (-> one output tensor) for each variant of `model`, side by side, and
    check each against eager. `row` holds the configuration fields of every result row; `graph`
    makes the CUDA-graph replay callable of the patched model (fastdino+graph)."""
    rows = []
    with torch.inference_mode():
        ref = forward(model).float()
        for variant in variants:
            torch._dynamo.reset()
            fastdino.unpatch(model)
            if variant.startswith("fastdino"):
                # fastdino-bf16: the bf16 precision policy; fastdino-cuda, fastdino-triton: that
                # backend pinned (kernels dispatch does not pick yet, e.g. fused_linear's)
                kind = variant.split("-", 1)[1] if "-" in variant else None
                fastdino.patch(model, precision="bf16" if kind == "bf16" else None,
                               backend=kind if kind in ("cuda", "triton") else None)
            if variant in ("compile", "max-autotune"):
                compiled = torch.compile(model, mode=None if variant == "compile" else variant)
                fn = lambda: forward(compiled)  # noqa: E731
            elif variant == "fastdino+graph":
                fn = graph(model)
            else:
                fn = lambda: forward(model)  # noqa: E731
            out = fn().float()
            rel = ((out - ref).norm() / ref.norm()).item()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fn, iters)
            peak = torch.cuda.max_memory_allocated() / 2**20
            batch = row["batch"]
            rows.append(dict(row, variant=variant, ms=ms, ms_per_img=ms / batch, img_per_s=1e3 * batch / ms,
                             peak_mib=peak, rel_err=rel))
            print(f"{row['model']} {row['resolution']}px b{batch} {variant:<15} {ms:9.3f} ms  "
                  f"{1e3 * batch / ms:8.1f} img/s  {peak:8.0f} MiB  rel.err {rel:.2e}", flush=True)
            del fn
    fastdino.unpatch(model)
    return rows


def bench_one(name, res, batch, variants, iters, dtype=torch.bfloat16):
    model = build(name, dtype, "cuda")
    pixels = torch.randn(batch, 3, res, res, device="cuda", dtype=dtype)
    row = dict(model=name, resolution=res, batch=batch, dtype=str(dtype))
    return run_variants(model, lambda m: m(pixel_values=pixels).last_hidden_state, variants, iters, row,
                        graph=lambda m: graphed(m, pixels))


def commit_meta():
    commit = os.environ.get("FASTDINO_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    return {**build_info(), "commit": commit}


def markdown(rows):
    lines = ["| model | res | batch | variant | ms/batch | ms/img | img/s | peak MiB | vs eager | rel. err |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    eager = {(r["model"], r["resolution"], r["batch"]): r["ms"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        base = eager.get((r["model"], r["resolution"], r["batch"]))
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['ms_per_img']:.3f} | {r['img_per_s']:.1f} | {r['peak_mib']:.0f} | {speed} | "
                     f"{r['rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vits16,vitb16,vitl16")
    p.add_argument("--resolutions", default="512,1024")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--limit", default="",
                   help="variant:model:res:batch list: a variant named here runs only for the listed "
                        "configurations (e.g. max-autotune, which compiles for minutes); other variants run "
                        "everywhere")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backbone needs a CUDA device", file=sys.stderr)
        return 1
    limits = {}
    for item in filter(None, args.limit.split(",")):
        variant, *config = item.split(":")
        limits.setdefault(variant, set()).add(tuple(config))
    rows = []
    for name in args.models.split(","):
        for res in map(int, args.resolutions.split(",")):
            for batch in map(int, args.batches.split(",")):
                variants = [v for v in args.variants.split(",")
                            if v not in limits or (name, str(res), str(batch)) in limits[v]]
                try:
                    rows += bench_one(name, res, batch, variants, args.iters)
                except torch.OutOfMemoryError as e:
                    print(f"{name} {res}px b{batch}: out of memory ({e})", flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": commit_meta(), "rows": rows}, f, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
