"""`python -m fastdino info`: the build (versions, compiled kernels, archs) and the backend table."""

import platform

import torch

from . import _ext, selfcheck
from .ops import OPS
from .ops._dispatch import BACKENDS
from .tuning import TimingCache


def build_info() -> dict:
    cuda_ok = torch.cuda.is_available()
    return {
        "fastdino": __import__("fastdino").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _ext.TRITON_VERSION or f"unavailable ({_ext.TRITON_ERROR})",
        "triton_interpret": _ext.INTERPRET,
        "gpu": torch.cuda.get_device_name() if cuda_ok else None,
        "gpu_capability": "sm_%d%d" % torch.cuda.get_device_capability() if cuda_ok else None,
        "extension": "loaded" if _ext.HAS_EXT else f"not loaded ({_ext.EXT_ERROR})",
        "extension_cpu_kernels": _ext.BUILD["cpu"],
        "extension_cuda_kernels": _ext.BUILD["cuda"],
        "extension_cuda_runtime": _ext.BUILD["cuda_runtime"],
        "extension_cuda_archs": _ext.BUILD["cuda_archs"],
    }


def backend_table(device=None, dtype=torch.bfloat16) -> list[tuple[str, str, str]]:
    """(op, backend, 'selected', 'available' or the reasons it cannot run) for each op on its
    representative DINOv3 problem (`Op.example`) on `device` (default: best available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for name, op in OPS.items():
        args = op.example(device, dtype)
        order = op.priority.get(device.type, ("ref",))
        chosen = op.pick(*args)[0]
        for b in BACKENDS:
            why = op.reasons(b, *args)
            status = "selected" if b == chosen else "; ".join(why) if why else "available"
            if b not in order and not why:
                status += " when pinned (not the measured fastest here, or not yet measured)"
            rows.append((name, b, status))
    return rows


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def info(file=None, device=None, dtype: str = "bfloat16", explain: bool = False) -> str:
    """Print and return the build description, the backend table for `device` (default: cuda
    where available, else cpu) and `dtype` (a name in DTYPES), the first-use self-check of every
    kernel backend that can run there (run now where the device exists) and the timing cache
    (`explain`: every entry, applied or ignored and why). The backend table describes what untuned
    dispatch would do with tensors there; no tensor is made for it."""
    if dtype not in DTYPES:
        raise ValueError(f"fastdino info: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = [f"{k:<26} {v}" for k, v in build_info().items()]
    lines += ["", f"backends on {device.type}, {dtype}:"]
    table = backend_table(device, DTYPES[dtype])
    width = max(len(op) for op, _, _ in table)
    lines += [f"  {op:<{width}} {b:<7} {status}" for op, b, status in table]
    lines += ["", f"self-check on {device.type}, {dtype} (first use of each kernel backend in a process):"]
    if device.type == "cuda" and not torch.cuda.is_available():
        lines.append("  not run: no GPU here")
    else:
        checks = selfcheck.run_all(device, DTYPES[dtype])
        lines += [f"  {op:<{width}} {b:<7} {result}" for op, b, dev, dt, result in checks
                  if dev == device.type and dt == dtype] or ["  no kernel backend can run here"]
    cache = TimingCache.load()
    choices = cache.choices()
    lines += ["", f"timing cache: {cache.path} ({len(cache.entries)} entries, {len(choices)} for this machine"
              + (f"; unreadable: {cache.error}" if cache.error else "") + ")"]
    if explain:
        lines.append(cache.explain())
    text = "\n".join(lines)
    print(text, file=file)
    return text


def kernels(file=None) -> int:
    """`fastdino info --kernels`: the static sm_90 profile of every Triton configuration and CUDA
    kernel (fastdino.kernels.profile), and what its check refuses; 1 where it refuses something."""
    from . import _ext

    if _ext.INTERPRET:
        print("fastdino info --kernels: unset TRITON_INTERPRET (the kernels are compiled for sm_90)",
              file=file)
        return 2
    from .kernels import profile

    text, failures = profile.report()
    print(text, file=file)
    for failure in failures:
        print("FAILED", failure, file=file)
    print(f"{len(failures)} refused" if failures else "no spills; every matrix-multiplying kernel uses "
          "tensor cores (or is allowed not to: fastdino.kernels.profile.NO_TENSOR_CORES)", file=file)
    return 1 if failures else 0
