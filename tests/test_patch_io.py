"""A patched model in a user's hands: torch.save / torch.load, pickle and copy.deepcopy give back a
patched model with a working forward (in a fresh process too), and patch on a patched model
applies the new options and says what changed."""

import copy
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, op_args, op_runs
from models import patch_trusted
from test_patch import hf_vit, official_vit
from test_patch_deformable import official_decoder as official_pixel_encoder
from test_patch_masked_attention import hf_mask2former
from test_patch_masked_attention import official_decoder as official_mask2former_decoder
from test_verify_precision import official_pixel_decoder, run_decoder

import fastdino
from fastdino import _ext
from fastdino.fused.common import is_fused
from fastdino.ops import OPS
from fastdino.patch import _FUSED_CLASSES

PINNED = DEVICE.type if _ext.BUILD[DEVICE.type] else "triton"


def models():
    def hf():
        model = hf_vit().to(DEVICE)
        pixels = torch.randn(1, 3, 64, 64, device=DEVICE)
        return model, lambda m: m(pixel_values=pixels).last_hidden_state

    def official():
        model = official_vit(embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4).to(DEVICE)
        pixels = torch.randn(1, 3, 64, 64, device=DEVICE)
        return model, lambda m: m.forward_features(pixels)["x_norm_patchtokens"]

    def pixel_encoder():
        model, _ = official_pixel_encoder()
        shapes = torch.tensor([[8, 6], [4, 3], [2, 2]], device=DEVICE)
        starts = torch.tensor([0, 48, 60], device=DEVICE)
        src, pos = torch.randn(2, 64, 64, device=DEVICE), torch.randn(2, 64, 64, device=DEVICE)
        return model, lambda m: m(src, pos, shapes, starts)

    def m2f_decoder():
        model, _ = official_mask2former_decoder()
        x = [torch.randn(2, 32, h, w, device=DEVICE) for h, w in ((3, 2), (6, 4), (12, 8))]
        features = torch.randn(2, 32, 24, 16, device=DEVICE)
        return model, lambda m: m(x, features)["pred_masks"]

    def hf_m2f():
        model, _ = hf_mask2former()
        pixels = torch.randn(1, 3, 96, 64, device=DEVICE)
        return model, lambda m: m(pixel_values=pixels).masks_queries_logits

    return {"hf-vit": hf, "official-vit": official, "official-pixel-encoder": pixel_encoder,
            "official-m2f-decoder": m2f_decoder, "hf-mask2former": hf_m2f}


MODELS = models()


def fused_classes(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if is_fused(m)}


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
@pytest.mark.parametrize("name", MODELS)
def test_patched_model_saves_and_loads_back_patched(name, how, tmp_path):
    model, run = MODELS[name]()
    if name == "hf-mask2former" and how != "deepcopy":
        try:
            pickle.dumps(model)
        except AttributeError as e:  # transformers 5.x: a local output hook
            assert "Can't pickle local object" in str(e)
            pytest.skip("transformers' Mask2Former does not pickle, patched or not (a local output hook)")
    patch_trusted(model, backend=PINNED)
    with torch.no_grad():
        expected = run(model)
    swapped = fused_classes(model)
    assert swapped
    if how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        _FUSED_CLASSES.clear()  # as in a fresh process: the fused classes are made again on load
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        loaded = copy.deepcopy(model)
    assert fused_classes(loaded) == swapped
    assert all(m._fastdino_backend == PINNED for m in loaded.modules() if is_fused(m))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad(), op_runs(*OPS) as calls:
        out = run(loaded)
    assert sum(c.call_count for c in calls.values()) > 0  # the kernels ran, not only the originals
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert fastdino.unpatch(loaded) == len(swapped) and not fused_classes(loaded)


def test_a_saved_patched_model_loads_in_a_fresh_process(tmp_path):
    model = hf_vit()
    patch_trusted(model, backend=PINNED if DEVICE.type == "cpu" else None)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    torch.save({"model": model, "pixels": pixels, "expected": expected}, tmp_path / "saved.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "m = saved['model']\n"
        "assert any(hasattr(type(x), '_fastdino_original_class') for x in m.modules())\n"
        "with torch.no_grad():\n"
        "    out = m(pixel_values=saved['pixels']).last_hidden_state\n"
        "torch.testing.assert_close(out, saved['expected'], atol=1e-5, rtol=1e-5)\n"
        "print('loaded patched')\n"
    )
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved.pt")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and "loaded patched" in result.stdout, result.stderr[-2000:]


def test_patch_again_applies_the_new_backend_and_reports_it():
    model, run = MODELS["hf-vit"]()
    first = patch_trusted(model)
    second = patch_trusted(model, backend=PINNED)
    assert not second.swapped and len(second.changed) == len(first.swapped)
    assert all(c.change == f"backend None -> {PINNED!r}" for c in second.changed)
    text = str(second)
    assert f"{len(second.changed)} changed" in text and f"changed: backend None -> {PINNED!r}" in text
    # transformers 5.x keeps the layers at model.layer, 4.x at layer
    assert re.search(rf"changed  (model\.)?layer\.0: backend None -> {PINNED!r}", second.details())
    with torch.no_grad(), op_runs("rope_attention") as calls:
        run(model)
    backends = {op_args("rope_attention", c)["backend"] for c in calls["rope_attention"].call_args_list}
    assert backends == {PINNED}
    third = patch_trusted(model, backend=PINNED)
    assert not third.changed and len(third.already_patched) == len(first.swapped)
    assert f"{len(first.swapped)} already patched" in str(third)


def test_patch_again_with_another_precision_swaps_and_restores_its_regions():
    model, features = official_pixel_decoder()
    ref, _ = run_decoder(model, features)
    patch_trusted(model)
    assert type(model).__name__ == "MSDeformAttnPixelDecoder"  # the fp32 region is left as it is
    report = patch_trusted(model, precision="bf16")
    assert [s.fused for s in report.swapped] == ["Bf16MSDeformAttnPixelDecoder"]
    assert report.changed and all("precision None -> 'bf16'" in c.change for c in report.changed)
    assert run_decoder(model, features)[0].dtype == torch.float32
    back = patch_trusted(model, precision=None)
    assert type(model).__name__ == "MSDeformAttnPixelDecoder"
    assert any(c.path == "" and "original forward again" in c.change for c in back.changed)
    torch.testing.assert_close(run_decoder(model, features)[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,dtype", [("cpu", "float32"), ("cuda", "bfloat16"), ("cuda", "float16")])
def test_info_reports_the_backends_for_a_device_and_dtype(device, dtype, capsys):
    from fastdino.__main__ import main

    assert main(["info", "--device", device, "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert f"backends on {device}, {dtype}:" in out
    table = out.split(f"backends on {device}, {dtype}:")[1].split("\n\n")[0]
    rows = [line.split() for line in table.strip().splitlines()]
    assert {r[0] for r in rows} == set(OPS) and all(len(r) >= 3 for r in rows)
    assert sum(r[2] == "selected" for r in rows) == len(OPS)  # one backend per op
    if device == "cpu":  # a kernel for CUDA tensors cannot run CPU tensors, whatever the build
        assert all("device=cpu (needs cuda)" in " ".join(r[2:]) for r in rows if r[1] == "cuda")
    checks = out.split(f"self-check on {device}, {dtype}")[1].split("\n\n")[0]
    if device == "cpu" and _ext.HAS_EXT:  # the C++ CPU kernels are checked at once
        assert all(re.search(rf"{name}\s+cpu\s+passed", checks) for name in OPS), checks
    elif device == "cuda" and not torch.cuda.is_available():
        assert "not run: no GPU here" in checks
    assert "timing cache: " in out
    with pytest.raises(SystemExit):
        main(["info", "--dtype", "float64"])


def test_a_model_with_nothing_to_patch_is_told_what_fastdino_looks_for():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    report = patch_trusted(model)
    text = str(report)
    assert not report.swapped and text.startswith("fastdino.patch: nothing to patch in this model.")
    assert "DINOv3ViTLayer" in text and "MSDeformAttn" in text and "Mask2FormerMaskedAttentionDecoder" in text
