"""torch.compile(fullgraph=True) of patched models, one per family: Dynamo's count of graph breaks
is zero, one graph, and the compiled model gives the patched eager outputs. Pinned to the device's
C++ kernels, so that fastdino's ops are what gets traced (unpinned, CPU tensors run the models' own
code)."""

import pytest
import torch
from helpers import DEVICE
from models import TRUST
from test_export import BACKEND, FAMILIES, _tensors

import fastdino
from fastdino import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs fastdino._C (its C++ kernels)")


@pytest.mark.parametrize("name", FAMILIES)
def test_a_patched_model_compiles_fullgraph_without_graph_breaks(name):
    build, ops = FAMILIES[name]
    model, arg, shape = build()
    model.to(DEVICE)
    fastdino.patch(model, backend=BACKEND, cache=False, trust=TRUST)
    x = {arg: torch.randn(2, *shape, device=DEVICE)}
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**x)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
        traced = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert {f"fastdino.{op}" for op in ops} <= traced, sorted(t for t in traced if "fastdino" in t)
        want = _tensors(model(**x))
        got = _tensors(torch.compile(model, fullgraph=True, backend="aot_eager")(**x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
