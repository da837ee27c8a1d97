"""`python -m fastdino info`: the build (versions, compiled kernels, archs) and the backend table."""

import platform

import torch

from . import _ext
from .ops.add_layer_norm import BACKENDS as ALN_BACKENDS
from .ops.add_layer_norm import PRIORITY as ALN_PRIORITY
from .ops.add_layer_norm import backend_reasons as aln_reasons
from .ops.add_layer_norm import preferred_backend as aln_preferred

# Per op, on a representative problem (C = 1024): all backends, the priority per device, why a
# backend cannot run, and which one runs.
_TABLE = [
    (
        "add_layer_norm",
        ALN_BACKENDS,
        ALN_PRIORITY,
        lambda b, dev, dt: aln_reasons(b, dev, dt, 1024),
        lambda dev, dt: aln_preferred(dev, dt, 1024)[0],
    )
]


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
    """(op, backend, 'runs' or the reasons it does not) for each op on `device` (default: best available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for op, backends, priority, reasons, preferred in _TABLE:
        order = priority.get(device.type, ("ref",))
        chosen = preferred(device, dtype)
        for b in backends:
            why = reasons(b, device, dtype)
            status = "selected" if b == chosen else "; ".join(why) if why else "available"
            if b not in order and not why:
                status += " when pinned (slower here by measurement)"
            rows.append((op, b, status))
    return rows


def info(file=None) -> str:
    """Print and return the build description and the backend table."""
    lines = [f"{k:<26} {v}" for k, v in build_info().items()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines += ["", f"backends on {device}, bfloat16:"]
    lines += [f"  {op:<16} {b:<7} {status}" for op, b, status in backend_table()]
    text = "\n".join(lines)
    print(text, file=file)
    return text
