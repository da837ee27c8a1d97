"""`fastdino.verify(model, inputs)`: run the original and the patched model on the same inputs and
say how far apart their outputs are, per output, and for segmentation outputs how many pixels
get the same class."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .ops._dispatch import observe
from .patch import PatchReport, patch, unpatch

# The relative error (Frobenius norms) a patched output may have against the original, by the
# output's dtype: fp32 kernels differ from PyTorch in summation order only; 16-bit outputs by a few
# roundings. Under precision="bf16" regions compute in bf16, so every output gets the bf16 bound.
REL_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
AGREEMENT_FLOOR = 0.99  # share of pixels whose argmax class must agree

# (class logits, mask logits) pairs of Mask2Former-style outputs: (B, Q, K + 1) and (B, Q, H, W)
MASK_CLASSIFICATION_PAIRS = (("pred_logits", "pred_masks"), ("class_queries_logits", "masks_queries_logits"))


@dataclass
class OutputError:
    name: str
    shape: tuple
    dtype: str
    max_abs: float
    mean_abs: float
    rel: float  # |patched - original| / |original|, Frobenius norms
    tol: float  # the bound on rel this output is held to

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol  # False for NaN too


@dataclass
class Agreement:
    name: str
    pixels: int
    share: float  # of pixels whose argmax class is the same
    classes: int  # distinct classes in the original's map
    majority: float  # share of the original's most frequent class: agreement is informative only well below 1


@dataclass
class VerifyReport:
    patch: PatchReport
    errors: list[OutputError] = field(default_factory=list)
    agreement: list[Agreement] = field(default_factory=list)
    ran: dict = field(default_factory=dict)  # {(op, backend): calls} in the patched run
    agreement_floor: float = AGREEMENT_FLOOR

    @property
    def passed(self) -> bool:
        """Every output within its tolerance and every argmax agreement at or above the floor."""
        agree = all(a.share >= self.agreement_floor for a in self.agreement)
        return agree and all(e.ok for e in self.errors)

    def verdict(self) -> str:
        """One line: PASS or FAIL, against what."""
        bounds = ", ".join(sorted({f"{e.dtype} rel err <= {e.tol:g}" for e in self.errors}))
        floor = f"; argmax agreement >= {100 * self.agreement_floor:g}%" if self.agreement else ""
        failures = [f"{e.name or '<output>'} rel err {e.rel:.3g} > {e.tol:g}"
                    for e in self.errors if not e.ok]
        failures += [f"{a.name} agreement {100 * a.share:.3f}%" for a in self.agreement
                     if a.share < self.agreement_floor]
        if self.passed:
            return f"verify: PASS ({len(self.errors)} outputs; {bounds}{floor})"
        return f"verify: FAIL: {'; '.join(failures)} (bounds: {bounds}{floor})"

    def kernels(self) -> str:
        """Which fastdino backends ran in the patched run, with call counts."""
        return "kernels: " + ran_summary(self.ran)

    @property
    def worst_rel(self) -> float:
        return max((e.rel for e in self.errors), default=0.0)

    @property
    def min_agreement(self) -> Optional[float]:
        return min((a.share for a in self.agreement), default=None)

    def __str__(self) -> str:
        lines = [self.verdict(), self.kernels(), str(self.patch).splitlines()[0], "",
                 "| output | shape | dtype | max abs err | mean abs err | rel err | bound |",
                 "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {e.name or '<output>'} | {tuple(e.shape)} | {e.dtype} | {e.max_abs:.3e} | "
                  f"{e.mean_abs:.3e} | {e.rel:.3e} | {e.tol:g}{'' if e.ok else ' FAIL'} |"
                  for e in self.errors]
        lines += [f"argmax agreement {a.name}: {100 * a.share:.3f}% of {a.pixels} pixels (original map: "
                  f"{a.classes} classes, the largest on {100 * a.majority:.1f}%)" for a in self.agreement]
        return "\n".join(lines)


def _leaves(out: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in a model output, by dotted name (dict keys, ModelOutput fields, list indices)."""
    if isinstance(out, Tensor):
        return {prefix: out}
    items = out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else ()
    leaves = {}
    for key, value in items:
        leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def _run(model: nn.Module, inputs) -> dict[str, Tensor]:
    with torch.no_grad():
        if isinstance(inputs, dict):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
    return {k: v.detach().clone() for k, v in _leaves(out).items()}


def semantic_map(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Mask2Former's semantic inference: argmax over classes of
    sum_q softmax(class_logits)[q, :-1] * sigmoid(mask_logits)[q] (the last class is "no object")."""
    probs = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.float().sigmoid()).argmax(1)


def _agreement(name: str, ref_map: Tensor, out_map: Tensor) -> Agreement:
    counts = ref_map.flatten().unique(return_counts=True)[1]
    return Agreement(name, ref_map.numel(), (ref_map == out_map).float().mean().item(), counts.numel(),
                     (counts.max() / ref_map.numel()).item() if ref_map.numel() else 0.0)


def class_maps(leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    """The (B, H, W) class maps a segmentation model's output tensors (by name) give: Mask2Former's
    semantic inference from each pair of class and mask logits, or the argmax over dim 1 of a lone
    (B, classes, H, W) logits output. Empty for a backbone."""
    maps = {}
    for cls_name, mask_name in MASK_CLASSIFICATION_PAIRS:
        for key, value in leaves.items():
            mask = leaves.get(key[: len(key) - len(cls_name)] + mask_name)
            if key.endswith(cls_name) and mask is not None and value.dim() == 3 and mask.dim() == 4:
                maps[f"{key} + {mask_name}"] = semantic_map(value, mask)
    if len(leaves) == 1:
        (value,) = leaves.values()
        if value.dim() == 4 and value.is_floating_point():
            maps["<output> argmax over dim 1"] = value.argmax(1)
    return maps


def _agreements(ref: dict[str, Tensor], out: dict[str, Tensor]) -> list[Agreement]:
    outs = class_maps(out)
    return [_agreement(name, m, outs[name]) for name, m in class_maps(ref).items() if name in outs]


def ran_summary(ran: dict) -> str:
    """{(op, backend): calls} in words, or that no op ran (the model's own code did)."""
    if not ran:
        return ("none ran; the patched modules ran the model's own code (fastdino.tune measured it fastest, "
                "or untuned dispatch picks the reference on this device and dtype: `fastdino info` says why, "
                "backend= pins one)")
    return ", ".join(f"{op} on {backend} ({n} calls)" for (op, backend), n in ran.items())


def counting_runs(counts: Counter):
    """Count every op's runs by (op, backend) while the context is open."""
    return observe(lambda op, backend, args: counts.update([(op, backend)]))


def verify(model: nn.Module, inputs, backend: Optional[str] = None, precision: Optional[str] = None,
           rel_tol: Optional[dict] = None, agreement_floor: float = AGREEMENT_FLOOR,
           trust: Sequence[str] = ()) -> VerifyReport:
    """Run `model` unpatched and patched (fastdino.patch with `backend` and `precision`) on `inputs`
    (a tensor, a tuple of positional arguments or a dict of keyword arguments) and report, per
    output tensor, the max and mean absolute error and the relative error against the original;
    for Mask2Former/EoMT outputs (class and mask logits) and (B, classes, H, W) logits maps, the
    share of pixels whose argmax class agrees; which kernels ran; and a verdict: PASS where every
    output's relative error is within `rel_tol[dtype]` (default REL_TOL; the bf16 bound for every
    output under precision="bf16") and every agreement is at least `agreement_floor`
    (`report.passed`). The model is left patched with these options (`trust` as in fastdino.patch).
    """
    tolerances = {**REL_TOL, **(rel_tol or {})}
    unpatch(model)
    ref = _run(model, inputs)
    report = VerifyReport(patch=patch(model, backend=backend, precision=precision, trust=trust),
                          agreement_floor=agreement_floor)
    counts: Counter = Counter()
    with counting_runs(counts):
        out = _run(model, inputs)
    report.ran = dict(counts)
    report.errors, report.agreement = compare_outputs(ref, out, tolerances,
                                                      torch.bfloat16 if precision == "bf16" else None)
    return report


def compare_outputs(ref: dict[str, Tensor], out: dict[str, Tensor], rel_tol: Optional[dict] = None,
                    tol_dtype: Optional[torch.dtype] = None) -> tuple[list[OutputError], list[Agreement]]:
    """Per floating output of `ref` (by name, as `_leaves` gives them): the errors of `out` against
    it, each held to `rel_tol[dtype]` (REL_TOL by default; the bound of `tol_dtype` when given, e.g.
    bf16 for a model run in bf16); and the argmax agreements of its segmentation outputs."""
    tolerances = {**REL_TOL, **(rel_tol or {})}
    errors = []
    for name, r in ref.items():
        o = out[name]
        if not r.is_floating_point():
            continue
        diff = (o.double() - r.double()).abs()
        norm = r.double().norm().item()
        tol = tolerances.get(tol_dtype or r.dtype, tolerances[torch.float32])
        errors.append(OutputError(name, tuple(r.shape), str(r.dtype).replace("torch.", ""),
                                  diff.max().item() if diff.numel() else 0.0,
                                  diff.mean().item() if diff.numel() else 0.0,
                                  diff.norm().item() / norm if norm else diff.norm().item(), tol))
    return errors, _agreements(ref, out)
