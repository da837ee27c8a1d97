"""`fastdino.bench.run(model, inputs)`: the original model and its fastdino variants side by side.

For each variant: median and p90 latency of one call, images per second, peak memory, a
per-component breakdown (CUDA events on the GPU, wall clock on the CPU) and the accuracy against
the original (max relative error of every output, argmax agreement of segmentation outputs, via
fastdino.verify's comparison), with a flag where a variant falls outside its tolerance or below
99.5% agreement. The eager variants are timed in interleaved rounds (see `run`). What one call
covers: from the input tensors on the device to the model's outputs; no pre- or post-processing.
`fastdino bench` (fastdino/bench/cli.py) runs it on models by name (fastdino/bench/models.py) and
writes a table, JSON and a chart.

Variants (VARIANTS): "original" is the model as its code runs, its own precision included (dinov3's
segmentor runs its pixel decoder in fp32); "-bf16" variants run the original under bfloat16
autocast, or fastdino with precision="bf16" on a bfloat16 copy of the weights and inputs; "+graph"
replays the patched model from a CUDA graph (fastdino.cuda_graph); "compile" and "max-autotune" are
torch.compile of the original (max-autotune compiles for minutes: opt-in), "fastdino+compile" and
"fastdino-bf16+max-autotune" of the patched model. "fastdino" variants run dispatch's untuned
default (no timing cache); "-tuned" ones run fastdino.tune on the same inputs first (in memory).
The model is unpatched first and left unpatched.
"""

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..graph import cuda_graph
from ..patch import patch, unpatch
from ..tuning import TimingCache, tune
from ..verify import _leaves, compare_outputs

VARIANTS = {
    "original": "the model as its code runs, its own precision included",
    "original-bf16": "the original under torch.autocast(dtype=torch.bfloat16)",
    "compile": "torch.compile(original)",
    "max-autotune": "torch.compile(original, mode='max-autotune') (compiles for minutes)",
    "fastdino": "fastdino.patch(model) with dispatch's untuned default (no timing cache)",
    "fastdino-tuned": "fastdino.patch(model), then fastdino.tune on the same inputs (kept in memory)",
    "fastdino-bf16": "fastdino.patch(model, precision='bf16') on bfloat16 weights and inputs (fp32 weights "
                     "for a model that casts to fp32 itself, e.g. dinov3's segmentor: bf16_weights=False)",
    "fastdino-bf16-tuned": "fastdino-bf16, then fastdino.tune on the same inputs (kept in memory)",
    "fastdino+graph": "fastdino.patch(model) replayed from a CUDA graph",
    "fastdino-bf16+graph": "fastdino-bf16 replayed from a CUDA graph",
    "fastdino-bf16-tuned+graph": "fastdino-bf16-tuned replayed from a CUDA graph",
    "fastdino+compile": "torch.compile(fastdino.patch(model))",
    "fastdino-bf16+max-autotune": "torch.compile(fastdino-bf16, mode='max-autotune') (compiles for minutes)",
}
DEFAULT_VARIANTS = {"cuda": ("original", "original-bf16", "compile", "fastdino", "fastdino-tuned",
                             "fastdino-bf16", "fastdino-bf16-tuned", "fastdino-bf16-tuned+graph"),
                    "cpu": ("original", "fastdino", "fastdino-tuned")}
ROUNDS = 5  # the eager variants are timed in this many interleaved rounds
AGREEMENT_FLAG = 0.995  # argmax agreement below this is flagged


@dataclass
class VariantResult:
    variant: str
    median_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    images_per_s: Optional[float] = None
    peak_mib: Optional[float] = None  # GPU only
    breakdown_ms: Optional[dict] = None  # part -> ms per call, each part without the parts inside it
    max_rel_err: Optional[float] = None  # over every floating output, against the original
    min_agreement: Optional[float] = None  # over the segmentation outputs (None: the model has none)
    flags: list = field(default_factory=list)  # why this variant's numbers are not the original's
    error: Optional[str] = None  # the variant could not run (compile or capture failed, ...)
    tuned: Optional[str] = None  # a "-tuned" variant: what fastdino.tune chose


@dataclass
class BenchResult:
    model: str
    device: str
    batch: int
    timed: str
    rows: list[VariantResult]
    resolution: Optional[int] = None
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def row(self, variant: str) -> Optional[VariantResult]:
        return next((r for r in self.rows if r.variant == variant), None)


def _call(model: Callable, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _to(value: Any, dtype: torch.dtype):
    """Floating tensors of `value` (nested) in `dtype`, keeping their memory format."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _to(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, dtype) for v in value)
    return value


def _batch(inputs) -> int:
    first = next(iter(_leaves(inputs).values()), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_ms(fn: Callable, device: torch.device, iters: int, warmup: int) -> list[float]:
    """ms of each of `iters` calls of fn after `warmup` calls (CUDA events on the GPU, wall clock on
    the CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def expand(model: nn.Module, path: str) -> list[str]:
    """`path`, or for "path.*" the paths of the module's children, the children of its ModuleLists,
    ModuleDicts and Sequentials standing for them (containers are iterated, not always called)."""
    if not path.endswith(".*") and path != "*":
        return [path]
    base = path[:-2] if path != "*" else ""
    out = []
    for name, child in model.get_submodule(base).named_children():
        full = f"{base}.{name}" if base else name
        containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
        out += expand(model, f"{full}.*") if isinstance(child, containers) else [full]
    return out


class _PartTimer:
    """Forward hooks on the modules of each part: per call of the model, the time spent inside each
    part (CUDA events or wall clock), then each part without the parts nested in it."""

    def __init__(self, model: nn.Module, components: dict[str, list[str]], device: torch.device):
        self.device, self.handles, self.spans = device, [], {}
        self.paths = {part: [p for path in paths for p in expand(model, path)]
                      for part, paths in components.items()}
        for part, paths in self.paths.items():
            for path in paths:
                module = model.get_submodule(path)
                self.handles.append(module.register_forward_pre_hook(self._start(part, path)))
                self.handles.append(module.register_forward_hook(self._end(part, path)))

    def _stamp(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, part, path):
        def hook(module, args):
            self.spans.setdefault((part, path), []).append([self._stamp(), None])
        return hook

    def _end(self, part, path):
        def hook(module, args, out):
            self.spans[(part, path)][-1][1] = self._stamp()
        return hook

    def _ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3

    def measure(self, fn: Callable, iters: int, total_ms: float) -> dict[str, float]:
        """Each part's median share of a call (and "other": the rest of the call), scaled so that
        the parts add up to `total_ms`, the latency measured without hooks."""
        per_call = []
        for _ in range(iters):
            self.spans = {}
            start = self._stamp()
            fn()
            end = self._stamp()
            _sync(self.device)
            inclusive = {key: sum(self._ms(s, e) for s, e in spans) for key, spans in self.spans.items()}
            parts = _exclusive(inclusive)
            parts["other"] = max(0.0, self._ms(start, end) - sum(parts.values()))
            per_call.append(parts)
        names = [*self.paths, "other"]
        medians = {part: statistics.median(c.get(part, 0.0) for c in per_call) for part in names}
        scale = total_ms / sum(medians.values()) if sum(medians.values()) > 0 else 0.0
        return {part: ms * scale for part, ms in medians.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and (outer == "" or inner.startswith(outer + "."))


def _exclusive(inclusive: dict) -> dict[str, float]:
    """{(part, path): ms} -> {part: ms}, each module's time less that of the other parts' modules
    directly inside it (not those inside those: they are already in the inner module's time)."""
    out = {}
    for (part, path), ms in inclusive.items():
        inner = [(q, p) for (q, p) in inclusive if q != part and _inside(p, path)]
        direct = [(q, p) for (q, p) in inner if not any(_inside(p, r) and _inside(r, path) for _, r in inner)]
        out[part] = out.get(part, 0.0) + ms - sum(inclusive[k] for k in direct)
    return out


@contextlib.contextmanager
def _bf16_weights(model: nn.Module):
    """The model's floating parameters and buffers in bfloat16 for the duration, then exactly the
    tensors it had (a deep copy would not do: some models do not pickle)."""
    params = {n: p.data for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    model.to(torch.bfloat16)
    try:
        yield model
    finally:
        for n, p in model.named_parameters():
            p.data = params[n]
        for n, b in buffers.items():
            owner, _, leaf = n.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b


def _interleaved(variant: str) -> bool:
    """Eager variants, timed in interleaved rounds; compiled and graphed ones (costly to prepare, or
    tied to the model's current tensors) are timed in one block each."""
    base, _, extra = variant.partition("+")
    return not extra and base not in ("compile", "max-autotune")


@contextlib.contextmanager
def _prepared(variant: str, model: nn.Module, inputs, device: torch.device, bf16_weights: bool = True,
              tuned: Optional[dict] = None):
    """(callable, the module the hooks go on or None, the dtype whose error bound applies or None)
    for `variant`, for the duration of the context. A "-tuned" variant tunes on its first entry
    and keeps the result in `tuned` (a dict the caller holds), which later entries apply."""
    unpatch(model)
    base, _, extra = variant.partition("+")
    base, tune_it = (base[:-len("-tuned")], True) if base.endswith("-tuned") else (base, False)
    policy = base == "fastdino-bf16"
    bf16_weights = policy and bf16_weights
    with _bf16_weights(model) if bf16_weights else contextlib.nullcontext(model) as m:
        x = _to(inputs, torch.bfloat16) if bf16_weights else inputs
        if base.startswith("fastdino"):
            cache = TimingCache(None, tuned["entries"]) if tune_it and tuned and "entries" in tuned else False
            patch(m, precision="bf16" if policy else None, cache=cache)
            if tune_it and cache is False:
                report = tune(m, x, cache=False)
                if tuned is not None:
                    tuned.update(entries=report.entries, report=report)
        try:
            if base in ("compile", "max-autotune") or extra in ("compile", "max-autotune"):
                torch._dynamo.reset()
                compiled = torch.compile(m, mode="max-autotune" if "max-autotune" in (base, extra) else None)
                yield (lambda: _call(compiled, x)), None, None
            elif extra == "graph":
                graphed = cuda_graph(m)
                yield (lambda: _call(graphed, x)), None, torch.bfloat16 if policy else None
            else:
                autocast = base == "original-bf16"

                def fn():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        return _call(m, x)

                yield fn, m, torch.bfloat16 if (policy or autocast) else None
        finally:
            unpatch(m)


def run(model: nn.Module, inputs, variants=None, components: Optional[dict] = None, iters: int = 20,
        warmup: int = 3, breakdown_iters: int = 5, name: str = "model", timed: str = "",
        progress: Optional[Callable[[str], None]] = None, bf16_weights: bool = True) -> BenchResult:
    """Time `model` on `inputs` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments, on the model's device) for each of `variants` (names of VARIANTS; default: the
    device's DEFAULT_VARIANTS) and compare each variant's outputs with the original's.

    Timing: the eager variants in ROUNDS interleaved rounds (each round prepares every variant in
    turn, in a rotating order, runs one untimed call and times its share of `iters`), so that no
    variant gains from running first or last; compiled and graphed variants in one block each,
    after `warmup` untimed calls. A "-tuned" variant is tuned once, on its first preparation.
    `components` ({part: [module paths]}; "path.*" for a module's children, see `expand`) adds a
    per-part breakdown for the eager variants, from a separate pass with hooks: each part's share
    of a call (a part containing another part's module without it; the rest of the call is
    "other"), scaled to add up to the median latency. `progress(variant)` is called before each
    variant's first preparation. `bf16_weights=False` keeps fp32 weights in the fastdino-bf16
    variants (the bf16 policy alone), for a model that casts to fp32 itself. A variant that cannot
    run (a model that cannot be captured in a CUDA graph, a failed compile) gets its reason in
    `error`; the others still run. The model is unpatched first and left unpatched.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    variants = list(variants or DEFAULT_VARIANTS.get(device.type, DEFAULT_VARIANTS["cpu"]))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"fastdino.bench: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    result = BenchResult(model=name, device=str(device), batch=_batch(inputs), timed=timed, rows=[])
    if device.type != "cuda":
        result.notes.append("CPU run: fastdino's kernels target GPUs; these figures check that everything "
                            "runs, speed figures need a GPU")
    rows = {v: VariantResult(v) for v in variants}
    times: dict = {v: [] for v in variants}
    tuned: dict = {v: {} for v in variants}
    hooked = {}

    def prepared(variant):
        return _prepared(variant, model, inputs, device, bf16_weights, tuned[variant])

    with torch.no_grad():
        unpatch(model)
        reference = {k: v.detach().clone() for k, v in _leaves(_call(model, inputs)).items()}
        for variant in variants:  # outputs, peak memory; the blocks of the non-interleaved variants
            if progress is not None:
                progress(variant)
            row = rows[variant]
            try:
                with prepared(variant) as (fn, module, bound):
                    out = {k: v.detach().clone() for k, v in _leaves(fn()).items()}
                    _sync(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    times[variant] = times_ms(fn, device, 0 if _interleaved(variant) else iters, warmup)
                    if device.type == "cuda":
                        row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
                    hooked[variant] = module is not None
            except Exception as e:  # noqa: BLE001 - one variant's failure is reported, the others run
                row.error = _error(e)
            else:
                _accuracy(row, reference, out, bound)
            _clean(model, device)
        eager = [v for v in variants if _interleaved(v) and rows[v].error is None]
        per_round = max(1, -(-iters // ROUNDS))
        for r in range(min(ROUNDS, iters) if eager else 0):
            for variant in eager[r % len(eager):] + eager[:r % len(eager)]:
                if rows[variant].error is not None:
                    continue
                try:
                    with prepared(variant) as (fn, _, _):
                        times[variant] += times_ms(fn, device, per_round, 1)
                except Exception as e:  # noqa: BLE001
                    rows[variant].error = _error(e)
                _clean(model, device)
        for variant in variants:
            row = rows[variant]
            if row.error is not None or not times[variant]:
                continue
            row.median_ms, row.p90_ms = statistics.median(times[variant]), _p90(times[variant])
            row.images_per_s = 1e3 * result.batch / row.median_ms
            report = tuned[variant].get("report")
            if report is not None:
                row.tuned = report.summary()
            if components and hooked.get(variant):  # eager variants; compiled and graphed ones have none
                try:
                    with prepared(variant) as (fn, module, _):
                        fn()
                        timer = _PartTimer(module, components, device)
                        try:
                            row.breakdown_ms = timer.measure(fn, breakdown_iters, row.median_ms)
                        finally:
                            timer.remove()
                except Exception as e:  # noqa: BLE001
                    row.error = _error(e)
                _clean(model, device)
    result.rows = [rows[v] for v in variants]
    return result


def _error(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _clean(model: nn.Module, device: torch.device):
    unpatch(model)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _accuracy(row: VariantResult, reference: dict, out: dict, bound):
    errors, agreements = compare_outputs(reference, {k: v.to(reference[k].dtype) for k, v in out.items()},
                                         tol_dtype=bound)
    row.max_rel_err = max((e.rel for e in errors), default=0.0)
    row.min_agreement = min((a.share for a in agreements), default=None)
    row.flags = [f"{e.name}: rel. error {e.rel:.2e} > {e.tol:.0e}" for e in errors if not e.ok]
    row.flags += [f"{a.name}: argmax agreement {100 * a.share:.2f}% < {100 * AGREEMENT_FLAG:.1f}%"
                  for a in agreements if a.share < AGREEMENT_FLAG]
