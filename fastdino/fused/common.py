"""What every family file shares: the rule a family exports, the one backend decision a fused
module makes per call, the block seam (residual + LayerScale + LayerNorm on add_layer_norm), the
structural checks that give the patch report its reasons, and the small forward cache."""

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import selfcheck
from ..ops._dispatch import Like, Op, signature, signature_text
from ..ops.add_layer_norm import OP as ADD_LAYER_NORM
from .sources import Source, dinov3, is_from, method_reasons, origin_reasons, timm, transformers


@dataclass(frozen=True)
class Rule:
    """How `fastdino.patch` swaps one class: matched on type(module).__name__ (no import of the
    model library), turned into Fused<Name>(mixin, original class) when the class comes from
    `source` (or a module the user trusts) and its structure is what the fused form computes:
    exactly the children `parts` (where given) and own parameters/buffers `params`, no hooks on
    the parts the fused forward does not call as modules, and `reasons(module)` == []."""

    class_name: str
    mixin: type
    reasons: Callable[[nn.Module], list[str]]  # why this instance cannot be swapped ([] if it can)
    backend: Callable[[nn.Module], str]  # what the report says it runs on its current parameters
    source: Optional[Source] = None  # the library code the mixin follows (required)
    parts: Optional[tuple[str, ...]] = None  # exactly these children (None: a composite, not checked)
    params: tuple[str, ...] = ()  # own parameters and buffers the fused form reads (with `parts`)
    calls: tuple[str, ...] = ()  # children the fused forward calls as modules (their hooks run); ("*",): all
    pinnable: bool = True  # False: a pinned backend does not apply (caches, precision regions)
    precision: Optional[str] = None  # swapped only under patch(model, precision=...)

    def __post_init__(self):
        if self.source is None:
            raise TypeError(f"Rule {self.class_name}: a source is required")


# Set by fastdino.tune while it records and times a model's decisions (fastdino/tune.py).
TUNING = None


def decide(module: nn.Module, op: Op, *args, also: Optional[tuple] = None) -> Optional[str]:
    """The backend `module` runs `op` on for `args`, decided once per signature of the arguments
    (device, dtype, shape, strides, grad of each tensor; `Like` for tensors the module has yet to
    make) and kept on the module, so a steady-state call does no reasons work. `also`: the arguments
    of a second call that must run on the same backend (an MLP's second GEMM).

    The decision: the pinned backend (ValueError with the reasons if it cannot run these arguments;
    "ref" runs the op's reference); else the tuned choice for this module kind and signature (from
    fastdino.tune or the timing cache), where it still applies; else dispatch's untuned pick. A
    kernel backend must also pass its first-use self-check. None: the module runs the model's own
    code (the same numbers as before patching, at the same cost)."""
    key = (op.name, torch.is_grad_enabled(), signature(args if also is None else args + also))
    if torch.compiler.is_dynamo_compiling():
        # decided in the trace, once per graph: no memo lookup (Dynamo, hashing the key, would
        # specialise the graph on every size in it, a dynamic batch included), no memo write
        return make_decision(module, op, key, args, also)
    decisions = module.__dict__.get("_fastdino_decisions")
    try:
        if TUNING is not None:
            chosen = TUNING.decide(module, op, key, args, also)
            if chosen is not TUNING.UNFORCED:
                return chosen
        if decisions is not None:
            return decisions[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable argument: decided for this call only, neither kept nor tuned
        return make_decision(module, op, None, args, also)
    if torch.compiler.is_compiling():  # a non-strict export trace: decided in it, not kept
        return make_decision(module, op, key, args, also)
    chosen = make_decision(module, op, key, args, also)
    if decisions is None or len(decisions) >= 64:
        decisions = {}
    try:
        decisions[key] = chosen
    except TypeError:  # an unhashable argument (its first call): decided for this call only
        return chosen
    module.__dict__["_fastdino_decisions"] = decisions
    return chosen


def runs_original(module: nn.Module, op: Op, x) -> bool:
    """True when `module` runs the model's own code for `op` on x's device whatever the arguments:
    no backend pinned, no tuned choices, not being tuned, and the op's untuned priority there is
    the reference alone (every op but ms_deform_attn on the CPU; fused_linear on CUDA, until
    tuned). The ViT seam, MLP and attention ask before they build the arguments of `decide`, so
    their untuned CPU path costs about what the original does."""
    if module._fastdino_backend is not None:
        return False
    dev = "cuda" if x.is_cuda else x.device.type  # (a CUDA tensor makes no torch.device)
    return (op.priority.get(dev, REF_ONLY) == REF_ONLY and TUNING is None
            and not module.__dict__.get("_fastdino_tuned"))


REF_ONLY = ("ref",)


def make_decision(module: nn.Module, op: Op, key: Optional[tuple], args: tuple,
                  also: Optional[tuple]) -> Optional[str]:
    """`decide` without its memo: the pinned backend (None where it failed its self-check), the
    tuned winner where it can run these arguments, else the untuned pick; None for the original."""
    pinned = module._fastdino_backend
    if pinned is not None:
        backend = op.choose(pinned, *args)
        if also is not None:
            op.choose(pinned, *also)
        if backend != "ref" and selfcheck.reasons(op, backend, args[0].device, args[0].dtype):
            return None  # warned once by the self-check: the model's own code runs
        return backend
    table = module.__dict__.get("_fastdino_tuned")
    entry = table.get((kind(module), op.name, key_text(key))) if table and key is not None else None
    if entry is not None:
        winner = entry["winner"]
        if winner == "original":
            return None
        if not op.runnable(winner, *args, also=also):
            return winner
    backend = op.pick(*args, also=also)[0]
    return None if backend == "ref" else backend


def kind(module: nn.Module) -> str:
    """The module kind a tuned choice is kept for: its original class, by name."""
    return type(module)._fastdino_original_class.__name__


def key_text(key: tuple) -> str:
    """A decision key as the timing cache writes it: op arguments' signature, grad mode in front."""
    return ("grad; " if key[1] else "") + signature_text(key[2], key[1])


def picked(op: Op, *args) -> str:
    """What dispatch picks for `args` (`Like` for the module's parameters, without grad): the
    backend a patch report shows."""
    return op.pick(*args)[0]


def needs_grad(*tensors) -> bool:
    """Whether what is computed from these tensors will require grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def transformers_records(key: str) -> bool:
    """Whether transformers (5.x) records `key` ("attentions", ...) of the forward now running: its
    hooks read what the modules return, so a fused attention, which returns no weights, must run
    the original there."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is None:
        return False
    if getattr(collector, "compiling", False):  # set inside a torch.compile trace: a plain global there
        collected = collector.global_var
        return collected is not None and key in collected  # not bool(dict): torch 2.11's compiler cannot
    return _context_records(key)


@torch._dynamo.assume_constant_result
def _context_records(key: str) -> bool:
    """The collector's ContextVar, which torch.compile cannot trace: a trace reads it once, as a
    constant (a fused forward traced without transformers' capture decorator, e.g. EoMT's).
    Constant arguments only (torch 2.11's compiler), so the collector is looked up again."""
    collector = sys.modules["transformers.utils.output_capturing"]._active_collector
    collected = getattr(collector, "context_var", collector).get()
    return collected is not None and key in collected


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for the device type; False on meta (a model built without memory),
    where asking raises. (Not torch.amp.is_autocast_available: torch 2.11's compiler cannot trace it.)"""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def activation_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projections of x produce: autocast's where it is on."""
    dev = x.device.type
    # autocast_on inline: a steady-state call does no more Python calls than the original
    on = dev != "meta" and torch.is_autocast_enabled(dev)
    return torch.get_autocast_dtype(dev) if on else x.dtype


def like(x: Tensor, shape, *params, dtype: Optional[torch.dtype] = None) -> Like:
    """A projection output of x with `shape`: x's device, the activation dtype (or `dtype`), grad
    if x or the projection's parameters need it."""
    return Like(x.device, dtype or activation_dtype(x), shape, needs_grad(x, *params))


# -- structural checks (the patch report's reasons) ----------------------------------------------


def rule_reasons(rule: Rule, module: nn.Module) -> tuple[int, list[str]]:
    """(how many checks passed, why `rule` cannot swap `module`; [] if it can): origin (with the
    methods the fused form replaces), then structure, then the rule's own configuration checks."""
    cls = type(module)
    methods = sorted({n for c in rule.mixin.__mro__[:-1] for n in vars(c)
                      if callable(vars(c)[n]) and not n.startswith("_fastdino") and not n.startswith("__")
                      and hasattr(cls, n)})
    checks = (lambda: origin_reasons(cls, rule.source) or method_reasons(cls, methods, rule.source),
              lambda: structure_reasons(module, rule), lambda: rule.reasons(module))
    for passed, check in enumerate(checks):
        why = check()
        if why:
            return passed, why
    return len(checks), []


def structure_reasons(module: nn.Module, rule: Rule) -> list[str]:
    """Children, parameters and buffers the fused forward would not run or read; hooks it would
    not call (on children it does not call as modules, or registered for every module)."""
    out = []
    if rule.parts is not None:
        extra = sorted(n for n, c in module._modules.items() if c is not None and n not in rule.parts)
        if extra:
            out.append(f"extra submodules {', '.join(extra)}: the fused form would not run them")
        own = [n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None]
        extra = sorted(n for n in own if n not in rule.params)
        if extra:
            out.append(f"extra parameters or buffers {', '.join(extra)}: the fused form would not read them")
    return out + hook_reasons(module, rule.calls)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def user_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward hooks other than those fastdino.tune adds while it records."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return any(TUNING is None or getattr(h, "__self__", None) is not TUNING for h in hooks)


def hook_reasons(module: nn.Module, calls=()) -> list[str]:
    """Hooks the fused forward would skip: on the parts of `module` it does not call as modules
    (`calls` names those it does), or global module hooks (they run on every module call)."""
    glob = torch.nn.modules.module
    if any(getattr(glob, "_global" + h, None) for h in _HOOKS):
        return ["global module hooks are registered (torch.nn.modules.module.register_module_*_hook): "
                "the fused form would skip them on the parts it fuses"]
    hooked = [f"{name}.{path}".rstrip(".") for name, child in module.named_children()
              if name not in calls and "*" not in calls
              for path, m in child.named_modules() if any(getattr(m, h, None) for h in _HOOKS)]
    return [f"hooks on {', '.join(hooked)}: the fused form does not call it as a module"] if hooked else []


def children_reasons(module: nn.Module, children) -> list[str]:
    missing = [c for c in children if not hasattr(module, c)]
    return [f"no attribute {', '.join(missing)}"] if missing else []


def linear_reasons(module: nn.Module, names) -> list[str]:
    return [f"{n} is not an nn.Linear" for n in names if type(getattr(module, n)) is not nn.Linear]


def is_fused(module: nn.Module) -> bool:
    return hasattr(type(module), "_fastdino_original_class")


def sibling_class(module: nn.Module, name: str) -> type:
    """A class (an output dataclass) defined next to the patched module's original class."""
    return getattr(sys.modules[module._fastdino_original_class.__module__], name)


# -- the block seam: y = x + layer_scale(branch); z = norm(y) --------------------------------------

# LayerScale classes: name -> (the name of their (C,) scale parameter, where they come from).
LAYER_SCALES = {"LayerScale": ("gamma", dinov3("layers.layer_scale")),
                "DINOv3ViTLayerScale": ("lambda1", transformers("dinov3_vit")),
                "EomtDinov3LayerScale": ("lambda1", transformers("eomt_dinov3")),
                "EomtLayerScale": ("lambda1", transformers("eomt"))}


def layer_scale_reasons(module: nn.Module, name: str) -> list[str]:
    if isinstance(module, nn.Identity):
        return []
    param, source = LAYER_SCALES.get(type(module).__name__, (None, None))
    if param is None or not is_from(module, type(module).__name__, source):
        return [f"{name} is {type(module).__module__}.{type(module).__name__}, not a known LayerScale"]
    gamma = getattr(module, param, None)
    if not isinstance(gamma, Tensor) or gamma.dim() != 1:
        return [f"{name}.{param} is not a 1-D tensor"]
    extra = sorted(n for n, c in module._modules.items() if c is not None)
    return [f"{name} has submodules {', '.join(extra)}"] if extra else []


TIMM_NORM = timm("layers.norm")


def _is_plain_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm, or timm's LayerNorm subclass when it runs F.layer_norm (its fast-norm path off)."""
    if type(module) is nn.LayerNorm:
        return True
    return (isinstance(module, nn.LayerNorm) and is_from(module, "LayerNorm", TIMM_NORM)
            and getattr(module, "_fast_norm", None) is False)


def layer_norm_reasons(module: nn.Module, name: str) -> list[str]:
    if not _is_plain_layer_norm(module):
        return [f"{name} is {type(module).__name__}, not nn.LayerNorm"]
    if module.weight is None or module.bias is None:
        return [f"{name} has no affine weight and bias"]
    if len(module.normalized_shape) != 1:
        return [f"{name} normalizes over {len(module.normalized_shape)} dims"]
    return []


def seam_reasons(children, layer_scale: str, norm: str):
    """Reasons function for a block whose attention -> MLP seam runs on add_layer_norm."""

    def reasons(module: nn.Module) -> list[str]:
        missing = children_reasons(module, children)
        if missing:
            return missing
        return (layer_scale_reasons(getattr(module, layer_scale), layer_scale)
                + layer_norm_reasons(getattr(module, norm), norm))

    return reasons


def seam_backend(norm: str):
    """The report's backend for a seam: add_layer_norm's pick for the norm's parameters."""

    def backend(module: nn.Module) -> str:
        w = getattr(module, norm).weight
        x, vec = Like(w.device, w.dtype, (1, w.shape[0])), Like(w.device, w.dtype, w.shape)
        return picked(ADD_LAYER_NORM, x, x, vec, vec, vec, 1e-6)

    return backend


def layer_scale_gamma(layer_scale) -> Optional[Tensor]:
    """The (C,) scale of a LayerScale module, or the tensor itself (timm keeps gamma_1/gamma_2 as
    parameters of the block); None for nn.Identity or None."""
    if layer_scale is None or isinstance(layer_scale, Tensor):
        return layer_scale
    if isinstance(layer_scale, nn.Identity):
        return None
    return getattr(layer_scale, LAYER_SCALES[type(layer_scale).__name__][0])


def _keeps_dtype(x: Tensor, branch: Tensor, gamma: Optional[Tensor], weight: Tensor, bias: Tensor) -> bool:
    """True when the unfused `y = x + ls(branch); z = norm(y)` gives y and z in x.dtype.

    Then casting branch and the parameters to x.dtype is exact (an upcast) and the fused op
    returns what the model would. Otherwise the original modules run: e.g. bf16 activations with
    an fp32 LayerScale (y promotes to fp32) or fp32 LayerNorm parameters (layer_norm keeps bf16
    but uses the fp32 values, which the one-dtype kernels would have to round).
    """
    dt = x.dtype
    t = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
    if torch.promote_types(dt, t) != dt:
        return False
    dev = x.device.type
    if dev != "meta" and torch.is_autocast_enabled(dev):  # autocast_on inline (a call per layer less)
        return dt == torch.float32  # autocast runs layer_norm in fp32 and returns fp32
    return torch.promote_types(dt, torch.promote_types(weight.dtype, bias.dtype)) == dt


def residual_layer_norm(x, branch, layer_scale, norm, module):
    """``y = x + layer_scale(branch); z = norm(y)``, fused with add_layer_norm where dtypes allow
    and a kernel runs (`module`'s decision, `decide`); the modules as they are otherwise.
    A pinned "ref" runs the op's reference. `layer_scale` is a LayerScale module, nn.Identity, a
    (C,) gamma tensor or None."""
    gamma = None
    if not runs_original(module, ADD_LAYER_NORM, x):
        gamma = layer_scale_gamma(layer_scale)
        weight, bias = norm.weight, norm.bias
        if _keeps_dtype(x, branch, gamma, weight, bias):
            dt = x.dtype
            args = (x, _cast(branch, dt), _cast(gamma, dt), _cast(weight, dt), _cast(bias, dt), norm.eps)
            chosen = decide(module, ADD_LAYER_NORM, *args)
            if chosen is not None:
                return ADD_LAYER_NORM.run(chosen, *args)
    if isinstance(layer_scale, nn.Module):
        y = x + layer_scale(branch)
    else:
        y = x + (branch if layer_scale is None else layer_scale * branch)
    return y, norm(y)


def _cast(t: Optional[Tensor], dt: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dt else t.to(dt)


# -- a per-module cache of small tensors derived from input sizes -----------------------------------


class ForwardCache:
    """Keeps a few small tensors a module derives from its inputs' sizes, so that a forward
    computes them once: RoPE tables per grid size (blocks that call the RoPE module again, as
    dinov3's get_intermediate_layers does, reuse them), level-shape tensors per pyramid.

    Only in eval mode (training augments RoPE coordinates at random) and outside torch.compile
    and torch.export (which trace the computation into the graph, and whose fake tensors have no
    storage to key on). Keys that depend on a buffer hold its storage and version counter:
    load_state_dict, .to() or an in-place edit of it invalidates the entries. `key` is a function,
    called only where the cache applies.
    """

    _MAX_ENTRIES = 8

    def _cached(self, key, compute):
        if self.training or torch.compiler.is_compiling():
            return compute()
        key = key()
        cache = self.__dict__.setdefault("_fastdino_cache", {})
        if key not in cache:
            if len(cache) >= self._MAX_ENTRIES:
                cache.pop(next(iter(cache)))
            cache[key] = compute()
        return cache[key]


def buffer_key(t: Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), t._version)
