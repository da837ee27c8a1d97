"""Markdown tables from a pytest-benchmark JSON: per op, ms and its metric (GB/s, TFLOP/s) per
provider, and each provider's speed against the baselines measured in the same run
(baseline ms / provider ms; for add_layer_norm the baseline is a copy of the same bytes, so the
ratio is the fraction of achievable bandwidth).  Usage: python benchmarks/summarize.py FILE.json"""

import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    meta = data["machine_info"].get("fastdino", {})
    print(f"GPU: {meta.get('gpu')} ({meta.get('gpu_capability')}); torch {meta.get('torch')} "
          f"(CUDA {meta.get('torch_cuda')}); triton {meta.get('triton')}; fastdino._C CUDA runtime "
          f"{meta.get('extension_cuda_runtime')}, archs "
          f"{meta.get('extension_cuda_archs')}; commit {meta.get('commit')}; {data.get('datetime')}")
    ops = defaultdict(lambda: defaultdict(dict))
    baselines = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("ms"):
            ops[e["op"]][(e["shape"], e["dtype"])][e["provider"]] = e
            baselines[e["op"]] = e["baselines"]
    for op, shapes in ops.items():
        names = baselines[op]
        metric = next(iter(next(iter(shapes.values())).values()))["metric"]
        print(f"\n### {op}\n")
        print(f"| shape | dtype | provider | ms | {metric} | " + " | ".join(f"vs {n}" for n in names) + " |")
        print("|---|---|---|---:|---:|" + "---:|" * len(names))
        for (shape, dtype), prov in shapes.items():
            for p, e in prov.items():
                ratios = [f"{prov[n]['ms'] / e['ms']:.2f}x" if n in prov else "-" for n in names]
                print(f"| {shape} | {dtype} | {p} | {e['ms']:.4f} | {e['value']:.4g} | "
                      + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
