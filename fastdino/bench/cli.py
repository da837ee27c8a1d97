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


def device_and_models(args, command: str):
    """(device, model names) from the arguments, or None after saying why on stderr."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"fastdino {command}: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return None
    names = (args.models or default_models(device, args.dinov3_repo)).split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"fastdino {command}: unknown models {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return None
    return device, names


def built_or_none(name: str, resolution: int, args, device: str, command: str):
    """The named model, or None after saying on stderr why it could not be built."""
    try:
        return build(name, resolution, args.batch, device, args.dinov3_repo)
    except Exception as e:  # noqa: BLE001 - one model that cannot be built; the others run
        print(f"fastdino {command}: {name} not built: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main(args) -> int:
    chosen = device_and_models(args, "bench")
    if chosen is None:
        return 2
    device, names = chosen
    cpu = device == "cpu"
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
            built = built_or_none(name, resolution, args, device, "bench")
            if built is None:
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_tune_arguments(parser):
    parser.add_argument("models", nargs="?", default=None,
                        help=f"comma-separated model names, as fastdino bench's (default on a GPU: "
                             f"{default_models('cuda', None)}; on CPU: {default_models('cpu', None)}). "
                             f"Known: {', '.join(MODELS)}")
    parser.add_argument("--resolution", "--size", type=int, default=None,
                        help="square input side (default 512; 64 on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="weights and inputs in this dtype (default bfloat16; a model that casts to fp32 "
                             "itself keeps fp32 weights and runs under autocast)")
    parser.add_argument("--precision", choices=("bf16",), default=None,
                        help="patch with precision='bf16' (fastdino.patch), as the model will be deployed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda where available, else cpu")
    parser.add_argument("--dinov3-repo", default=None,
                        help="a local checkout of facebookresearch/dinov3, for the official-* models")
    parser.add_argument("--cache", default=None,
                        help="the timing cache to write (a .json file or a directory; default "
                             "$FASTDINO_CACHE, else the user cache dir)")
    parser.add_argument("--margin", type=float, default=0.03,
                        help="a kernel must beat the original by more than this fraction (default 0.03)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per candidate (default 3)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed calls per candidate, interleaved (default 10; 2 on CPU)")
    parser.add_argument("--explain", action="store_true",
                        help="then list every entry of the cache: applied here, or ignored and why")


def tune_main(args) -> int:
    """`fastdino tune`: build each named model (random weights), patch it, tune it on one example
    batch and write the timing cache."""
    from ..patch import patch
    from ..tuning import TimingCache, tune
    from . import _to

    chosen = device_and_models(args, "tune")
    if chosen is None:
        return 2
    device, names = chosen
    cpu = device == "cpu"
    resolution = args.resolution or (64 if cpu else 512)
    dtype = DTYPES[args.dtype]
    if cpu:
        print("fastdino tune on CPU: fastdino's kernels target GPUs; a CPU cache records CPU timings only.",
              flush=True)
    status = 0
    for name in names:
        built = built_or_none(name, resolution, args, device, "tune")
        if built is None:
            status = 1
            continue
        model, inputs, autocast = built.model, built.inputs, None
        if dtype != torch.float32:
            if built.bf16_weights:
                model, inputs = model.to(dtype), _to(inputs, dtype)
            else:
                autocast = dtype
        print(patch(model, precision=args.precision, cache=False))
        report = tune(model, inputs, dtype=autocast, margin=args.margin,
                      warmup=args.warmup if args.warmup is not None else (1 if cpu else 3),
                      rounds=args.rounds or (2 if cpu else 10), cache=args.cache)
        print(f"{name} at {resolution}^2, batch {args.batch}, {args.dtype}:")
        print(report, flush=True)
        del built, model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.explain:
        print(TimingCache.load(args.cache).explain())
    return status
