"""fastdino: fused Triton and CUDA C++ kernels for DINOv3 segmentation models.

    import fastdino
    report = fastdino.patch(model)   # swap supported modules in place; print(report) says what and why
    print(fastdino.tune(model, inputs))  # measure each swapped module's backends on this GPU; cached
    fastdino.unpatch(model)          # restore the original modules
    print(fastdino.verify(model, inputs, precision="bf16"))  # original vs patched: errors, argmax agreement
    fast = fastdino.cuda_graph(model)  # replay the forward from CUDA graphs, one per input shape
    results = fastdino.bench.run(model, inputs)  # variants side by side: latency, breakdown, accuracy
"""

import pkgutil

# From the repository root, `python -m fastdino` imports this source tree, which lacks the compiled
# fastdino._C of a non-editable install: extend the package path with the installed copy.
__path__ = pkgutil.extend_path(__path__, __name__)

from . import bench, ops  # noqa: E402
from .graph import GraphCaptureError, cuda_graph  # noqa: E402
from .info import info  # noqa: E402
from .patch import PatchReport, patch, unpatch  # noqa: E402
from .tuning import TimingCache, TuneReport, tune  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "bench", "info", "patch", "unpatch", "tune", "TimingCache", "TuneReport", "verify",
           "cuda_graph", "GraphCaptureError", "PatchReport", "VerifyReport", "__version__"]
