"""torch.export of patched models: fastdino's ops stay single graph nodes (torch.ops.fastdino.*),
the batch dimension stays dynamic, and the exported program gives the patched model's outputs, at
the traced batch size and at another one. Pinned to the C++ CPU kernels (the ops' fake kernels
describe their outputs to the tracer); on a GPU, to the CUDA kernels."""

import pytest
import torch
from helpers import DEVICE
from models import TRUST
from test_patch import hf_vit, official_vit
from test_patch_masked_attention import hf_mask2former

import fastdino
from fastdino import _ext
from fastdino.deploy import Outputs, named_outputs

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs fastdino._C (its C++ kernels)")
BACKEND = DEVICE.type  # the C++ kernels of the device: "cpu", or "cuda" on a GPU


def _convnext_linear():
    from fastdino.bench.models import ConvNeXtLinear

    torch.manual_seed(0)
    return ConvNeXtLinear("t").eval(), "pixel_values", (3, 64, 64)


def _eomt():
    from test_patch_eomt import eomt

    model, _ = eomt()
    model.attn_mask_probs.copy_(torch.tensor([1.0, 0.0]))  # block 1 predicts a mask, kept after
    return model, "pixel_values", (3, 128, 128)


FAMILIES = {
    "hf-vit": (lambda: (hf_vit(), "pixel_values", (3, 64, 48)),
               {"add_layer_norm", "fused_linear", "rope_attention"}),
    "official-vit": (lambda: (official_vit(embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4), "x",
                              (3, 64, 48)),
                     {"add_layer_norm", "fused_linear", "rope_attention"}),
    "convnext-linear": (_convnext_linear, {"dwconv_layer_norm", "fused_linear"}),
    "hf-mask2former-dinov3": (lambda: (hf_mask2former("dinov3")[0], "pixel_values", (3, 96, 64)),
                              {"add_layer_norm", "fused_linear", "masked_attention", "ms_deform_attn"}),
    "hf-eomt-dinov3": (_eomt, {"add_layer_norm", "fused_linear", "rope_attention"}),
}


def _tensors(out):
    return list(named_outputs(out).values())


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_patched_model_exports_with_its_ops_as_nodes_and_a_dynamic_batch(name, strict):
    build, ops = FAMILIES[name]
    model, arg, shape = build()
    model.to(DEVICE)
    fastdino.patch(model, backend=BACKEND, cache=False, trust=TRUST)
    inputs = {arg: torch.randn(2, *shape, device=DEVICE)}
    with torch.no_grad():
        program = torch.export.export(model, (), inputs, strict=strict,
                                      dynamic_shapes={arg: {0: torch.export.Dim("batch", min=1, max=64)}})
    nodes = {str(n.target) for n in program.graph.nodes}
    assert {f"fastdino.{op}.default" for op in ops} <= nodes, sorted(n for n in nodes if "fastdino" in n)
    for batch in (2, 3):
        x = {arg: torch.randn(batch, *shape, device=DEVICE)}
        with torch.no_grad():
            want, got = _tensors(model(**x)), _tensors(program.module()(**x))
        assert len(got) == len(want) and got[0].shape[0] == batch
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


_LOAD = """
import sys, torch, fastdino  # fastdino registers the ops the package calls; nothing else is imported
runner = torch._inductor.aoti_load_package(sys.argv[1])
x, want = torch.load(sys.argv[2])
got = runner(x)
assert len(got) == len(want), (len(got), len(want))
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
print("ok", tuple(runner(x[:1])[0].shape))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_an_aoti_package_of_a_patched_model_runs_in_a_fresh_process(name, tmp_path):
    """AOTInductor compiles the exported patched model (its fastdino ops called through their
    registered schemas) into a package that a process importing only fastdino loads and runs, at
    the exported batch size and at batch 1."""
    import subprocess
    import sys

    build, _ = FAMILIES[name]
    model, _, shape = build()
    model = Outputs(model).to(DEVICE)  # what `fastdino export` packages: the output tensors as a tuple
    fastdino.patch(model, backend=BACKEND, cache=False, trust=TRUST)
    x = torch.randn(2, *shape, device=DEVICE)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save((x, want), tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", _LOAD, package, str(tmp_path / "io.pt")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"ok {(1, *want[0].shape[1:])}"), done.stdout
