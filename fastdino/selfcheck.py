"""The first-use self-check: before a kernel backend runs an op for the first time in a process on a
device type and dtype, it runs a small fixed problem (the op's `sample`, random tensors from a fixed
seed) and is compared with the op's reference. A backend that raises or misses the bound is
disabled for that (op, backend, device type, dtype) for the rest of the process, with one warning;
dispatch then falls back to the next backend (a pinned one to the reference / the model's own
code). A kernel that compiles but computes garbage on an unusual GPU, driver or Triton is caught
here instead of being used silently.

Cost: one sample problem per (op, backend, device type, dtype), once per process (the first call
also compiles or loads the kernel, which it would do anyway); `fastdino info` lists the results.
"""

import time
import warnings
from typing import Optional

import torch

# Relative error bound of a kernel against the reference on the sample (norm of the difference over
# the norm of the reference): a rounding-level error passes, a wrong kernel (error ~1) does not.
BOUND = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}

PASSED: set = set()  # (op name, backend, device type, dtype) that passed
RESULTS: dict = {}  # (op name, backend, device type, dtype) -> (error text or None, measured rel. error, ms)


def reasons(op, backend: str, device, dtype: torch.dtype) -> list[str]:
    """[] if `backend` passed (or now passes) its self-check for op on this device type and dtype;
    else why not, the same every time (the check runs once per process)."""
    key = (op.name, backend, device.type, dtype)
    if key in PASSED:
        return []
    if device.type == "cuda" and not torch.cuda.is_available():
        return []  # a table about a GPU this machine lacks (fastdino info): nothing can run there
    if torch.compiler.is_compiling():
        # Inside a torch.compile trace nothing can run: the eager result where there is one, else
        # the backend is not used in this graph (fastdino.patch checks ahead what it can foresee).
        if key not in RESULTS:
            return ["not self-checked before torch.compile traced it (run the model once before compiling)"]
        error = RESULTS[key][0]
        return [] if error is None else [f"failed its self-check: {error}"]
    if key not in RESULTS:
        RESULTS[key] = _check(op, backend, device, dtype)
        error = RESULTS[key][0]
        if error is None:
            PASSED.add(key)
            op.passed_selfcheck(backend, device, dtype)
        else:
            dt = str(dtype).replace("torch.", "")
            warnings.warn(f"fastdino: {op.name} on backend {backend!r} ({device.type}, {dt}) failed its "
                          f"self-check and is disabled in this process: {error}", RuntimeWarning,
                          stacklevel=2)
    error = RESULTS[key][0]
    return [] if error is None else [f"failed its self-check: {error}"]


def _check(op, backend: str, device, dtype: torch.dtype) -> tuple[Optional[str], Optional[float], float]:
    start = time.perf_counter()
    if op.sample is None:
        return None, None, 0.0
    try:
        err = 0.0
        with torch.no_grad():
            problems = op.sample(device, dtype)
            # a list: one problem per form of the op, each run where the backend takes it
            for args in problems if isinstance(problems, list) else [problems]:
                if isinstance(problems, list) and op.reasons(backend, *args):
                    continue
                out = op.launch(backend, *args)
                ref = op.launch("ref", *args)  # same inputs: some ops read a threshold in the inputs' dtype
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                err = max(err, rel_error(out, ref))
    except Exception as e:  # noqa: BLE001 - any failure disables the backend, with its reason
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}", None, (time.perf_counter() - start) * 1e3
    ms = (time.perf_counter() - start) * 1e3
    bound = BOUND.get(dtype, BOUND[torch.float32])
    if not err <= bound:  # NaN fails too
        return f"relative error {err:.3g} against the reference > {bound:g} on its sample problem", err, ms
    return None, err, ms


def rel_error(out, ref) -> float:
    """The worst ||out - ref|| / ||ref|| over the outputs; inf where they differ in anything else
    (integer values, where NaN or Inf stand). Equal values (infinities included) count as 0. A
    tensor stands for a one-output tuple."""
    out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    ref = (ref,) if isinstance(ref, torch.Tensor) else tuple(ref)
    if len(out) != len(ref):
        raise ValueError(f"{len(out)} outputs, the original gives {len(ref)}")
    worst = 0.0
    for o, r in zip(out, ref):
        if o.shape != r.shape:
            raise ValueError(f"output of shape {tuple(o.shape)}, the original's {tuple(r.shape)}")
        if not r.is_floating_point():
            if not torch.equal(o, r):
                return float("inf")
            continue
        o64, r64 = o.double(), r.double()
        if not torch.equal(torch.isnan(o64), torch.isnan(r64)):
            return float("inf")
        finite = torch.isfinite(r64)
        if not torch.equal(o64[~finite & ~torch.isnan(r64)], r64[~finite & ~torch.isnan(r64)]):
            return float("inf")  # an infinity where the original has another value
        diff = (o64[finite] - r64[finite]).norm().item()
        norm = r64[finite].norm().item()
        if diff != diff or diff == float("inf"):
            return float("inf")
        worst = max(worst, diff / norm if norm else diff)
    return worst


def table() -> list[tuple[str, str, str, str, str]]:
    """(op, backend, device type, dtype, result) for every self-check run in this process."""
    rows = []
    for (op, backend, device, dtype), (error, err, ms) in sorted(RESULTS.items(), key=str):
        result = (f"passed (rel. error {err:.1e}, {ms:.1f} ms)" if error is None and err is not None
                  else "passed (no sample problem)" if error is None else f"DISABLED: {error}")
        rows.append((op, backend, device, str(dtype).replace("torch.", ""), result))
    return rows


def check_ahead(wanted, device) -> None:
    """Run now, eagerly, the self-checks of `wanted` ((op, backend, dtype) triples) that can run on
    `device`: fastdino.patch calls it so that a model compiled right after patching finds them done."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return
    for op, backend, dtype in wanted:
        if backend != "ref" and not op.reasons(backend, *op.example(device, dtype)):
            reasons(op, backend, device, dtype)


def run_all(device, dtype: torch.dtype) -> list[tuple[str, str, str, str, str]]:
    """Self-check every op's kernel backends that can run on `device`/`dtype` (their build and
    device allow it) now; returns `table()`."""
    from .ops import OPS

    device = torch.device(device)
    for op in OPS.values():
        for backend in op.priority.get(device.type, ()) + ("cuda", "triton", "cpu"):
            if backend != "ref" and not op.reasons(backend, *op.example(device, dtype)):
                reasons(op, backend, device, dtype)
    return table()
