"""fastdino bench and fastdino.bench.run on the CPU (the smoke size: speed needs a GPU), and the
CUDA-graph helper's checks."""

import json
import re

import pytest
import torch
from torch import nn

import fastdino
from fastdino.__main__ import main
from fastdino.bench import _exclusive, run
from fastdino.bench.models import MODELS, build

pytest.importorskip("transformers")


def test_bench_command_smoke(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(["bench", "--device", "cpu", "--models", "convnext-t+linear", "--resolution", "64", "--iters",
               "1", "--no-progress", "--json", str(out), "--md", str(md)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "speed figures need one" in printed and "timed: from the pixel tensor" in printed
    data = json.loads(out.read_text())
    assert {"torch", "commit", "cuda_runtime"} <= set(data["machine"]) and "fastdino-bf16" in data["variants"]
    (result,) = data["results"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"original", "fastdino", "fastdino-tuned"}
    assert not any(r["error"] for r in rows.values())
    for variant in ("fastdino", "fastdino-tuned"):
        assert rows[variant]["max_rel_err"] < 1e-4 and rows[variant]["min_agreement"] > 0.99
    assert re.match(r"\d+ decisions: ", rows["fastdino-tuned"]["tuned"])
    assert set(rows["original"]["breakdown_ms"]) == {"backbone", "head", "other"}
    assert md.read_text().count("| convnext-t+linear |") == 3


def test_tune_command_writes_the_cache(tmp_path, capsys):
    cache = tmp_path / "cache.json"
    rc = main(["tune", "convnext-t+linear", "--device", "cpu", "--resolution", "64", "--dtype", "float32",
               "--rounds", "1", "--warmup", "0", "--cache", str(cache), "--explain"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    entries = json.loads(cache.read_text())["entries"].values()
    # fused_linear is decided in a block only where its depthwise conv runs fused (a second pass)
    assert "dwconv_layer_norm" in {e["op"] for e in entries}
    assert {e["module"] for e in entries} == {"DINOv3ConvNextLayer"} and all(e["winner"] for e in entries)
    assert "fastdino.tune:" in printed and "applies  DINOv3ConvNextLayer dwconv_layer_norm" in printed


@pytest.mark.quick
def test_unknown_names_are_refused(capsys):
    assert main(["bench", "--device", "cpu", "--models", "vit-huge"]) == 2
    assert main(["bench", "--device", "cpu", "--variants", "fastest"]) == 2
    err = capsys.readouterr().err
    assert "unknown models ['vit-huge']" in err and "unknown variants ['fastest']" in err
    with pytest.raises(ValueError, match="unknown variants"):
        run(nn.Linear(2, 2), torch.randn(1, 2), variants=["fastest"])


def test_official_models_need_a_checkout():
    with pytest.raises(ValueError, match="--dinov3-repo PATH"):
        build("official-m2f-vits16-h384", 64, 1, "cpu")
    assert all(MODELS[n].needs_repo for n in MODELS if n.startswith("official"))


class Tiny(nn.Module):
    """A stem and a head around a block that holds a nested part."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_run_api_on_any_model_with_a_breakdown():
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variants = ["original", "original-bf16", "fastdino", "fastdino-bf16"]
    result = run(model, torch.randn(4, 8), variants=variants, iters=2, warmup=1, breakdown_iters=1,
                 name="tiny", components={"stem": ["stem"], "block": ["block"], "inner": ["block.2"]})
    assert result.batch == 4 and [r.variant for r in result.rows] == variants
    for row in result.rows:
        assert row.error is None and row.median_ms > 0 and row.images_per_s > 0
        assert set(row.breakdown_ms) == {"stem", "block", "inner", "other"}
        assert all(ms >= 0 for ms in row.breakdown_ms.values())  # block's time excludes inner's
        assert sum(row.breakdown_ms.values()) == pytest.approx(row.median_ms)  # shares of the latency
    assert result.row("original").max_rel_err == 0.0
    assert 0 < result.row("fastdino-bf16").max_rel_err < 3e-2  # bf16 weights and inputs
    # the bf16 variants ran on bf16 copies of the tensors: the model has exactly its fp32 weights again
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


def test_nested_parts_are_timed_without_their_inner_parts():
    inclusive = {("adapter", "seg.0"): 10.0, ("backbone", "seg.0.backbone"): 6.0,
                 ("blocks", "seg.0.backbone.blocks.0"): 4.0, ("head", "seg.1"): 3.0}
    assert _exclusive(inclusive) == {"adapter": 4.0, "backbone": 2.0, "blocks": 4.0, "head": 3.0}


@pytest.mark.quick
def test_cuda_graph_says_why_it_cannot_capture():
    graphed = fastdino.cuda_graph(Tiny())
    with pytest.raises(fastdino.GraphCaptureError, match=r"CUDA tensors only; got 0\.0 on cpu"):
        graphed(torch.randn(2, 8))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        fastdino.cuda_graph(Tiny(), warmup=0)


def test_cuda_graph_keys_on_shapes_and_values():
    from fastdino.graph import _rebuild, _signature, _tensors

    a, b = torch.randn(2, 8), torch.randn(3, 8)
    assert _signature(((a,), {"k": 1})) != _signature(((b,), {"k": 1}))
    assert _signature(((a,), {"k": 1})) != _signature(((a,), {"k": 2}))
    assert _signature(((a,), {})) == _signature(((a.clone(),), {}))
    value = ((a, 3), {"z": b, "m": [a]})
    names = [n for n, _ in _tensors(value)]
    assert names == ["0.0", "1.m.0", "1.z"]
    rebuilt = _rebuild(value, iter([t * 0 for _, t in _tensors(value)]))
    assert list(rebuilt[1]) == ["z", "m"] and rebuilt[0][1] == 3 and not rebuilt[1]["z"].any()


@pytest.mark.quick
def test_star_paths_expand_to_the_called_children():
    from fastdino.bench import expand

    model = nn.Module()
    model.enc = nn.Module()
    model.enc.stem = nn.Linear(2, 2)
    model.enc.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Sequential(nn.ReLU())])
    assert expand(model, "enc") == ["enc"]
    assert expand(model, "enc.*") == ["enc.stem", "enc.blocks.0", "enc.blocks.1.0"]
