"""`fastdino.cuda_graph(model)`: replay a model's forward from CUDA graphs, one per input shape.

At batch 1 a DINOv3 segmentor launches thousands of small kernels and the CPU, not the GPU, sets
the pace; replaying a captured graph launches them all at once. The wrapper captures a graph the
first time it sees an input signature (the shapes, dtypes and devices of the tensor arguments and
the values of the others), after a few warm-up calls on a side stream, and replays it afterwards.
Inputs are copied into the graph's static input tensors on each call; the outputs are the graph's
static output tensors, overwritten by the next replay of the same graph (clone what you keep).

Inference only: capture and replay run under torch.no_grad(). A model that synchronises with the
host during its forward (.item(), .tolist(), .cpu(), data-dependent shapes such as boolean
indexing), or takes CPU tensors, cannot be captured: GraphCaptureError says which and why.
"""

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn


class GraphCaptureError(RuntimeError):
    """The model cannot be replayed from a CUDA graph (the message says why)."""


def _tensors(value: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """(name, tensor) of every tensor in nested tuples, lists and dicts, in a fixed order."""
    if isinstance(value, Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
    elif isinstance(value, (tuple, list)):
        items = list(enumerate(value))
    else:
        return []
    return [t for k, v in items for t in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def _signature(value: Any) -> Any:
    """What selects a graph: tensors by (shape, dtype, device), everything else by value."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return ("dict", tuple((k, _signature(v)) for k, v in items))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    return ("value", value)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[Tensor]  # the static inputs, in _tensors order
    output: Any


class CUDAGraphModel:
    """`model` replayed from CUDA graphs (see the module docstring). Call it as the model;
    `graphs` is the number of captured input signatures."""

    def __init__(self, model: Callable, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"cuda_graph: warmup must be >= 1 (kernels are compiled and tuned before "
                             f"capture), got {warmup}")
        self.model, self.warmup = model, warmup
        self._graphs: dict = {}
        self._pool = None

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, *args, **kwargs):
        key = _signature((args, kwargs))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args, kwargs)
        with torch.no_grad():
            for static, t in zip(entry.inputs, (t for _, t in _tensors((args, kwargs)))):
                static.copy_(t)
        entry.graph.replay()
        return entry.output

    def _capture(self, args, kwargs) -> _Graph:
        named = _tensors((args, kwargs))
        off_gpu = [f"{name} on {t.device}" for name, t in named if t.device.type != "cuda"]
        if off_gpu or not named:
            got = f"got {', '.join(off_gpu)}" if off_gpu else "the call has no tensor input"
            raise GraphCaptureError(f"cuda_graph: CUDA graphs replay CUDA tensors only; {got}")
        static = [t.detach().clone() for _, t in named]
        it = iter(static)
        static_args, static_kwargs = _rebuild((args, kwargs), it)
        name = type(self.model).__name__
        stream = torch.cuda.Stream(device=static[0].device)
        stream.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.no_grad(), torch.cuda.stream(stream):
            try:
                for _ in range(self.warmup):  # Triton autotuning, cuBLAS handles, lazy init
                    self.model(*static_args, **static_kwargs)
            except Exception as e:  # the model itself fails on these inputs: not a capture problem
                raise GraphCaptureError(f"cuda_graph: {name} fails on these inputs before capture: "
                                        f"{type(e).__name__}: {e}") from e
        torch.cuda.current_stream(static[0].device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
                output = self.model(*static_args, **static_kwargs)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphCaptureError(
                f"cuda_graph: {name} cannot be captured: {first}. A forward that synchronises with the host "
                "(.item(), .tolist(), .cpu(), printing a tensor, data-dependent shapes such as boolean "
                "indexing) cannot run inside a CUDA graph") from e
        return _Graph(graph, static, output)


def _rebuild(value: Any, tensors):
    """`value` with each tensor replaced by the next of `tensors` (the order of _tensors)."""
    if isinstance(value, Tensor):
        return next(tensors)
    if isinstance(value, dict):
        keys = sorted(value, key=str)
        rebuilt = {k: _rebuild(value[k], tensors) for k in keys}
        return {k: rebuilt[k] for k in value}
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


def cuda_graph(model: nn.Module, warmup: int = 3) -> CUDAGraphModel:
    """`model` (patched or not) replayed from CUDA graphs, one per input signature: call the result
    as the model. Static shapes: a new input shape captures a new graph (warm-up + capture, about as
    long as a few forwards). Outputs are overwritten by the next call with the same shapes: clone
    what you keep. Raises GraphCaptureError, with the reason, for a model that cannot be captured."""
    return CUDAGraphModel(model, warmup)
