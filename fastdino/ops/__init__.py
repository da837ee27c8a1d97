"""Public functionals. Each checks its arguments and runs the first backend of its op's priority for
the tensors' device type that can run them and passed its first-use self-check; the reference
(`<name>_ref`) runs where none can, and where an argument requires grad. `backend=` pins one
(ValueError with the reasons where it cannot run). The priority is fixed per device type (each op
module's docstring says why); fastdino.tune's measurements steer the patched modules, not these calls.

`OPS` is the one list of ops ({name: its `Op`}), read by `fastdino info`, the self-checks
(fastdino.selfcheck, and `fastdino.patch` ahead of a compile), the sm_90 compile check, the
benchmarks and scripts/sanitize.py. Each op's Triton kernels are `fastdino.kernels.<name>`; its
C++ sources are `csrc/<name>.h` (the math the CPU and CUDA kernels share), `csrc/<name>.cpp` (CPU)
and `csrc/cuda/<name>.cu`. The submodules share the functionals' names, so `import
fastdino.ops.<name> as m` binds the function: reach an op's module with `from fastdino.ops.<name>
import ...` or `importlib.import_module("fastdino.ops.<name>")`.
"""

from .add_layer_norm import OP as _ADD_LAYER_NORM
from .add_layer_norm import add_layer_norm, add_layer_norm_ref
from .dwconv_layer_norm import OP as _DWCONV_LAYER_NORM
from .dwconv_layer_norm import dwconv_layer_norm, dwconv_layer_norm_ref
from .fused_linear import OP as _FUSED_LINEAR
from .fused_linear import fused_linear, fused_linear_ref
from .masked_attention import OP as _MASKED_ATTENTION
from .masked_attention import masked_attention, masked_attention_ref
from .ms_deform_attn import OP as _MS_DEFORM_ATTN
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_ref
from .rope_attention import OP as _ROPE_ATTENTION
from .rope_attention import rope_attention, rope_attention_ref

OPS = {op.name: op for op in (_ADD_LAYER_NORM, _ROPE_ATTENTION, _FUSED_LINEAR, _MS_DEFORM_ATTN,
                              _MASKED_ATTENTION, _DWCONV_LAYER_NORM)}

__all__ = ["OPS", "add_layer_norm", "add_layer_norm_ref", "dwconv_layer_norm", "dwconv_layer_norm_ref",
           "fused_linear", "fused_linear_ref",
           "masked_attention", "masked_attention_ref", "ms_deform_attn", "ms_deform_attn_ref",
           "rope_attention", "rope_attention_ref"]
