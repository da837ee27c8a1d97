"""`fastdino.patch(model)`: recognise DINOv3 modules by class name and structure, swap them for
their fused forms in place, and report what was swapped and what was left alone and why."""

import functools
import inspect
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import _ext, selfcheck
from .fused import RULES, sources
from .fused.common import rule_reasons
from .ops._dispatch import BACKENDS
from .tuning import TimingCache

PRECISIONS = (None, "bf16")

_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(mixin: type, original: type) -> type:
    """The class a swapped module takes: the mixin's forward over the original class, named after
    the original with the mixin's first word (FusedDINOv3ViTLayer, CachedRopePositionEmbedding,
    Bf16MSDeformAttnPixelDecoder)."""
    key = (mixin, original)
    if key not in _FUSED_CLASSES:
        attrs = {"_fastdino_original_class": original, "__reduce_ex__": _reduce_fused}
        name = re.match(r"_?([A-Z][a-z0-9]*)", mixin.__name__).group(1) + original.__name__
        if _keeps_class_name(original):
            # transformers keys on the class of a model: its output-recording registry on
            # str(type(model)), save_pretrained's config "architectures" and the loss on its name
            name = original.__name__
            attrs.update(__module__=original.__module__, __qualname__=original.__qualname__)
            if "forward" in vars(mixin):
                attrs["forward"] = _with_signature(mixin.forward, original.forward)
        _FUSED_CLASSES[key] = type(name, (mixin, original), attrs)
    return _FUSED_CLASSES[key]


def _with_signature(forward, original_forward):
    """`forward` as the original's signature shows it: transformers reads a model's forward
    signature (which outputs it can return) through inspect."""

    @functools.wraps(original_forward)
    def fused_forward(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    del fused_forward.__wrapped__  # inspect shows the original's signature through __signature__
    fused_forward.__signature__ = inspect.signature(original_forward)
    return fused_forward


def _keeps_class_name(original: type) -> bool:
    """A transformers model class (a PreTrainedModel): its fused class takes its names."""
    return any(c.__name__ == "PreTrainedModel" for c in original.__mro__)


def _reduce_fused(module: nn.Module, protocol: int):
    """Pickle (torch.save, copy.deepcopy) a swapped module as its mixin and original class, both
    importable, plus its state: the fused class is made at run time, so it has no importable name."""
    cls = type(module)
    state = {k: v for k, v in module.__getstate__().items() if k not in _PER_PROCESS}
    return _new_fused, (cls.__bases__[0], cls._fastdino_original_class), state


# What a swapped module keeps for this process only: its decisions (a new process self-checks and
# decides again; the ViT attention's also whether its projections can take the RoPE epilogue) and the
# tuned table (a loaded model reads the timing cache of its new machine).
_PER_PROCESS = ("_fastdino_decisions", "_fastdino_epilogue", "_fastdino_tuned")


def _new_fused(mixin: type, original: type) -> nn.Module:
    """An empty instance of the fused class of (mixin, original); pickle then restores its state."""
    cls = _fused_class(mixin, original)
    return cls.__new__(cls)


@dataclass
class Swapped:
    path: str
    original: str
    fused: str
    backend: str  # what the module's main op selects for its current parameter device and dtype
    pinned: bool = False  # backend= chose it
    op: Optional[str] = None  # the fastdino op the module runs


@dataclass
class Changed:
    path: str
    change: str  # e.g. "backend None -> 'cpu'"


@dataclass
class Skipped:
    path: str
    cls: str
    reasons: list[str]


@dataclass
class PatchReport:
    swapped: list[Swapped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)  # patched before, with these options
    changed: list[Changed] = field(default_factory=list)  # patched before, now with the new options
    notes: list[str] = field(default_factory=list)
    cache: Optional["TimingCache"] = None  # the timing cache applied; cache.explain() says what and why

    where: str = ""  # the model's parameters: device and dtype

    def __str__(self) -> str:
        """A summary: what runs how, counted by class; what was left alone, counted by reason."""
        if not (self.swapped or self.changed or self.skipped or self.already_patched):
            looked_for = sorted({r.class_name for r in RULES})
            return ("fastdino.patch: nothing to patch in this model. fastdino recognises these classes (by "
                    f"name and structure): {', '.join(looked_for)}")
        head = f"fastdino.patch: {len(self.swapped)} modules swapped"
        head += f", {len(self.changed)} changed" if self.changed else ""
        head += f", {len(self.already_patched)} already patched" if self.already_patched else ""
        head += f", {len(self.skipped)} left alone" + (f" ({self.where})" if self.where else "")
        lines = [head]
        for (backend, pinned), classes in _grouped(self.swapped).items():
            runs = (f"run on the pinned backend {backend!r}" if pinned
                    else _RUNS.get(backend, f"run fastdino kernels on {backend}"))
            lines.append(f"  {runs}: {classes}")
        if self.changed:
            lines.append(f"  changed: {', '.join(sorted({c.change for c in self.changed}))}")
        reasons = Counter((s.cls, "; ".join(s.reasons)) for s in self.skipped)
        lines += [f"  left alone: {n} {cls}: {why}" for (cls, why), n in reasons.items()]
        lines += [f"  note: {n}" for n in self.notes]
        if self.swapped or self.skipped:
            lines.append("  report.details() lists every module")
        return "\n".join(lines)

    def details(self) -> str:
        """Every module: path, original and fused class, what it runs on; every module left alone."""
        lines = [f"  swapped  {s.path or '<root>'}: {s.original} -> {s.fused} [{s.backend}]"
                 for s in self.swapped]
        lines += [f"  changed  {c.path or '<root>'}: {c.change}" for c in self.changed]
        lines += [f"  left     {s.path or '<root>'} ({s.cls}): {'; '.join(s.reasons)}" for s in self.skipped]
        return "\n".join(lines)


# What a swapped module's report backend means, in words.
_RUNS = {"tuned": "run what fastdino.tune measured fastest on this machine per input signature (timing "
                  "cache; the untuned default elsewhere)",
         "ref": "run the model's own code (no kernel is picked for this device and dtype: `fastdino info` "
                "says why)",
         "cache": "cache their RoPE tables per image size",
         "fold": "fold their BatchNorm into the 1x1 conv (cached per parameter version)",
         "bf16": "run as bf16 regions under autocast (precision='bf16')"}


def _grouped(swapped: list) -> dict:
    """{(report backend, pinned): "2 DINOv3ViTLayer (add_layer_norm), ..."} in order of first appearance."""
    counts: dict = {}
    for s in swapped:
        counts.setdefault((s.backend, s.pinned), Counter())[(s.original, s.op)] += 1
    return {b: ", ".join(f"{n} {cls}" + (f" ({op})" if op else "") for (cls, op), n in c.items())
            for b, c in counts.items()}


def patch(model: nn.Module, backend: Optional[str] = None, precision: Optional[str] = None,
          cache: Union[None, bool, str, os.PathLike, TimingCache] = None,
          trust: Sequence[str] = ()) -> PatchReport:
    """Swap every recognised module of `model` for its fused form, in place.

    Parameters, buffers and state_dict keys are unchanged. On a patched model it applies the new
    options to the modules patched before (report.changed) and swaps what they now cover (the
    precision regions of precision="bf16"; regions of a precision no longer asked for go back to
    their original class); with the same options it changes nothing. A patched model pickles
    (torch.save, copy.deepcopy) and loads back patched wherever fastdino is installed.
    `backend` pins the kernel backend of every fused op ("cuda", "triton", "cpu" or "ref").
    `precision`: None keeps every module's precision. "bf16" also runs the fp32 regions that
    dominate a segmentor's cost in bf16 under autocast (dinov3's pixel decoder, which the
    original forces to fp32, its ViT-Adapter, transformers' Mask2Former pixel decoder):
    matmuls and convolutions in bf16; softmax, normalisation statistics and the deformable
    attention's sampling locations and weights in fp32; outputs returned in fp32. Check what it
    changes on your inputs with fastdino.verify.
    `cache`: the timing cache whose choices apply (fastdino.tune): None reads the default one
    ($FASTDINO_CACHE, else the user cache dir), a path reads that file, False reads none (every
    module then runs dispatch's untuned default). Only entries measured on this machine apply.
    `trust`: module names (or packages) whose classes are copies of the libraries' classes, e.g.
    trust=["mypkg.vendored.dinov3"]. Otherwise a module is swapped only when its class is defined
    in the library module fastdino's fused form follows, at a library release (or, for the
    dinov3 repository, a code digest) it was written against: a class with a known name defined
    elsewhere is left alone, with the reason. Structure checks apply to trusted classes too.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastdino.patch: backend must be one of {BACKENDS} or None, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"fastdino.patch: precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(trust, str) or not all(isinstance(t, str) and t for t in trust):
        raise ValueError(f"fastdino.patch: trust must be a list of module names, got {trust!r}")
    sources.TRUSTED = tuple(trust)
    try:
        return _patch(model, backend, precision, cache)
    finally:
        sources.TRUSTED = ()


def _patch(model: nn.Module, backend: Optional[str], precision: Optional[str], cache) -> PatchReport:
    report = PatchReport()
    tuned = None
    if isinstance(cache, TimingCache):
        report.cache = cache
    elif cache is not False:
        report.cache = TimingCache.load(None if cache is True else cache)
    if report.cache is not None:
        tuned = report.cache.choices()
    param = next(model.parameters(), None)
    if param is not None:
        report.where = f"parameters on {param.device.type}, {str(param.dtype).replace('torch.', '')}"
    if not _ext.HAS_EXT:
        report.notes.append(f"C++/CUDA kernels unavailable: {_ext.EXT_ERROR}")
    for path, module in model.named_modules():
        if hasattr(type(module), "_fastdino_original_class"):
            _repatch(path, module, backend, precision, report)
            if is_fused(module):
                _forget(module, tuned)
            continue
        rule, reasons = _rule(module, precision)
        if rule is None:
            continue
        if reasons:
            report.skipped.append(Skipped(path, type(module).__name__, reasons))
            continue
        original = type(module)
        pinned = backend is not None and rule.pinnable
        shown = backend if pinned else rule.backend(module)  # before the swap: an error leaves no half
        module.__class__ = _fused_class(rule.mixin, original)
        module._fastdino_backend = backend
        module._fastdino_precision = precision  # e.g. values in bf16 where a bf16 region's autocast is on
        _forget(module, tuned)
        # a class that keeps its name (transformers models) is reported by the fused forward it runs
        fused = rule.mixin.__name__ if _keeps_class_name(original) else type(module).__name__
        if not pinned and rule.pinnable and tuned and any(k == original.__name__ for k, _, _ in tuned):
            shown = "tuned"
        report.swapped.append(Swapped(path, original.__name__, fused, shown, pinned,
                                      getattr(rule.mixin, "_fastdino_op", None)))
    if param is not None:
        _check_ahead(model, param.device, param.dtype, backend, tuned)
    if tuned:
        kinds = {kind for kind, _, _ in tuned}
        layers = sum(1 for m in model.modules() if is_fused(m) and m._fastdino_backend is None
                     and type(m)._fastdino_original_class.__name__ in kinds)
        n = len(report.cache.ignored)
        ignored = f"; {n} entries of other machines ignored" if n else ""
        where = report.cache.path or "in memory"
        report.notes.append(f"{layers} layers tuned from cache {where} ({len(tuned)} entries for "
                            f"this machine{ignored}: report.cache.explain())")
    elif report.cache is not None and (report.cache.ignored or report.cache.error):
        why = (f"unreadable: {report.cache.error}" if report.cache.error
               else f"{len(report.cache.ignored)} entries, none for this machine")
        report.notes.append(f"timing cache {report.cache.path} not applied ({why}: report.cache.explain())")
    regions = [s.path or "<root>" for s in report.swapped if s.backend == "bf16"]
    if precision == "bf16" and regions:
        report.notes.append(
            f"precision bf16: {', '.join(regions)} run under bf16 autocast (matmuls and convolutions in "
            "bf16; softmax, normalisation statistics, deformable sampling offsets, locations and weights in "
            "fp32; outputs returned in fp32); everything else keeps its precision")
    elif precision == "bf16":
        bf16_classes = sorted({r.class_name for r in RULES if r.precision == "bf16"})
        report.notes.append(f"precision bf16 changes nothing here: it applies to {', '.join(bf16_classes)}, "
                            "and this model has none (patched before with it: see changed)")
    return report


def _rule(module: nn.Module, precision: Optional[str]):
    """(the rule that swaps `module`, []), or (a rule for its class name, why none swaps it), or
    (None, None) where no rule has its class name. Two libraries can share a class name (dinov3's
    and timm's Mlp): the first rule that can swap it wins; where none can, the reasons of the rule
    whose checks it passed furthest (timm's Mlp with a norm: "norm is active", not "not dinov3's")."""
    rules = [r for r in RULES if type(module).__name__ == r.class_name and r.precision in (None, precision)]
    found = (-1, None, None)
    for rule in rules:
        passed, reasons = rule_reasons(rule, module)
        if not reasons:
            return rule, []
        if passed > found[0]:
            found = (passed, rule, reasons)
    return found[1:]


def _check_ahead(model: nn.Module, device, dtype, backend: Optional[str], tuned: Optional[dict]):
    """The self-checks a compiled graph of this model would need, run now (inside a torch.compile
    trace a backend not checked before is not used): each swapped op's pinned backend, or its
    priority's kernel backends, at the parameters' dtype, and the tuned winners at their dtype."""
    from .ops import OPS

    wanted = set()
    names = {name for cls in {type(m) for m in model.modules() if is_fused(m)}
             for name in (getattr(cls, "_fastdino_op", None), *getattr(cls, "_fastdino_more_ops", ()))}
    for name in names - {None}:
        op = OPS[name]
        names = [backend] if backend is not None else op.priority.get(device.type, ())
        wanted |= {(op, b, dtype) for b in names if b != "ref"}
    for entry in (tuned or {}).values():
        same_device = entry["env"]["device_type"] == device.type
        if entry["winner"] != "original" and same_device and entry["op"] in OPS:
            dt = getattr(torch, str(entry.get("dtype", "")), None)
            wanted.add((OPS[entry["op"]], entry["winner"], dt if isinstance(dt, torch.dtype) else dtype))
    selfcheck.check_ahead(wanted, device)


def _repatch(path: str, module: nn.Module, backend: Optional[str], precision: Optional[str],
             report: PatchReport):
    """A module patched before: the new options, or its original class where its rule is a
    precision region that `precision` no longer asks for."""
    mixin = type(module).__bases__[0]
    rule = next((r for r in RULES if r.mixin is mixin), None)
    if rule is not None and rule.precision is not None and rule.precision != precision:
        _restore(module)
        change = f"precision {rule.precision!r} -> {precision!r}: its original forward again"
        report.changed.append(Changed(path, change))
        return
    old = (module._fastdino_backend, getattr(module, "_fastdino_precision", None))
    if old == (backend, precision):
        report.already_patched.append(path)
        return
    module._fastdino_backend, module._fastdino_precision = backend, precision
    module.__dict__.pop("_fastdino_cache", None)
    change = [f"{what} {a!r} -> {b!r}" for what, a, b in (("backend", old[0], backend),
                                                          ("precision", old[1], precision)) if a != b]
    report.changed.append(Changed(path, ", ".join(change)))


def _forget(module: nn.Module, tuned: Optional[dict]):
    """New options or a new timing cache: the module decides again."""
    for name in _PER_PROCESS:
        module.__dict__.pop(name, None)
    module._fastdino_tuned = tuned
    refresh = getattr(type(module), "_fastdino_refresh", None)
    if refresh is not None:  # host-side values a trace of the fused forward reads (EoMT's mask probs)
        refresh(module)


def is_fused(module: nn.Module) -> bool:
    return hasattr(type(module), "_fastdino_original_class")


def _restore(module: nn.Module):
    module.__class__ = type(module)._fastdino_original_class
    del module._fastdino_backend
    for name in _PER_PROCESS:
        module.__dict__.pop(name, None)
    module.__dict__.pop("_fastdino_cache", None)
    module.__dict__.pop("_fastdino_precision", None)


def unpatch(model: nn.Module) -> int:
    """Restore the original class of every module `patch` swapped; returns how many."""
    restored = 0
    for module in model.modules():
        if hasattr(type(module), "_fastdino_original_class"):
            _restore(module)
            restored += 1
    return restored
