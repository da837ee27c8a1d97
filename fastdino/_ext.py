"""What this installation can run: the compiled extension, Triton, the interpreter, and why not."""

import json
import os

import torch

# TRITON_INTERPRET is read when @triton.jit decorates, i.e. when fastdino.kernels is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from fastdino import _C

    EXT_ERROR = None
    BUILD = json.loads(_C.BUILD_INFO)
except ImportError as e:  # built with FASTDINO_BUILD_EXT=0, or built against another torch
    _C = None
    EXT_ERROR = f"{type(e).__name__}: {e}"
    BUILD = {"cpu": False, "cuda": False, "cuda_runtime": None, "cuda_archs": ""}
HAS_EXT = _C is not None

try:
    import triton

    TRITON_VERSION = triton.__version__
    TRITON_ERROR = None
except ImportError as e:
    TRITON_VERSION = None
    TRITON_ERROR = f"{type(e).__name__}: {e}"
HAS_TRITON = TRITON_VERSION is not None

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ext_reasons(device_type: str) -> list[str]:
    """Why the C++ extension cannot run on this device type ([] if it can)."""
    if not HAS_EXT:
        return [f"fastdino._C not built ({EXT_ERROR})"]
    if device_type == "cuda" and not BUILD["cuda"]:
        return ["fastdino._C was built without CUDA kernels"]
    return []


def triton_reasons(device_type: str) -> list[str]:
    """Why a Triton kernel cannot run on this device type ([] if it can)."""
    if not HAS_TRITON:
        return [f"triton not importable ({TRITON_ERROR})"]
    if device_type == "cpu" and not INTERPRET:
        return ["CPU tensors need TRITON_INTERPRET=1"]
    if device_type not in ("cuda", "cpu"):
        return [f"device type {device_type}"]
    return []
