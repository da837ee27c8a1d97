"""fastdino segment: 20 images of random sizes (PNG and JPEG) and one corrupt file, labelled by a
patched ConvNeXt-T + linear head at 64 px in one process, by 2 torchrun ranks (gloo) and by a Ray
Data pipeline with 2 actors on a local cluster: the same class maps everywhere, equal to the
patched model's own, the corrupt file reported with its error while the rest complete. And
`fastdino export` of the same model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdino
from fastdino.__main__ import main
from fastdino.deploy import class_map, load_model, named_outputs

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("pyarrow")
pytest.importorskip("transformers")

MODEL, RESOLUTION = "convnext-t+linear", 64


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(20):
        h, w = (int(v) for v in rng.integers(37, 97, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"im{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _segment(images, out, *extra, launcher=()):
    cmd = [*launcher, "-m", "fastdino", "segment", MODEL, str(images), "--out", str(out),
           "--resolution", str(RESOLUTION), "--batch", "3", "--device", "cpu", *extra]
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def _masks(out):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").iterdir())}


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return _segment(images, out), _masks(out), out


def test_one_process_labels_every_readable_image_and_reports_the_corrupt_one(images, single):
    import pyarrow.parquet as pq

    summary, masks, out = single
    assert (summary["images"], summary["ok"], summary["failed"]) == (21, 20, 1)
    (failure,) = summary["failures"]
    assert failure["path"].endswith("corrupt.jpg") and "cannot identify" in failure["error"]
    rows = {r["path"]: r for r in pq.read_table(out / "results").to_pylist()}
    assert len(rows) == 21 and len(masks) == 20
    for path, row in rows.items():
        if row["ok"]:
            with Image.open(path) as im:
                assert (row["width"], row["height"]) == im.size
            assert masks[os.path.basename(row["output"])].shape == (row["height"], row["width"])
        else:
            assert row["output"] == "" and row["error"]


def test_the_masks_are_the_patched_models_class_maps(images, single):
    """The pipeline's preprocessing + the patched model + nearest resize, redone by hand."""
    from fastdino.distributed import output_name, preprocess

    _, masks, _ = single
    model = load_model(MODEL, RESOLUTION, "cpu")
    fastdino.patch(model)
    paths = sorted(str(p) for p in images.iterdir() if p.name != "corrupt.jpg")[:4]
    batch = preprocess({"path": paths}, RESOLUTION)
    with torch.inference_mode():
        maps = class_map(named_outputs(model(torch.from_numpy(batch["pixels"]))))
    assert len(np.unique(maps.numpy())) > 3  # maps with several classes: a comparison that can fail
    for path, m, h, w in zip(paths, maps, batch["height"], batch["width"]):
        want = torch.nn.functional.interpolate(m[None, None].float(), size=(int(h), int(w)), mode="nearest")
        want = want[0, 0]
        np.testing.assert_array_equal(masks[output_name(path) + ".png"], want.numpy().astype(np.uint8))


def test_two_torchrun_ranks_give_the_single_process_masks(images, single, tmp_path):
    summary = _segment(images, tmp_path, launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2"))
    assert (summary["images"], summary["ok"], summary["failed"]) == (21, 20, 1)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["part-0.parquet", "part-1.parquet"]
    got, want = _masks(tmp_path), single[1]
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_ray_pipeline_with_two_actors_gives_the_single_process_masks(images, single, tmp_path):
    pytest.importorskip("ray")
    summary = _segment(images, tmp_path, "--ray", "--concurrency", "2")
    assert (summary["images"], summary["ok"], summary["failed"]) == (21, 20, 1)
    assert summary["failures"][0]["path"].endswith("corrupt.jpg")
    got, want = _masks(tmp_path), single[1]
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_backbone_gives_features(images, tmp_path):
    from fastdino.distributed import Segmenter, preprocess

    seg = Segmenter("vits16", str(tmp_path), resolution=32, device="cpu")
    paths = sorted(str(p) for p in images.iterdir())[:4]  # corrupt.jpg first
    rows = seg(preprocess({"path": paths}, 32))
    assert rows["ok"].tolist() == [False, True, True, True] and rows["output"][0] == ""
    feats = [np.load(tmp_path / name) for name in rows["output"][1:]]
    assert all(f.shape == (384,) for f in feats) and not np.allclose(feats[0], feats[1])


def test_export_writes_a_program_with_a_dynamic_batch(tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert main(["export", MODEL, "--out", str(out), "--format", "program", "--resolution", str(RESOLUTION),
                 "--device", "cpu", "--backend", "cpu"]) == 0
    assert "outputs, in order: output" in capsys.readouterr().out
    program = torch.export.load(str(out))
    assert any("fastdino" in str(n.target) for n in program.graph.nodes)
    model = load_model(MODEL, RESOLUTION, "cpu")
    fastdino.patch(model, backend="cpu")
    x = torch.randn(3, 3, RESOLUTION, RESOLUTION)
    with torch.no_grad():
        (got,) = program.module()(x)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)


def test_export_of_an_unknown_model_is_refused_with_the_forms_it_takes(capsys):
    assert main(["export", "no-such-model", "--out", "x.pt2"]) == 2
    assert "package.module:function" in capsys.readouterr().err
