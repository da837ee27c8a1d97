"""`python -m fastdino info`: the build (versions, compiled kernels, archs) and the backend table."""

import importlib
import platform

import torch

from . import _ext
from .ops._dispatch import BACKENDS, first_backend

# The op modules (fastdino.ops exports functionals of the same names).
_aln, _ra, _fl, _msda, _ma = (importlib.import_module(f"fastdino.ops.{op}") for op in
                              ("add_layer_norm", "rope_attention", "fused_linear", "ms_deform_attn", "masked_attention"))

# Per op, on a representative problem (C = 1024 rows, head dim 64, 32 for the decoders' masked
# attention): the priority per device, why a
# backend cannot run, and which one runs.
_TABLE = [
    ("add_layer_norm", _aln.PRIORITY, lambda b, dev, dt: _aln.backend_reasons(b, dev, dt, 1024)),
    ("rope_attention", _ra.PRIORITY, lambda b, dev, dt: _ra.backend_reasons(b, dev, dt, 64)),
    ("fused_linear", _fl.PRIORITY, lambda b, dev, dt: _fl.backend_reasons(b, dev, dt)),
    ("ms_deform_attn", _msda.PRIORITY, lambda b, dev, dt: _msda.backend_reasons(b, dev, dt)),
    ("masked_attention", _ma.PRIORITY, lambda b, dev, dt: _ma.backend_reasons(b, dev, dt, 32)),
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
    for op, priority, reasons in _TABLE:
        order = priority.get(device.type, ("ref",))
        chosen = first_backend(priority, device, lambda b: reasons(b, device, dtype))[0]
        for b in BACKENDS:
            why = reasons(b, device, dtype)
            status = "selected" if b == chosen else "; ".join(why) if why else "available"
            if b not in order and not why:
                status += " when pinned (not the measured fastest here, or not yet measured)"
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
