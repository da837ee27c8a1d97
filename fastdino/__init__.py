"""fastdino: fused Triton and CUDA C++ kernels for DINOv3 segmentation models.

    import fastdino
    report = fastdino.patch(model)   # swap supported modules in place; print(report) says what and why
    fastdino.unpatch(model)          # restore the original modules
"""

from . import ops
from .info import info
from .patch import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["ops", "info", "patch", "unpatch", "PatchReport", "__version__"]
