"""Command line: `fastdino info` | `fastdino demo [--weights PATH] ...` | `fastdino bench [--models ...]`
| `fastdino tune [MODELS] ...` | `fastdino export MODEL --out model.pt2`
| `fastdino segment MODEL SRC --out DIR`."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastdino")
    sub = parser.add_subparsers(dest="cmd", required=True)
    info_cmd = sub.add_parser("info", help="print the build and the backend table")
    info_cmd.add_argument("--device", choices=("cuda", "cpu"), default=None,
                          help="the device the table is for (default: cuda where available, else cpu)")
    info_cmd.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                          help="the activation dtype the table is for (default: bfloat16)")
    info_cmd.add_argument("--explain", action="store_true",
                          help="list every timing-cache entry: applied here, or ignored and why")
    info_cmd.add_argument("--kernels", action="store_true",
                          help="the static sm_90 profile of every kernel (registers, spills, shared memory, "
                               "occupancy, tensor cores), compiled here without a GPU; exit 1 on a refusal")
    demo = sub.add_parser("demo", help="patch a DINOv3 ViT-S/16, check outputs, time original vs patched")
    from .demo import add_arguments

    add_arguments(demo)
    bench = sub.add_parser("bench", help="named DINOv3 models, original vs fastdino variants: latency, "
                                         "breakdown, accuracy; table, JSON, chart")
    from .bench.cli import add_arguments as bench_arguments

    bench_arguments(bench)
    tune = sub.add_parser("tune", help="measure each swapped module's backends against the original on this "
                                       "machine and write the timing cache that fastdino.patch applies")
    from .bench.cli import add_tune_arguments

    add_tune_arguments(tune)
    export = sub.add_parser("export", help="patch a model and export it (AOTInductor package or torch.export "
                                           "program) with a dynamic batch dimension")
    from .deploy import add_export_arguments

    add_export_arguments(export)
    segment = sub.add_parser("segment", help="label a folder of images with a patched model: one process, "
                                             "torchrun ranks or a Ray Data pipeline; Parquet + PNG out")
    from .distributed import add_segment_arguments

    add_segment_arguments(segment)
    args = parser.parse_args(argv)
    if args.cmd == "export":
        from .deploy import export_main

        return export_main(args)
    if args.cmd == "segment":
        from .distributed import segment_main

        return segment_main(args)
    if args.cmd == "info" and args.kernels:
        from .info import kernels

        return kernels()
    if args.cmd == "info":
        from .info import info

        info(device=args.device, dtype=args.dtype, explain=args.explain)
        return 0
    if args.cmd == "tune":
        from .bench.cli import tune_main

        return tune_main(args)
    if args.cmd == "bench":
        from .bench.cli import main as bench_main

        return bench_main(args)
    from .demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
