"""Markdown table from a pytest-benchmark JSON: ms and GB/s per provider, and GB/s as a fraction
of the copy of the same bytes measured in the same run.  Usage: python benchmarks/summarize.py FILE.json"""

import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    meta = data["machine_info"].get("fastdino", {})
    print(f"GPU: {meta.get('gpu')} ({meta.get('gpu_capability')}); torch {meta.get('torch')} (CUDA {meta.get('torch_cuda')}); "
          f"triton {meta.get('triton')}; fastdino._C CUDA runtime {meta.get('extension_cuda_runtime')}, archs "
          f"{meta.get('extension_cuda_archs')}; commit {meta.get('commit')}; {data.get('datetime')}\n")
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "gbps" in e:
            rows[(e["rows"], e["C"], e["dtype"])][e["provider"]] = (e["ms"], e["gbps"])
    print("| rows | C | dtype | provider | ms | GB/s | of copy |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for (r, c, dt), prov in rows.items():
        copy = prov.get("copy", (None, None))[1]
        for p, (ms, gbps) in prov.items():
            frac = f"{gbps / copy:.0%}" if copy else "-"
            print(f"| {r} | {c} | {dt} | {p} | {ms:.4f} | {gbps:.0f} | {frac} |")


if __name__ == "__main__":
    main(sys.argv[1])
