"""`fastdino demo`: checkpoints in transformers' and the official dinov3 key layouts (size read off
the weights), plain errors for a missing device or checkpoint, and what it prints."""

import pytest
import torch
from test_patch import hf_vit, official_vit

from fastdino.__main__ import main
from fastdino.checkpoints import vit_from_state_dict

transformers = pytest.importorskip("transformers")
FAST = ["--resolution", "64", "--iters", "1", "--rounds", "1", "--device", "cpu"]


def test_official_checkpoint_converts_to_the_same_model():
    official = official_vit(embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4)
    model = vit_from_state_dict(official.state_dict()).eval()
    cfg = model.config
    sizes = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_register_tokens)
    assert sizes == (64, 2, 4, 4)
    pixels = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        want = official.forward_features(pixels)["x_norm_patchtokens"]
        got = model(pixel_values=pixels).last_hidden_state[:, 5:]  # after the cls and 4 register tokens
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_demo_runs_a_checkpoint_of_either_layout(layout, tmp_path, capsys):
    if layout == "official":
        state = official_vit(embed_dim=64, depth=2, num_heads=4, n_storage_tokens=4).state_dict()
        shape = "64 wide, 2 layers, 4 heads"
    else:  # a ViT-B-like width per head (64), not ViT-S's config
        state = hf_vit(hidden_size=128, num_attention_heads=2, intermediate_size=256).state_dict()
        shape = "128 wide, 2 layers, 2 heads"
    torch.save(state, tmp_path / "weights.pth")
    assert main(["demo", "--weights", str(tmp_path / "weights.pth"), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"model: DINOv3 ViT ({shape})" in out and "input: 1 x 3 x 64 x 64, float32, on CPU" in out
    assert "outputs: " in out and ": OK" in out and "kernels: " in out
    assert "original / patched: " in out and "On CPU fastdino is not a speed-up" in out
    assert "fastdino.tune: 3 decisions: " in out


@pytest.mark.quick
def test_demo_names_what_it_cannot_use(tmp_path, capsys):
    assert main(["demo", "--weights", str(tmp_path / "missing-model"), *FAST]) == 2
    assert "no such file or directory, and not in the local Hugging Face cache" in capsys.readouterr().out
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["demo", "--weights", str(tmp_path / "other.pth"), *FAST]) == 2
    assert "not a DINOv3 ViT checkpoint; fastdino demo accepts" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda"]) == 2
        assert "--device cuda: " in capsys.readouterr().out
