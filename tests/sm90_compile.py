"""Compile every Triton kernel configuration for sm_90 without a GPU; refuse register spills and
shared memory beyond the sm_90 limit.

Run as a script with TRITON_INTERPRET unset (kernels must be JITFunctions). Spills are read from
the cubin with the cuobjdump that Triton ships: non-zero STACK or LOCAL means spilled registers.
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastdino.ops import OPS

MODULES = [importlib.import_module(f"fastdino.kernels.{name}") for name in OPS]  # every op's Triton kernels
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (checked only at launch)


def cuobjdump():
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    tool = cuobjdump()
    failures, count = [], 0
    for module in MODULES:
        for kernel, signature, constexprs, options, *attrs in module.compile_configs():
            name = f"{module.__name__.split('.')[-1]} {constexprs} {next(iter(signature.values()))} {options}"
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                   attrs=attrs[0] if attrs else None)
                compiled = triton.compile(source, target=target, options=options)
            except Exception as e:  # noqa: BLE001 - report every failing configuration
                failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            count += 1
            smem = compiled.metadata.shared
            if smem > SMEM_LIMIT:
                failures.append(f"{name}: needs {smem} bytes of shared memory > {SMEM_LIMIT}")
            if tool is None:
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
            spills = [int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)]
            if any(spills):
                failures.append(f"{name}: spills registers ({usage.strip().splitlines()[-1]})")
    print(f"compiled {count} Triton configurations for sm_90"
          f"{'' if tool else ' (cuobjdump not shipped with this triton: spills not checked)'}")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
