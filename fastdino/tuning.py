"""`fastdino.tune(model, example_inputs)`: which backend runs each swapped module, decided by
measurement on this GPU against the module's own code, kept in a timing cache.

For every decision a patched model makes (a module kind, an op, the signature of the op's
arguments: device, dtype, shape, strides, grad), tune runs the module that makes it on the real
inputs of that layer (captured with hooks while the example runs) with the decision forced to
each candidate: "original" (the model's own code for that part) and every kernel backend that can
run those arguments and passed its self-check. A candidate whose output differs from the
original's beyond the dtype bound (fastdino.verify's REL_TOL) is rejected with the measured error;
the others are timed in interleaved rounds after warmup (CUDA events on a GPU), median kept. The
fastest correct kernel wins only if it beats the original by more than `margin`; otherwise the
original runs. Layers of one kind with one signature share the decision: the first is timed, the
first few are all checked for correctness.

The timing cache is one JSON file (`cache_file()`: $FASTDINO_CACHE or the user cache dir, e.g.
~/.cache/fastdino/timing-cache.json), one entry per (module kind, op, signature, machine), each
with the winner, every candidate's median and error, and the machine it is valid for (GPU name,
compute capability, SM count, driver, CUDA runtime, torch, triton, fastdino version and build
hash). `fastdino.patch` applies the entries of this machine by default; others are ignored with the
reason (`TimingCache.explain()`, `fastdino tune --explain`). Writes are atomic (temp file + rename)
under a file lock, so processes tuning at once merge their entries. The file can be shipped with a
deployment: point FASTDINO_CACHE (or `patch(model, cache=path)`) at it.
"""

import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import _ext
from .fused import common
from .ops._dispatch import BACKENDS, Op
from .selfcheck import rel_error

FORMAT = 1
FILE_NAME = "timing-cache.json"
MAX_CHECKED = 4  # layers of one (kind, op, signature) whose outputs are checked against the original
MAX_PASSES = 4  # recording passes: decisions found behind tuned ones are tuned in the next pass


# -- where the cache lives and which machine an entry is for ---------------------------------------


def cache_dir() -> Path:
    """$FASTDINO_CACHE, else the platform's user cache dir + fastdino (XDG_CACHE_HOME or ~/.cache on
    Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows)."""
    if os.environ.get("FASTDINO_CACHE"):
        return Path(os.environ["FASTDINO_CACHE"]).expanduser()
    if platform.system() == "Darwin":
        base = Path.home() / "Library" / "Caches"
    elif platform.system() == "Windows":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastdino"


def cache_file(cache: Union[None, str, os.PathLike] = None) -> Path:
    """The cache file: `cache` (a .json file, or a directory that holds FILE_NAME), else in cache_dir()."""
    path = Path(cache).expanduser() if cache is not None else cache_dir()
    return path if path.suffix == ".json" else path / FILE_NAME


_BUILD_HASH: Optional[str] = None


def build_hash() -> str:
    """A hash of what runs: the compiled fastdino._C and the Triton kernels' sources."""
    global _BUILD_HASH
    if _BUILD_HASH is None:
        h = hashlib.sha256()
        files = [getattr(_ext._C, "__file__", None)] if _ext.HAS_EXT else []
        from . import kernels

        files += sorted(str(p) for p in Path(kernels.__file__).parent.glob("*.py"))
        for name in files:
            if name:
                h.update(Path(name).read_bytes())
        _BUILD_HASH = h.hexdigest()[:16]
    return _BUILD_HASH


def _driver_version() -> Optional[str]:
    try:
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return None


_ENVIRONMENTS: dict = {}


def environment(device: torch.device) -> dict:
    """The machine a timing is valid for: the device (GPU name, compute capability, SM count,
    driver, CUDA runtime; on a CPU its processor and cores) and the software (torch, triton,
    fastdino version and build hash, whether Triton runs interpreted)."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _ENVIRONMENTS:
        from . import __version__

        env = {"device_type": device.type}
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            env.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                       sms=props.multi_processor_count, driver=_driver_version(),
                       cuda_runtime=torch.version.cuda)
        else:
            env.update(device=platform.processor() or platform.machine(), cores=os.cpu_count())
        env.update(torch=torch.__version__, triton=_ext.TRITON_VERSION, triton_interpret=_ext.INTERPRET,
                   fastdino=__version__, build=build_hash())
        _ENVIRONMENTS[key] = env
    return _ENVIRONMENTS[key]


def _entry_id(kind: str, op: str, signature: str, env: dict) -> str:
    text = json.dumps([kind, op, signature, env], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# -- the cache file ----------------------------------------------------------------------------------

_WARNED: set = set()


class TimingCache:
    """The entries of one cache file. `choices()`: those valid on this machine, by (module kind,
    op, signature); `ignored`: (entry, reason) for the others; `error`: why the file could not be
    read (it is then treated as empty, with one warning per process)."""

    def __init__(self, path: Optional[Path], entries: Optional[dict] = None, error: Optional[str] = None):
        # path None: entries held in memory (fastdino.bench's tuned variants); save() needs a path
        self.path, self.entries, self.error = path, entries or {}, error
        self.ignored: list[tuple[dict, str]] = []

    @classmethod
    def load(cls, cache: Union[None, str, os.PathLike] = None) -> "TimingCache":
        path = cache_file(cache)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            entries = data.get("entries") if isinstance(data, dict) else None
            version = data.get("format") if isinstance(data, dict) else None
            if isinstance(version, int) and version > FORMAT:
                raise NewerFormat(f"format {version} is newer than this fastdino's ({FORMAT}); upgrade "
                                  "fastdino or point FASTDINO_CACHE elsewhere")
            if not isinstance(entries, dict) or version != FORMAT:
                raise ValueError(f"not a fastdino timing cache of format {FORMAT}")
            return cls(path, data["entries"])
        except (OSError, ValueError, UnicodeDecodeError) as e:
            error = f"{type(e).__name__}: {e}"
            if str(path) not in _WARNED:
                _WARNED.add(str(path))
                warnings.warn(f"fastdino: timing cache {path} is unreadable and is ignored ({error})",
                              RuntimeWarning, stacklevel=2)
            return cls(path, error=error)

    def choices(self) -> dict:
        """{(module kind, op, signature): entry} for the entries whose machine is this one."""
        out, self.ignored = {}, []
        for entry in self.entries.values():
            why = malformed(entry) or foreign(entry)
            if why:
                self.ignored.append((entry, why))
            else:
                out[(entry["module"], entry["op"], entry["signature"])] = entry
        return out

    def explain(self) -> str:
        """Every entry: applied here, or ignored and why."""
        if self.error:
            return f"{self.path}: unreadable, ignored ({self.error})"
        if not self.entries:
            return f"{self.path}: no entries"
        choices = self.choices()
        lines = [f"{self.path}: {len(self.entries)} entries, {len(choices)} valid on this machine"]
        for (kind, op, sig), entry in choices.items():
            lines.append(f"  applies  {kind} {op} [{sig}] -> {entry['winner']}")
        for entry, why in self.ignored:
            what = (f"{entry.get('module')} {entry.get('op')} [{entry.get('signature')}]"
                    if isinstance(entry, dict) else repr(entry)[:80])
            lines.append(f"  ignored  {what}: {why}")
        return "\n".join(lines)

    def save(self, entries: dict):
        """Merge `entries` ({id: entry}) into the file, atomically, under a lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(self.path.name + ".lock")):
            current = TimingCache.load(self.path) if self.path.exists() else TimingCache(self.path)
            if current.error and current.error.startswith(NewerFormat.__name__):
                raise NewerFormat(f"{self.path}: not overwritten: {current.error}")
            merged = {**current.entries, **entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                os.chmod(tmp, _file_mode(self.path))  # mkstemp makes it 0600: a shared cache must be readable
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "entries": merged}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self.entries, self.error = merged, None


class NewerFormat(ValueError):
    """A timing cache written by a newer fastdino: read as empty, never overwritten."""


def _file_mode(path: Path) -> int:
    """The cache file's mode: the existing file's, else what the umask gives a new file."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive lock on `lock_path` (fcntl on POSIX, msvcrt on Windows) for the duration."""
    with open(lock_path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises OSError
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def malformed(entry) -> str:
    """Why `entry` is not a timing-cache entry this fastdino can apply ("" if it is)."""
    if not isinstance(entry, dict):
        return "malformed entry: not a JSON object"
    missing = [k for k in ("module", "op", "signature", "winner", "env") if k not in entry]
    if missing:
        return f"malformed entry: no {', '.join(missing)}"
    if not all(isinstance(entry[k], str) for k in ("module", "op", "signature", "winner")):
        return "malformed entry: module, op, signature and winner must be strings"
    if entry["winner"] not in ("original",) + tuple(b for b in BACKENDS if b != "ref"):
        return f"unknown winner {entry['winner']!r}"
    env = entry["env"]
    if not isinstance(env, dict) or env.get("device_type") not in ("cuda", "cpu"):
        return "malformed entry: env.device_type must be cuda or cpu"
    return ""


def foreign(entry: dict) -> str:
    """Why `entry` does not apply on this machine ("" if it does): the fields that differ."""
    env = entry["env"]
    device_type = env["device_type"]
    if device_type == "cuda" and not torch.cuda.is_available():
        return "tuned on a GPU; no GPU here"
    here = environment(torch.device(device_type))
    differ = [f"{k} {env.get(k)!r} (here {here.get(k)!r})" for k in here if env.get(k) != here.get(k)]
    return "measured elsewhere: " + ", ".join(differ) if differ else ""


# -- tune ----------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str  # "original" or a backend
    median_ms: Optional[float] = None
    rel_error: Optional[float] = None  # the worst over the checked layers, against the original
    rejected: Optional[str] = None  # why it cannot win: error above the bound, an exception


@dataclass
class Tuned:
    """One decision tuned: a module kind, an op and its argument signature."""

    module: str
    op: str
    signature: str
    layers: int  # modules of the model that share it
    winner: str
    candidates: list[Candidate]
    bound: float
    dtype: str = ""  # the op's first tensor's dtype (what the winner's self-check is for)

    def speedup(self) -> Optional[float]:
        times = {c.name: c.median_ms for c in self.candidates}
        best, orig = times.get(self.winner), times.get("original")
        return orig / best if best and orig else None


@dataclass
class TuneReport:
    tuned: list[Tuned] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # decisions not tuned, with the reason
    cache: Optional[str] = None  # the file written, if any
    seconds: float = 0.0
    entries: dict = field(default_factory=dict)  # the cache entries by id: TimingCache(None, entries)

    def summary(self) -> str:
        """The choices in one line: how many decisions went to which candidate."""
        counts: dict = {}
        for t in self.tuned:
            counts[t.winner] = counts.get(t.winner, 0) + 1
        return (f"{len(self.tuned)} decisions: " + ", ".join(f"{n} {w}" for w, n in sorted(counts.items()))
                if self.tuned else "nothing to tune")

    def __str__(self) -> str:
        lines = [f"fastdino.tune: {len(self.tuned)} decisions tuned in {self.seconds:.1f} s"
                 + (f", written to {self.cache}" if self.cache else "")]
        for t in self.tuned:
            cands = ", ".join(f"{c.name} rejected ({c.rejected})" if c.rejected is not None
                              else f"{c.name} {c.median_ms:.3f} ms" if c.median_ms is not None
                              else f"{c.name} (not timed)" for c in t.candidates)
            speed = t.speedup()
            gain = f" ({speed:.2f}x the original)" if speed and t.winner != "original" else ""
            lines.append(f"  {t.module} x{t.layers} {t.op} [{t.signature}]: {t.winner}{gain}; {cands}")
        lines += [f"  not tuned: {s}" for s in self.skipped]
        return "\n".join(lines)


class _Site:
    """Where a decision is made: the deciding module, the module to run to exercise it (the
    innermost fused module being called), that module's inputs and the autocast state it ran in
    (an enclosing module's autocast region does not come with a replay of the inner one)."""

    __slots__ = ("decider", "runner", "inputs", "key", "args", "also", "_autocast")

    def __init__(self, decider, runner, inputs, key, args, also, autocast):
        self.decider, self.runner, self.inputs = decider, runner, inputs
        self.key, self.args, self.also, self._autocast = key, args, also, autocast

    def autocast(self):
        device_type, dtype, enabled = self._autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _Tuning:
    """fused.common.TUNING while tune runs: records the decisions of a forward, and forces one."""

    UNFORCED = object()

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.stack: list = []  # (module, inputs, autocast state) of the fused modules being called
        self.recording = False
        self.groups: dict = {}  # (kind, op, key text) -> [_Site]
        self.forced: dict = {}  # (id(decider), op name, key) -> candidate
        self.hits = 0  # forced decisions reached since `forced` was set

    def decide(self, module, op: Op, key, args, also):
        if self.forced:
            forced = self.forced.get((id(module), op.name, key), self.UNFORCED)
            if forced is not self.UNFORCED:
                self.hits += 1
                return None if forced == "original" else forced
        if self.recording and self.stack:
            sites = self.groups.setdefault((common.kind(module), op, common.key_text(key)), [])
            if len(sites) < MAX_CHECKED and not any(s.decider is module and s.key == key for s in sites):
                runner, inputs, autocast = self.stack[-1]
                sites.append(_Site(module, runner, _clone(inputs), key, args, also, autocast))
        return self.UNFORCED

    def pre_hook(self, module, args, kwargs):
        dev = self.device_type
        self.stack.append((module, (args, kwargs),
                           (dev, torch.get_autocast_dtype(dev), common.autocast_on(dev))))

    def post_hook(self, module, args, kwargs, out):  # always_call: also when the forward raised
        while self.stack:
            if self.stack.pop()[0] is module:
                break


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone(memory_format=torch.preserve_format)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        return _tensors(out.to_tuple())
    return []


def cuda_event_timer(fn: Callable[[], Any]) -> float:
    """ms of one call of fn, by CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def wall_timer(fn: Callable[[], Any]) -> float:
    """ms of one call of fn, by the wall clock."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _call(module: nn.Module, inputs):
    args, kwargs = inputs
    return module(*args, **kwargs)


def _fused_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if common.is_fused(m)]


def tune(model: nn.Module, example_inputs, *, dtype: Optional[torch.dtype] = None, margin: float = 0.03,
         warmup: int = 3, rounds: int = 10, cache: Union[None, bool, str, os.PathLike] = None,
         timer: Optional[Callable[[Callable[[], Any]], float]] = None) -> TuneReport:
    """Measure, for each decision of the patched `model` on `example_inputs` (a tensor, a tuple of
    positional arguments or a dict of keyword arguments, on the model's device), the module's own
    code against every kernel backend that can run it, and keep the fastest correct one where it
    beats the original by more than `margin` (else the original). An unpatched model is patched
    first (fastdino.patch with its defaults). Modules patched with a pinned backend are not tuned.

    `dtype` runs the example under torch.autocast with that dtype (as a deployment that uses
    autocast does); None runs it as it is. `warmup` and `rounds`: untimed and timed calls per
    candidate, rounds interleaved between candidates. `cache`: None writes the results into the
    default timing cache, a path into that file (or directory), False writes nothing. `timer(fn)`
    returns the ms of one call (default: CUDA events on a GPU, the wall clock on a CPU).
    The model applies the results at once. Returns a TuneReport (print it).
    """
    from .patch import patch

    started = time.perf_counter()
    if not _fused_modules(model):
        patch(model, cache=False)
    fused = _fused_modules(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if timer is None:
        timer = cuda_event_timer if device.type == "cuda" else wall_timer
    report = TuneReport()
    state = _Tuning(device.type)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    handles = [h for m in fused for h in (m.register_forward_pre_hook(state.pre_hook, with_kwargs=True),
                                          m.register_forward_hook(state.post_hook, with_kwargs=True,
                                                                  always_call=True))]
    previous, common.TUNING = common.TUNING, state
    results: dict = {}
    done: set = set()
    try:
        # A decision can sit behind another (a ConvNeXt block's MLP runs fused only after its
        # depthwise conv does): record, tune what is new, apply it, and record again until a pass
        # finds nothing new.
        for _ in range(MAX_PASSES):
            state.groups = {}
            with torch.no_grad(), autocast:
                state.recording = True
                _call(model, _as_call_inputs(example_inputs))
                state.recording = False
                new = [(k, sites) for k, sites in state.groups.items() if k not in done]
                for (kind, op, text), sites in new:
                    done.add((kind, op, text))
                    pinned = sites[0].decider._fastdino_backend
                    if pinned is not None:
                        report.skipped.append(f"{kind} {op.name}: pinned to {pinned!r}")
                        continue
                    try:
                        report.tuned.append(_tune_group(state, kind, op, text, sites, model, margin, warmup,
                                                        rounds, timer, device))
                    except _Skip as e:
                        report.skipped.append(f"{kind} {op.name} [{text}]: {e}")
                    finally:
                        state.forced, state.stack = {}, []
            if not new:
                break
            _apply(model, report.tuned, device, results)
    finally:
        common.TUNING = previous
        for h in handles:
            h.remove()
    report.entries = results
    if cache is not False:
        store = TimingCache(cache_file(None if cache is True else cache))
        try:
            store.save(results)
            report.cache = str(store.path)
        except (OSError, NewerFormat) as e:  # the choices still apply to this model; only the file is not
            warnings.warn(f"fastdino.tune: timing cache {store.path} not written ({e})", RuntimeWarning,
                          stacklevel=2)
    report.seconds = time.perf_counter() - started
    return report


def _as_call_inputs(inputs) -> tuple:
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


class _Skip(Exception):
    """A decision that cannot be tuned (its original fails on replay, or a replay never reaches it)."""


def _error_text(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _tune_group(state: _Tuning, kind: str, op: Op, text: str, sites: list, model: nn.Module, margin: float,
                warmup: int, rounds: int, timer, device) -> Tuned:
    """One decision: every candidate checked on each site against the original, the correct ones
    timed on the first site. Raises _Skip where it cannot be tuned."""
    from .verify import REL_TOL

    first = sites[0]
    layers = sum(1 for m in model.modules() if common.is_fused(m) and common.kind(m) == kind)
    names = ["original"] + [b for b in _kernel_order(op, device)
                            if not op.runnable(b, *first.args, also=first.also)]
    candidates = {n: Candidate(n) for n in names}

    def forced(site, name):
        """The site's module run with the decision forced to `name`, in the autocast state it ran
        in; raises _Skip if the replay never reaches the decision (it went another way)."""
        state.forced, state.hits = {(id(site.decider), op.name, site.key): name}, 0
        with site.autocast():
            out = _call(site.runner, site.inputs)
        if not state.hits:
            raise _Skip(f"replaying {type(site.runner).__name__} does not reach this decision")
        return out

    # correctness on every checked layer, against the original on the same inputs
    bound = 0.0
    for site in sites:
        try:
            ref = [t.detach().clone() for t in _tensors(forced(site, "original"))]
        except _Skip:
            raise
        except Exception as e:  # noqa: BLE001 - the module's own code fails on its captured inputs
            raise _Skip(f"the original fails when replayed: {_error_text(e)}") from e
        dt = next((t.dtype for t in ref if t.is_floating_point()), torch.float32)
        tol = REL_TOL.get(dt, REL_TOL[torch.float32])
        bound = max(bound, tol)
        for name in names[1:]:
            c = candidates[name]
            if c.rejected is not None:
                continue
            try:
                err = rel_error(_tensors(forced(site, name)), ref)
            except Exception as e:  # noqa: BLE001 - a failing candidate is rejected with its error
                c.rejected = _error_text(e)
                continue
            c.rel_error = err if c.rel_error is None else max(c.rel_error, err)
            if not err <= tol:
                c.rejected = f"rel. error {err:.3g} > {tol:g}"
    candidates["original"].rel_error = 0.0
    timed = [n for n in names if candidates[n].rejected is None]
    times: dict = {n: [] for n in timed}
    if len(timed) > 1:
        for r in range(warmup + rounds):
            order = timed[r % len(timed):] + timed[:r % len(timed)]  # rotate: no candidate always first
            for name in order:
                ms = timer(lambda: forced(first, name))
                if r >= warmup:
                    times[name].append(ms)
    state.forced = {}
    for name in timed:
        if times.get(name):
            candidates[name].median_ms = statistics.median(times[name])
    winner = "original"
    if len(timed) > 1:
        orig = candidates["original"].median_ms
        best = min(timed[1:], key=lambda n: candidates[n].median_ms)
        if candidates[best].median_ms < orig * (1 - margin):
            winner = best
    dtype = str(first.args[0].dtype).replace("torch.", "")
    return Tuned(kind, op.name, text, layers, winner, list(candidates.values()), bound, dtype)


def _kernel_order(op: Op, device: torch.device) -> list[str]:
    """Kernel backends to try: the device's priority first, then the others."""
    order = [b for b in op.priority.get(device.type, ()) if b != "ref"]
    return order + [b for b in BACKENDS if b not in order and b != "ref"]


def _apply(model: nn.Module, tuned: list[Tuned], device: torch.device, results: dict):
    """Put the tuned choices into the table the model's fused modules read (shared with the cache's
    entries), forget their previous decisions; fill `results` with the cache entries."""
    fused = _fused_modules(model)
    table = next((m.__dict__.get("_fastdino_tuned") for m in fused if m.__dict__.get("_fastdino_tuned")
                  is not None), None)
    if table is None:
        table = {}
    env = environment(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for t in tuned:
        entry = {"module": t.module, "op": t.op, "signature": t.signature, "env": env, "winner": t.winner,
                 "dtype": t.dtype,
                 "layers": t.layers, "bound": t.bound, "tuned": stamp,
                 "candidates": {c.name: {"median_ms": c.median_ms, "rel_error": c.rel_error,
                                         "rejected": c.rejected} for c in t.candidates}}
        table[(t.module, t.op, t.signature)] = entry
        results[_entry_id(t.module, t.op, t.signature, env)] = entry
    for m in fused:
        m._fastdino_tuned = table
        m.__dict__.pop("_fastdino_decisions", None)
