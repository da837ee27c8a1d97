"""Static profile of fastdino's GPU kernels for sm_90 (H100/H200), made without a GPU.

Every Triton kernel configuration a launcher can pick (each kernel module's `compile_configs`) is
compiled for sm_90 and every CUDA kernel of fastdino._C is read from the extension's cubins (where
it was built with its CUDA kernels). Per kernel: registers per thread, spilled bytes (STACK/LOCAL
in the cubin), shared memory per CTA, threads per CTA, the CTAs one SM can hold from those
(occupancy), whether the kernel multiplies matrices (Triton: `tl.dot` in its source or in a jit
function it calls; CUDA: MATMUL_CUDA below) and whether its SASS has tensor-core instructions (HMMA, HGMMA).

`headline_grids` gives the programs each Triton launch starts at the op's headline problem
(batch 1), to read against the 132 SMs. `fastdino info --kernels` prints both; `check` gives what
must not ship: a spill, shared memory beyond a CTA's limit, a matrix-multiplying kernel without
tensor-core instructions (unless NO_TENSOR_CORES says why it may). Needs Triton's NVIDIA backend
(its ptxas and cuobjdump ship with the triton wheel) and, for the compile, TRITON_INTERPRET unset:
the kernels must be JITFunctions.
"""

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

# sm_90 (the same on H100 and H200): per SM 64K 32-bit registers, 228 KB of shared memory (1 KB of
# it reserved per CTA), 2048 threads, 32 CTAs; a CTA may use 227 KB; registers are allocated per warp
# in units of 256; 132 SMs on the H100 SXM and the H200.
SM90 = dict(sms=132, regs=65536, smem=233472, smem_per_cta=232448, smem_reserved=1024, threads=2048, ctas=32,
            reg_unit=256)

# CUDA kernels of fastdino._C that multiply matrices (their names, namespaces stripped, start so)
MATMUL_CUDA = ("masked_attention",)
# matrix-multiplying kernels allowed without tensor cores, and why
NO_TENSOR_CORES = {
    "masked_attention (CUDA C++)": "a warp per query row, scalar FMAs; not in untuned dispatch on CUDA "
                                   "(Triton first, then the reference's SDPA); fastdino.tune still times it",
}


@dataclass
class KernelProfile:
    op: str
    kernel: str
    config: str
    threads: int
    regs: int
    spill_bytes: int
    smem: int
    matmul: bool
    tensor_cores: Optional[bool]  # None: SASS not read
    source: str  # "triton" or "cuda"

    @property
    def ctas_per_sm(self) -> int:
        return occupancy(self.regs, self.threads, self.smem)


def occupancy(regs: int, threads: int, smem: int) -> int:
    """CTAs of this kind one sm_90 SM holds at once (0: it cannot run one)."""
    warps = -(-threads // 32)
    if warps == 0:
        return 0
    per_warp = -(-max(regs, 1) * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = (SM90["regs"] // per_warp) // warps
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    by_threads = SM90["threads"] // (warps * 32)
    return min(by_regs, by_smem, by_threads, SM90["ctas"])


def _tool(name: str) -> Optional[str]:
    """The CUDA binary tool `name`: Triton's copy, else one on PATH or in CUDA_HOME."""
    import shutil

    import triton

    for path in (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name),
                 shutil.which(name) or "",
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)):
        if path and os.path.exists(path):
            return path
    return None


def _resources(tool: str, path: str) -> tuple[dict, dict]:
    """({function: {REG, STACK, SHARED, LOCAL}}, {function: SASS text}) of a cubin or a binary."""
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    found, name = {}, None
    for line in usage.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name is not None and "REG:" in line:
            found[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    code, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            code[name] = []
        elif name is not None:
            code[name].append(line)
    return found, {k: "\n".join(v) for k, v in code.items()}


def _tensor_cores(sass: str) -> bool:
    return re.search(r"\bH[G]?MMA\b|\bHGMMA\.|\bHMMA\.", sass) is not None


def _multiplies(kernel, seen=None) -> bool:
    """Whether a Triton kernel calls tl.dot, itself or in a @triton.jit function it calls."""
    from triton.runtime.jit import JITFunction

    seen = seen if seen is not None else set()
    if id(kernel) in seen:
        return False
    seen.add(id(kernel))
    if "tl.dot(" in kernel.src:
        return True
    called = (v for k, v in kernel.fn.__globals__.items()
              if isinstance(v, JITFunction) and f"{k}(" in kernel.src)
    return any(_multiplies(f, seen) for f in called)


def triton_profiles(ops=None) -> list[KernelProfile]:
    """Compile every Triton configuration of each op's kernel module for sm_90 and read its cubin.
    A configuration that fails to compile raises (the table is for kernels that ship)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..ops import OPS

    tool = _tool("cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    rows = []
    for op in ops or OPS:
        module = importlib.import_module(f"fastdino.kernels.{op}")
        for kernel, signature, constexprs, options, *attrs in module.compile_configs():
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                               attrs=attrs[0] if attrs else None)
            compiled = triton.compile(source, target=target, options=options)
            name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
            dtype = next(iter(signature.values()))
            config = f"{dtype} " + " ".join(f"{k}={v}" for k, v in constexprs.items()) + \
                f" warps={options.get('num_warps', 4)}" + (f" stages={options['num_stages']}"
                                                          if "num_stages" in options else "")
            regs = spills = 0
            cores = None
            if tool is not None:
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage, sass = _resources(tool, f.name)
                res = next(iter(usage.values()), {})
                regs, spills = res.get("REG", 0), res.get("STACK", 0) + res.get("LOCAL", 0)
                cores = _tensor_cores(next(iter(sass.values()), ""))
            rows.append(KernelProfile(op, name, config, compiled.metadata.num_warps * 32, regs, spills,
                                      compiled.metadata.shared, _multiplies(kernel), cores, "triton"))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
        return dict(zip(names, out.splitlines()))
    except OSError:
        return {n: n for n in names}


def cuda_profiles(path: Optional[str] = None) -> list[KernelProfile]:
    """The CUDA kernels of fastdino._C (its sm_90 cubins), [] where it has none. Threads per CTA
    are not in the cubin: the launch decides them (0 here, occupancy by registers then unknown)."""
    from .. import _ext

    tool = _tool("cuobjdump")
    path = path or (_ext._C.__file__ if _ext.HAS_EXT and _ext.BUILD["cuda"] else None)
    if tool is None or path is None or not os.path.exists(path):
        return []
    usage, sass = _resources(tool, path)
    names = _demangle(sorted(usage))
    rows = []
    for mangled, res in sorted(usage.items()):
        pretty = names.get(mangled, mangled).replace("(anonymous namespace)::", "").replace("fastdino::", "")
        name, _, params = pretty.partition("(")
        kernel, _, template = name.partition("<")
        op = next((o for o in ("add_layer_norm", "dwconv_layer_norm", "fused_linear", "masked_attention",
                               "ms_deform_attn", "rope_attention") if o in kernel), "?")
        config = (f"<{template} " if template else "") + f"({params}"[:80]
        cores = _tensor_cores(sass.get(mangled, ""))
        rows.append(KernelProfile(op, kernel, config, 0, res.get("REG", 0),
                                  res.get("STACK", 0) + res.get("LOCAL", 0), res.get("SHARED", 0),
                                  kernel.startswith(MATMUL_CUDA), cores, "cuda"))
    return rows


def check(rows: list[KernelProfile]) -> list[str]:
    """What must not ship: spills, shared memory beyond a CTA's limit, a matrix-multiplying kernel
    without tensor-core instructions (unless NO_TENSOR_CORES allows it)."""
    failures = []
    for r in rows:
        what = f"{r.op} {r.kernel} [{r.config}]"
        if r.spill_bytes:
            failures.append(f"{what}: spills {r.spill_bytes} bytes of registers")
        if r.smem > SM90["smem_per_cta"]:
            failures.append(f"{what}: {r.smem} bytes of shared memory > {SM90['smem_per_cta']}")
        allowed = f"{r.op} ({'CUDA C++' if r.source == 'cuda' else 'Triton'})" in NO_TENSOR_CORES
        if r.matmul and r.tensor_cores is False and not allowed:
            failures.append(f"{what}: multiplies matrices without tensor-core instructions")
    return failures


def table(rows: list[KernelProfile]) -> str:
    """The profile as a markdown table."""
    lines = ["| source | op | kernel | config | threads | regs | spills (B) | smem (B) | CTAs/SM | matmul | "
             "tensor cores |", "|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cores = "?" if r.tensor_cores is None else "yes" if r.tensor_cores else "no"
        ctas = r.ctas_per_sm if r.threads else "?"
        lines.append(f"| {r.source} | {r.op} | {r.kernel} | {r.config} | {r.threads or '?'} | {r.regs} | "
                     f"{r.spill_bytes} | {r.smem} | {ctas} | {'yes' if r.matmul else ''} | "
                     f"{cores if r.matmul else ''} |")
    return "\n".join(lines)


def summary(rows: list[KernelProfile]) -> str:
    """One line per kernel over its configurations: registers, spills, shared memory and CTAs per
    SM as ranges, and in how many configurations its SASS has tensor-core instructions."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.source, r.op, r.kernel), []).append(r)
    lines = ["| source | op | kernel | configs | regs | spills (B) | smem (B) | CTAs/SM | tensor cores |",
             "|---|---|---|---:|---|---:|---|---|---|"]

    def span(values):
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    for (source, op, kernel), rs in groups.items():
        ctas = [r.ctas_per_sm for r in rs if r.threads]
        cores = [r.tensor_cores for r in rs]
        mm = rs[0].matmul
        shown = ("" if not mm else "?" if None in cores else f"{sum(cores)}/{len(cores)}")
        lines.append(f"| {source} | {op} | {kernel} | {len(rs)} | {span([r.regs for r in rs])} | "
                     f"{max(r.spill_bytes for r in rs)} | {span([r.smem for r in rs])} | "
                     f"{span(ctas) if ctas else '?'} | {shown} |")
    return "\n".join(lines)


def headline_grids(dtype_name: str = "bfloat16") -> list[tuple[str, str, str]]:
    """(op, kernel, programs launched) for each Triton launch at the op's headline problem (its
    `example`, batch 1): the launcher runs on meta tensors, its kernels replaced by recorders."""
    import math

    import torch

    from ..ops import OPS
    from ..ops._dispatch import Like

    dtype = getattr(torch, dtype_name)
    rows = []
    for name, op in OPS.items():
        module = importlib.import_module(f"fastdino.kernels.{name}")
        kernels = {k: v for k, v in vars(module).items()
                   if type(v).__name__ in ("JITFunction", "InterpretedFunction")}  # compiled or interpreted
        launched = []

        class Recorder:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append((self.kernel, grid(kwargs) if callable(grid) else grid))
                return launch

        args = tuple(torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, Like) else a
                     for a in op.example(torch.device("meta"), dtype))
        try:
            for k in kernels:
                setattr(module, k, Recorder(k))
            op.launch("triton", *args)
        except Exception as e:  # noqa: BLE001 - a launcher that reads values cannot run on meta tensors
            rows.append((name, "?", f"not run on meta tensors ({type(e).__name__})"))
        finally:
            for k, v in kernels.items():
                setattr(module, k, v)
        for kernel, grid in launched:
            rows.append((name, kernel, str(math.prod(grid))))
    return rows


def report() -> tuple[str, list[str]]:
    """(the per-kernel summary of every Triton configuration and every CUDA kernel of this build,
    the check's failures)."""
    from .. import _ext

    rows = triton_profiles() + cuda_profiles()
    head = (f"sm_90 static kernel profile ({SM90['sms']} SMs; CTAs/SM from registers, shared memory and "
            "threads; '?' where the launch decides the threads)")
    grids = ["", f"Triton grids at each op's headline problem (batch 1, bf16) against {SM90['sms']} SMs:",
             "| op | problem | kernel | programs | per SM |", "|---|---|---|---:|---:|"]
    from ..ops import OPS

    for op, kernel, programs in headline_grids():
        problem = " ".join((OPS[op].example.__doc__ or "").split())
        per_sm = f"{int(programs) / SM90['sms']:.2f}" if programs.isdigit() else ""
        grids.append(f"| {op} | {problem} | {kernel} | {programs} | {per_sm} |")
    failures = check(rows)
    if _ext.HAS_EXT and _ext.BUILD["cuda"] and not any(r.source == "cuda" for r in rows):
        failures.append("fastdino._C has CUDA kernels but none was read (no cuobjdump in triton, PATH or "
                        "CUDA_HOME)")
    if any(r.tensor_cores is None for r in rows):
        failures.append("cuobjdump not found: registers, spills and SASS of the Triton kernels not read")
    return head + "\n" + summary(rows) + "\n" + "\n".join(grids), failures
