"""The bf16 precision policy (fastdino.patch(model, precision="bf16")) and fastdino.verify: the
pixel decoders run in bf16 with fp32 locations, weights and statistics, the rest of the model
keeps its precision, and verify measures what changed (errors per output, argmax agreement)."""


import pytest
import torch
from helpers import DEVICE, op_args, op_runs
from models import TRUST, patch_trusted
from models.dinov3_official import DinoVisionTransformer
from models.dinov3_seg_official import DINOv3_Adapter, MSDeformAttn, MSDeformAttnPixelDecoder
from test_patch import rel_err
from test_patch_deformable import mask2former_config, official_adapter

import fastdino
from fastdino.fused.precision import _unwrap_autocast
from fastdino.verify import semantic_map

transformers = pytest.importorskip("transformers")


def official_pixel_decoder():
    torch.manual_seed(0)
    model = MSDeformAttnPixelDecoder().to(DEVICE).eval()
    features = {name: torch.randn(2, 64, 128 // s, 96 // s, device=DEVICE)
                for name, s in (("1", 4), ("2", 8), ("3", 16), ("4", 32))}
    return model, features


def run_decoder(model, features):
    with torch.no_grad():
        mask_features, coarse, levels = model.forward_features(features)
    return torch.cat([t.flatten() for t in (mask_features, coarse, *levels)]), mask_features.dtype


def test_default_precision_keeps_the_official_pixel_decoder_in_fp32():
    model, features = official_pixel_decoder()
    ref, _ = run_decoder(model, features)
    report = patch_trusted(model)
    assert not any(s.fused == "Bf16MSDeformAttnPixelDecoder" for s in report.swapped)
    with op_runs("ms_deform_attn") as ops:
        out, dtype = run_decoder(model, features)
    calls = [op_args("ms_deform_attn", c) for c in ops["ms_deform_attn"].call_args_list]
    assert dtype == torch.float32 and {c["value"].dtype for c in calls} == {torch.float32}
    assert rel_err(out, ref) <= 1e-5


def test_bf16_policy_on_the_official_pixel_decoder():
    model, features = official_pixel_decoder()
    ref, _ = run_decoder(model, features)
    keys = {k: (v.data_ptr(), v.dtype) for k, v in model.state_dict().items()}
    report = patch_trusted(model, precision="bf16")
    assert report.swapped[0].fused == "Bf16MSDeformAttnPixelDecoder" and report.swapped[0].backend == "bf16"
    assert any("precision bf16: <root> run under bf16 autocast" in n for n in report.notes)
    assert {k: (v.data_ptr(), v.dtype) for k, v in model.state_dict().items()} == keys  # weights stay fp32
    with op_runs("ms_deform_attn") as ops:
        out, dtype = run_decoder(model, features)
    # values sampled in bf16; offsets and logits projected in fp32, turned into locations and
    # weights in fp32 inside the kernel from fp32 reference points; outputs in fp32
    calls = [op_args("ms_deform_attn", c) for c in ops["ms_deform_attn"].call_args_list]
    assert [(c["value"].dtype, c["sampling_locations"].dtype, c["attention_weights"].dtype,
             c["reference_points"].dtype) for c in calls] == [(torch.bfloat16, torch.float32, torch.float32,
                                                               torch.float32)] * 2
    assert dtype == torch.float32
    assert 1e-4 < rel_err(out, ref) <= 3e-2, rel_err(out, ref)  # it did change, by what bf16 allows
    fastdino.unpatch(model)
    assert not any(hasattr(m, "_fastdino_precision") for m in model.modules())
    torch.testing.assert_close(run_decoder(model, features)[0], ref, atol=0, rtol=0)


def test_bf16_policy_on_the_official_adapter():
    # dinov3's DINOv3_Adapter as one bf16 region: the SPM convs, the extractors (deformable
    # attention on bf16 values, its ConvFFN) and the output norms; the maps come back in fp32.
    model, run = official_adapter()
    with torch.no_grad():
        ref = run()
    keys = {k: (v.data_ptr(), v.dtype) for k, v in model.state_dict().items()}
    report = patch_trusted(model, precision="bf16")
    root = [s for s in report.swapped if s.path == ""]
    assert [(s.original, s.fused, s.backend) for s in root] == [("DINOv3_Adapter", "Bf16DINOv3_Adapter",
                                                                 "bf16")]
    assert {k: (v.data_ptr(), v.dtype) for k, v in model.state_dict().items()} == keys
    with torch.no_grad(), op_runs("ms_deform_attn") as ops:
        out = run()
    calls = [op_args("ms_deform_attn", c) for c in ops["ms_deform_attn"].call_args_list]
    assert [c["value"].dtype for c in calls] == [torch.bfloat16] * 6
    assert out.dtype == torch.float32
    assert 1e-4 < rel_err(out, ref) <= 3e-2, rel_err(out, ref)
    fastdino.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(run(), ref, atol=0, rtol=0)


class AdapterLinearSegmentor(torch.nn.Module):
    """A ViT-S/16-sized official-structure ViT, the ViT-Adapter and a 1x1 classifier over 150
    classes on its 1/4 map: random init still paints nearly every class, so argmax agreement
    measures something (Mask2Former at random init paints one class everywhere)."""

    def __init__(self):
        super().__init__()
        vit = DinoVisionTransformer(embed_dim=384, depth=12, num_heads=6)
        self.adapter = DINOv3_Adapter(vit, interaction_indexes=[2, 5, 8, 11], n_heads=16, inplanes=64)
        self.head = torch.nn.Conv2d(384, 150, 1)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):  # offsets of a few pixels, logits of a few units, as trained
                d = m.sampling_offsets.in_features
                with torch.no_grad():
                    m.sampling_offsets.weight.normal_(0, 2 / d**0.5)
                    m.sampling_offsets.bias.uniform_(-1, 1)
                    m.attention_weights.weight.normal_(0, 2 / d**0.5)

    def forward(self, x):
        return self.head(self.adapter(x)["1"])


def test_bf16_policy_keeps_the_argmax_of_a_many_class_map():
    # The adapter at 256^2 as one bf16 region. dinov3 runs the ViT under CUDA bf16 autocast in both
    # the original and the patched model; off a GPU it stays fp32 in both here. With the offset
    # and logit projections in bf16 this measured 99.37%, under the 99.5% floor.
    torch.manual_seed(0)
    model = AdapterLinearSegmentor().to(DEVICE).eval()
    taps = model.adapter.backbone.get_intermediate_layers

    def fp32_taps(*args, **kwargs):
        with torch.autocast(DEVICE.type, enabled=False):
            return taps(*args, **kwargs)

    model.adapter.backbone.get_intermediate_layers = fp32_taps
    report = fastdino.verify(model, torch.randn(1, 3, 256, 256, device=DEVICE), precision="bf16", trust=TRUST)
    agreement = report.agreement[0]
    assert agreement.pixels == 64 * 64 and agreement.classes > 100 and agreement.majority < 0.1, str(report)
    assert 1e-4 < report.worst_rel <= 1e-2 and agreement.share >= 0.995, str(report)


def hf_mask2former(backbone):
    torch.manual_seed(0)
    cfg = mask2former_config(backbone, encoder_layers=2, decoder_layers=4)
    model = transformers.Mask2FormerForUniversalSegmentation(cfg).to(DEVICE).eval()
    return model, {"pixel_values": torch.randn(2, 3, 128, 128, device=DEVICE)}


@pytest.mark.parametrize("backbone", ["swin", "dinov3"])
def test_verify_hf_mask2former_default_and_bf16(backbone):
    from test_patch_masked_attention import needs_mask_logits_off_zero

    needs_mask_logits_off_zero()
    model, inputs = hf_mask2former(backbone)
    exact = fastdino.verify(model, inputs)
    assert exact.worst_rel <= 1e-5, str(exact)
    assert [a.name for a in exact.agreement] == ["class_queries_logits + masks_queries_logits"]
    side = 32 if backbone == "swin" else 8  # mask logits at 1/4 (Swin) or 1/16 (ViT taps) of 128
    assert exact.agreement[0].pixels == 2 * side * side and exact.min_agreement == 1.0
    bf16 = fastdino.verify(model, inputs, precision="bf16")
    assert any(s.fused == "Bf16Mask2FormerPixelDecoder" and s.path == "model.pixel_level_module.decoder"
               for s in bf16.patch.swapped)
    assert 1e-4 < bf16.worst_rel <= 0.1, str(bf16)
    assert bf16.min_agreement >= 0.995, str(bf16)  # the policy's floor on random-init models
    names = {e.name for e in bf16.errors}
    assert {"class_queries_logits", "masks_queries_logits", "pixel_decoder_last_hidden_state"} <= names


def test_verify_measures_differences():
    # A model whose second run differs: verify must report the error and the lost agreement.
    class Flaky(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            logits = x.clone()
            if self.calls == 2:
                logits[:, 0] += 10.0  # class 0 wins everywhere
            return logits

    x = torch.randn(1, 3, 8, 8)
    report = fastdino.verify(Flaky(), x)
    err = report.errors[0]
    assert err.name == "" and err.max_abs == pytest.approx(10.0) and err.mean_abs == pytest.approx(10 / 3)
    assert report.agreement[0].pixels == 64
    assert report.agreement[0].share == pytest.approx((x.argmax(1) == 0).float().mean().item())
    counts = x.argmax(1).flatten().bincount()
    assert report.agreement[0].classes == int((counts > 0).sum())
    assert report.agreement[0].majority == pytest.approx(counts.max().item() / 64)
    assert "argmax agreement" in str(report) and "the largest on" in str(report)
    assert not report.passed and str(report).startswith("verify: FAIL: <output> rel err")
    assert "kernels: none ran" in str(report)


def test_verify_gives_a_verdict_and_the_kernels_that_ran():
    from test_patch import hf_vit

    model = hf_vit().to(DEVICE)
    pinned = DEVICE.type if fastdino._ext.BUILD[DEVICE.type] else "triton"
    inputs = {"pixel_values": torch.randn(1, 3, 64, 64, device=DEVICE)}
    report = fastdino.verify(model, inputs, backend=pinned)
    text = str(report).splitlines()
    assert report.passed and text[0].startswith("verify: PASS (") and "float32 rel err <= 0.0001" in text[0]
    assert text[1].startswith("kernels: ") and f"rope_attention on {pinned} (2 calls)" in text[1], text[1]
    assert text[2].startswith("fastdino.patch: 7 modules swapped")
    strict = fastdino.verify(model, inputs, backend=pinned, rel_tol={torch.float32: 0.0})
    assert not strict.passed and "rel err" in strict.verdict() and "> 0" in strict.verdict()


def test_semantic_map_follows_mask2former_inference():
    cls = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])  # query 0 -> class 0, query 1 -> class 1
    masks = torch.full((1, 2, 2, 2), -5.0)
    masks[0, 0, 0] = 5.0  # query 0 covers the top row, query 1 the bottom row
    masks[0, 1, 1] = 5.0
    assert semantic_map(cls, masks).tolist() == [[[0, 0], [1, 1]]]


def test_precision_arguments_and_regions_left_alone():
    with pytest.raises(ValueError, match="precision must be one of"):
        patch_trusted(torch.nn.Linear(2, 2), precision="fp8")
    model, _ = official_pixel_decoder()
    report = patch_trusted(model.bfloat16(), precision="bf16")
    assert report.skipped[0].reasons == ["parameters are not all float32 (the policy lowers an fp32 region)"]


def test_only_torch_autocast_decorators_are_unwrapped():
    decorated = MSDeformAttnPixelDecoder.forward_features
    assert _unwrap_autocast(decorated) is not decorated

    def plain(x):
        return x

    decorated = torch.no_grad()(plain)
    assert _unwrap_autocast(decorated) is decorated
