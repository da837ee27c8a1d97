"""Builds the optional extension fastdino._C from csrc/.

Environment switches:
  FASTDINO_BUILD_EXT=0          build no extension at all (every op falls back, the package still imports)
  FASTDINO_BUILD_CUDA=auto|0|1  CUDA kernels: auto = whenever the installed torch is a CUDA build
  TORCH_CUDA_ARCH_LIST          archs to compile (default 9.0a when no GPU is visible)
  MAX_JOBS                      parallel compile jobs (ninja)
  FASTDINO_PTXAS_VERBOSE=1      print ptxas register/spill reports (used by CI to refuse spills)
"""

import glob
import os
import re
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _import_torch():
    try:
        import torch
    except ImportError:
        # pip builds in an isolated environment without torch; the hooks run with the target
        # interpreter, so its site-packages hold the torch we must build against.
        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
        import torch
    return torch


def _arch_tag(arch_list: str) -> str:
    """'9.0a;10.0+PTX' -> 'sm_90a_sm_100' (a token that survives -D on any shell)."""
    archs = [a.replace("+PTX", "").replace(".", "") for a in re.split(r"[;\s,]+", arch_list) if a]
    return "_".join(f"sm_{a}" for a in archs) or "none"


def _extensions():
    if os.environ.get("FASTDINO_BUILD_EXT", "1") == "0":
        print("fastdino: FASTDINO_BUILD_EXT=0, building no extension (all ops use Triton or the reference)")
        return [], {}
    mode = os.environ.get("FASTDINO_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FASTDINO_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    torch = _import_torch()
    build_cuda = torch.version.cuda is not None if mode == "auto" else mode == "1"
    if build_cuda:
        if torch.version.cuda is None:
            raise RuntimeError(f"FASTDINO_BUILD_CUDA=1 but torch {torch.__version__} is a CPU build")
        # cpp_extension reads CUDA_HOME at import; guessing it from an nvcc wrapper on PATH fails to link.
        if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    if build_cuda and cpp_extension.CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError("FASTDINO_BUILD_CUDA=1 but no CUDA toolkit found (set CUDA_HOME)")
        print("fastdino: no CUDA toolkit found, building the CPU kernels only")
        build_cuda = False

    sources = sorted(glob.glob("csrc/*.cpp"))
    kwargs = dict(
        name="fastdino._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"]},
        py_limited_api=True,
    )
    if not build_cuda:
        return [cpp_extension.CppExtension(**kwargs)], {"build_ext": cpp_extension.BuildExtension}

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}" + ("a" if major == 9 else "")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
        print(f"fastdino: TORCH_CUDA_ARCH_LIST unset, compiling for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("FASTDINO_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    kwargs["sources"] = sources + sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["extra_compile_args"]["nvcc"] = nvcc
    kwargs["define_macros"] = [
        ("FASTDINO_WITH_CUDA", "1"),
        ("FASTDINO_CUDA_ARCHS", _arch_tag(os.environ["TORCH_CUDA_ARCH_LIST"])),
    ]
    return [cpp_extension.CUDAExtension(**kwargs)], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fastdino", "fastdino.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
)
