"""`fastdino bench`: named models (random init), their variants side by side, a table, JSON and a chart.

    fastdino bench --models m2f-vits16,convnext-t+linear,eomt-s --resolution 512 --json out.json --png out.png
    fastdino bench --models official-m2f-vits16-h384 --dinov3-repo ~/src/dinov3   # dinov3's own segmentor

On a CPU it runs at 64 px with a few iterations, to check that every variant runs; speed figures
need a GPU.
"""

import sys

import torch

from . import DEFAULT_VARIANTS, VARIANTS, run
from .models import MODELS, build
from .output import markdown, print_table, write_chart, write_json


def default_models(device: str, dinov3_repo) -> str:
    if device == "cpu":
        return "convnext-t+linear,eomt-s"
    segmentor = "official-m2f-vits16-h384" if dinov3_repo else "m2f-vits16"
    return f"{segmentor},convnext-t+linear,eomt-s"


def add_arguments(parser):
    parser.add_argument("--models", default=None,
                        help="comma-separated names (default: a ViT-S/16 Mask2Former (dinov3's with "
                             "--dinov3-repo, else transformers'), ConvNeXt-T + linear, EoMT-S; on CPU: "
                             f"ConvNeXt-T + linear, EoMT-S). Known: {', '.join(MODELS)}")
    parser.add_argument("--variants", default=None,
                        help="comma-separated (default on a GPU: " + ",".join(DEFAULT_VARIANTS["cuda"])
                             + "; on CPU: " + ",".join(DEFAULT_VARIANTS["cpu"]) + "). Known: "
                             + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    parser.add_argument("--resolution", type=int, default=None,
                        help="square input side (default 512; 64 on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls per variant (default 20; 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default 3; 1 on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda where available, else cpu")
    parser.add_argument("--dinov3-repo", default=None,
                        help="a local checkout of facebookresearch/dinov3, for the official-* models")
    parser.add_argument("--json", default=None, help="write every figure and the machine here")
    parser.add_argument("--png", default=None, help="write the latency chart here (needs matplotlib)")
    parser.add_argument("--md", default=None, help="write the table as markdown here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _progress(enabled: bool, total: int):
    """(context, advance(description)) for a rich progress bar over the runs, or no-ops."""
    import contextlib

    if enabled:
        try:
            from rich.progress import Progress
        except ImportError:
            enabled = False
    if not enabled:
        return contextlib.nullcontext(), lambda text: print(f"  {text}", flush=True)
    progress = Progress(transient=True)
    task = progress.add_task("fastdino bench", total=total)

    def advance(text):
        progress.update(task, advance=1, description=text)

    return progress, advance


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastdino bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    cpu = device == "cpu"
    names = (args.models or default_models(device, args.dinov3_repo)).split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"fastdino bench: unknown models {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    variants = (args.variants or ",".join(DEFAULT_VARIANTS[device])).split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"fastdino bench: unknown variants {bad}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    resolution = args.resolution or (64 if cpu else 512)
    iters = args.iters or (3 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    if cpu:
        print("fastdino bench on CPU: small sizes, few iterations; this checks that every variant runs. "
              "fastdino's kernels target GPUs: speed figures need one.", flush=True)
    results, status = [], 0
    context, advance = _progress(not args.no_progress and sys.stderr.isatty(), len(names) * len(variants))
    with context:
        for name in names:
            try:
                built = build(name, resolution, args.batch, device, args.dinov3_repo)
            except Exception as e:  # noqa: BLE001 - one model that cannot be built; the others run
                print(f"fastdino bench: {name} not built: {type(e).__name__}: {e}", file=sys.stderr)
                status = 1
                continue
            result = run(built.model, built.inputs, variants, built.components, iters=iters, warmup=warmup,
                         breakdown_iters=1 if cpu else 5, name=name, timed=built.timed,
                         progress=lambda v, name=name: advance(f"{name} {v}"),
                         bf16_weights=built.bf16_weights)
            result.resolution = resolution
            results.append(result)
            del built
            if device == "cuda":
                torch.cuda.empty_cache()
    for result in results:
        print_table(result, MODELS[result.model].about)
        if any(r.error for r in result.rows):
            status = 1
    if args.json:
        write_json(args.json, results, VARIANTS)
        print(f"wrote {args.json}")
    if args.png:
        why = write_chart(args.png, results)
        print(why or f"wrote {args.png}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results) + "\n")
        print(f"wrote {args.md}")
    return status
