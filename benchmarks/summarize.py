"""Markdown tables from a pytest-benchmark JSON: per op, ms and its metric (GB/s, TFLOP/s) per
provider, the roofline fraction, and each provider's speed against the baselines measured in the
same run (baseline ms / provider ms; for add_layer_norm the baseline is a copy of the same bytes, so
the ratio is the fraction of achievable bandwidth).  Usage: python benchmarks/summarize.py FILE.json

The roofline: each benchmark computes the bytes its op must move, or the FLOPs it must do, from the
shapes alone (its module docstring says how); "of peak" is the achieved GB/s over the GPU's HBM
bandwidth, or the achieved TFLOP/s over its dense tensor-core peak (bf16/fp16; TF32 for fp32), from
the datasheet figures in PEAKS (empty for a GPU not listed there). For GB/s, "of copy" is the
achieved rate over the device-to-device copy rate measured at the start of the same run
(benchmarks/conftest.py): the bandwidth a memory-bound kernel can reach on that GPU."""

import json
import sys
from collections import defaultdict

# datasheet peaks by GPU name: (HBM GB/s, dense bf16/fp16 tensor TFLOP/s); TF32 is half the bf16 rate
PEAKS = {"H200": (4800, 989), "H100 80GB HBM3": (3350, 989), "H100 NVL": (3900, 835),
         "H100 PCIe": (2000, 756)}


def peak(gpu: str, metric: str, dtype: str):
    """The peak `metric` of `gpu` for `dtype`, or None."""
    found = next((v for k, v in PEAKS.items() if k in (gpu or "")), None)
    if found is None or metric not in ("GB/s", "TFLOP/s"):
        return None
    if metric == "GB/s":
        return found[0]
    return found[1] / 2 if "float32" in dtype else found[1]


def main(path):
    data = json.load(open(path))
    meta = data["machine_info"].get("fastdino", {})
    print(f"GPU: {meta.get('gpu')} ({meta.get('gpu_capability')}); torch {meta.get('torch')} "
          f"(CUDA {meta.get('torch_cuda')}); triton {meta.get('triton')}; fastdino._C CUDA runtime "
          f"{meta.get('extension_cuda_runtime')}, archs "
          f"{meta.get('extension_cuda_archs')}; commit {meta.get('commit')}; {data.get('datetime')}")
    copy = meta.get("copy_gbps")
    if copy:
        print(f"Measured device-to-device copy: {copy:.0f} GB/s")
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
        of_copy = metric == "GB/s" and bool(copy)
        print(f"| shape | dtype | provider | ms | {metric} | of peak | " + ("of copy | " if of_copy else "")
              + " | ".join(f"vs {n}" for n in names) + " |")
        print("|---|---|---|---:|---:|---:|" + "---:|" * (len(names) + of_copy))
        for (shape, dtype), prov in shapes.items():
            for p, e in prov.items():
                ratios = [f"{prov[n]['ms'] / e['ms']:.2f}x" if n in prov else "-" for n in names]
                top = peak(meta.get("gpu"), e["metric"], dtype)
                share = f"{100 * e['value'] / top:.0f}%" if top else ""
                copied = f"{100 * e['value'] / copy:.0f}% | " if of_copy else ""
                print(f"| {shape} | {dtype} | {p} | {e['ms']:.4f} | {e['value']:.4g} | {share} | {copied}"
                      + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
