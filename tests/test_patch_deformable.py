"""fastdino.patch on multi-scale deformable attention: modules following dinov3's MSDeformAttn
(pixel-decoder encoder layers, an adapter extractor's single-level form, a whole ViT-Adapter on a
ViT that follows dinov3's) and tiny random-init transformers Mask2Former, Deformable DETR and
OneFormer models. Patched outputs match, state_dict is untouched, unpatch restores."""


import pytest
import torch
from helpers import DEVICE, op_args, op_runs
from models import patch_trusted, require_transformers
from models.dinov3_official import DinoVisionTransformer
from models.dinov3_seg_official import (
    DINOv3_Adapter,
    MSDeformAttn,
    MSDeformAttnTransformerEncoderLayer,
    reference_points,
)
from test_patch import BACKENDS, rel_err

import fastdino
from fastdino import _ext

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")  # Mask2FormerForUniversalSegmentation builds its matcher with it

DECODER_SHAPES = [(8, 6), (4, 3), (2, 2)]  # 1/8, 1/16, 1/32 of a 64x48 input


class EncoderStack(torch.nn.Module):
    """Two pixel-decoder encoder layers over three levels, as MSDeformAttnPixelDecoder runs them."""

    def __init__(self, d_model=64, heads=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(MSDeformAttnTransformerEncoderLayer(d_model, 128, 3,
                                                                              heads) for _ in range(2))

    def forward(self, src, pos, shapes, starts):
        ref = reference_points(shapes.tolist(), src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, starts)
        return src


def level_tensors(shapes):
    starts = torch.tensor([0] + [h * w for h, w in shapes[:-1]]).cumsum(0)
    return torch.tensor(shapes, device=DEVICE), starts.to(DEVICE)


def random_offsets(module, scale=2.0):
    # Zero-initialised offsets would sample exactly at the reference points: spread them out.
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.sampling_offsets.bias.uniform_(-scale, scale)
        module.attention_weights.weight.normal_(0, 0.5)


def official_decoder():
    torch.manual_seed(0)
    model = EncoderStack().to(DEVICE).eval()
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            random_offsets(m)
    shapes, starts = level_tensors(DECODER_SHAPES)
    S = sum(h * w for h, w in DECODER_SHAPES)
    src, pos = torch.randn(2, S, 64, device=DEVICE), torch.randn(2, S, 64, device=DEVICE)
    return model, lambda: model(src, pos, shapes, starts)


def official_extractor():
    # The adapter's Extractor: queries are the 21n SPM tokens, values the ViT's single 1/16 level;
    # ratio 0.5 and 16 heads give Dh = D / 32 (12 for ViT-S).
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=384, n_levels=1, n_heads=16, n_points=4, ratio=0.5).to(DEVICE).eval()
    random_offsets(attn)
    shapes, starts = level_tensors([(4, 3)])
    query = torch.randn(2, 21 * 3, 384, device=DEVICE)
    feat = torch.randn(2, 12, 384, device=DEVICE)
    ref = torch.rand(2, 21 * 3, 1, 2, device=DEVICE)
    return attn, lambda: attn(query, ref, feat, shapes, starts)


def official_adapter():
    """dinov3's ViT-Adapter (4 interactions, two extra extractors on the last) on a 4-block ViT
    at 64x96: 126 SPM tokens (1/8, 1/16, 1/32) sample the ViT's 4x6 grid; one set of reference
    points serves the batch."""
    torch.manual_seed(0)
    vit = DinoVisionTransformer(embed_dim=64, depth=4, num_heads=4)
    model = DINOv3_Adapter(vit, interaction_indexes=[0, 1, 2, 3]).to(DEVICE).eval()
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            random_offsets(m, scale=1.0)
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics other than the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    pixels = torch.randn(2, 3, 64, 96, device=DEVICE)

    def run():
        return torch.cat([t.flatten() for t in model(pixels).values()])

    return model, run


def mask2former_config(backbone="swin", **overrides):
    """A tiny Mask2FormerConfig with a Swin or a DINOv3ViT backbone."""
    if backbone != "swin":
        require_transformers("DINOv3ViTBackbone", "5.0")
    if backbone == "swin":
        bc = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                     num_heads=[1, 1, 2, 2], window_size=4,
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
    else:
        bc = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_register_tokens=4,
                                          out_indices=[1, 2, 3, 4],
                                          reshape_hidden_states=True)
    kw = dict(backbone_config=bc, feature_size=32, mask_feature_size=32, hidden_dim=32,
              encoder_feedforward_dim=64,
              dim_feedforward=64, encoder_layers=2, decoder_layers=3, num_attention_heads=4, num_queries=10,
              num_labels=5)
    return transformers.Mask2FormerConfig(**{**kw, **overrides})


def hf_mask2former(backbone="swin"):
    torch.manual_seed(0)
    model = transformers.Mask2FormerForUniversalSegmentation(mask2former_config(backbone)).to(DEVICE).eval()
    for m in model.modules():
        if type(m).__name__ == "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention":
            random_offsets(m, scale=1.0)
    pixels = torch.randn(2, 3, 64, 64, device=DEVICE)

    def run():
        out = model(pixel_values=pixels, output_auxiliary_logits=True)
        aux = [t for a in out.auxiliary_logits for t in a.values()]
        assert aux  # the intermediate predictions must match too
        return torch.cat([t.flatten() for t in (out.pixel_decoder_last_hidden_state, out.class_queries_logits,
                                                out.masks_queries_logits, *aux)])

    return model, run


def deformable_detr(boxes=False):
    """Tiny transformers Deformable DETR with a ResNet backbone, 4 levels, padded pixels; with
    boxes, two-stage with box refinement: the decoder samples around (x, y, w, h) references."""
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                         depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"])
    cfg = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, backbone=None, use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=4,
        with_box_refine=boxes, two_stage=boxes, two_stage_num_proposals=10)
    detector = transformers.DeformableDetrForObjectDetection if boxes else transformers.DeformableDetrModel
    model = detector(cfg).to(DEVICE).eval()
    pixels = torch.randn(2, 3, 64, 96, device=DEVICE)
    mask = torch.ones(2, 64, 96, dtype=torch.long, device=DEVICE)
    mask[1, :, 80:] = 0  # the second image is padded on the right

    def run():
        out = model(pixel_values=pixels, pixel_mask=mask)
        boxes_out = [out.logits.flatten(), out.pred_boxes.flatten()] if boxes else []
        return torch.cat([out.last_hidden_state.flatten(), out.encoder_last_hidden_state.flatten(),
                          *boxes_out])

    return model, run


def oneformer():
    torch.manual_seed(0)
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=4,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.OneFormerConfig(
        backbone_config=swin, conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=2, decoder_layers=3, num_attention_heads=4, num_queries=10,
        num_labels=5,
        text_encoder_width=32, text_encoder_num_layers=1, text_encoder_context_length=8,
        text_encoder_proj_layers=1,
        text_encoder_n_ctx=2, task_seq_len=8, max_seq_len=8, use_pretrained_backbone=False)
    model = transformers.OneFormerForUniversalSegmentation(cfg).to(DEVICE).eval()
    pixels = torch.randn(2, 3, 64, 96, device=DEVICE)
    task = torch.randint(0, 100, (2, 8), device=DEVICE)

    def run():
        out = model(pixel_values=pixels, task_inputs=task)
        return torch.cat([out.class_queries_logits.flatten(), out.masks_queries_logits.flatten()])

    return model, run


# name: (build, fused class, swapped modules)
MODELS = {
    "official-pixel-decoder": (official_decoder, "FusedMSDeformAttn", 2),
    "official-extractor": (official_extractor, "FusedMSDeformAttn", 1),
    "official-adapter": (official_adapter, "FusedMSDeformAttn", 6),
    "hf-mask2former-swin": (hf_mask2former,
                            "FusedMask2FormerPixelDecoderEncoderMultiscaleDeformableAttention", 2),
    "hf-mask2former-dinov3": (lambda: hf_mask2former("dinov3"),
                              "FusedMask2FormerPixelDecoderEncoderMultiscaleDeformableAttention", 2),
    # encoder self-attention and the decoders' cross-attention
    "deformable-detr": (deformable_detr, "FusedDeformableDetrMultiscaleDeformableAttention", 3),
    "deformable-detr-boxes": (lambda: deformable_detr(boxes=True),
                              "FusedDeformableDetrMultiscaleDeformableAttention",
                              3),
    "oneformer": (oneformer, "FusedOneFormerPixelDecoderEncoderMultiscaleDeformableAttention", 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_patched_deformable_attention_matches_original(name, backend):
    build, fused, count = MODELS[name]
    model, run = build()
    with torch.no_grad():
        ref = run()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patch_trusted(model, backend=backend)
    swapped = [s for s in report.swapped if s.fused == fused]
    assert len(swapped) == count and all(s.backend == backend for s in swapped)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    with torch.no_grad(), op_runs("ms_deform_attn") as ops:
        out = run()
    # every swapped module runs the op once per forward (a pinned "ref": the original forward)
    assert ops["ms_deform_attn"].call_count == (0 if backend == "ref" else count)
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
    if name.startswith("hf") and backend != "ref":  # level shapes reach the device once per pyramid
        fused_modules = [m for m in model.modules() if type(m).__name__ == fused]
        assert all(len(m.__dict__["_fastdino_cache"]) == 1 for m in fused_modules)
    assert fastdino.unpatch(model) == len(report.swapped)
    assert not any("_fastdino_cache" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(), ref, atol=0, rtol=0)


def test_adapter_extractors_share_one_set_of_reference_points():
    # The extractors hand the kernel (1, 21n, 1, 2) points for a batch of 2: read with a batch
    # stride of 0, not expanded. The ViT under the adapter is patched in the same call.
    model, run = official_adapter()
    report = patch_trusted(model)
    assert {"FusedSelfAttentionBlock", "FusedMSDeformAttn"} <= {s.fused for s in report.swapped}
    with torch.no_grad(), op_runs("ms_deform_attn") as ops:
        run()
    calls = [op_args("ms_deform_attn", c) for c in ops["ms_deform_attn"].call_args_list]
    shapes = {(c["value"].shape[0], tuple(c["reference_points"].shape)) for c in calls}
    assert shapes == {(2, (1, 126, 1, 2))}


def test_default_dispatch_on_cpu_runs_the_cpp_kernel_where_built():
    model, run = official_decoder()
    with torch.no_grad():
        ref = run()
    report = patch_trusted(model)
    expected = "cpu" if _ext.HAS_EXT else "ref"  # the C++ CPU kernel measured faster than grid_sample
    assert [s.backend for s in report.swapped if s.fused == "FusedMSDeformAttn"] == [expected] * 2
    with torch.no_grad(), op_runs("ms_deform_attn") as ops:
        out = run()
    assert ops["ms_deform_attn"].call_count == (2 if _ext.HAS_EXT else 0) and rel_err(out, ref) <= 1e-5


def test_training_with_grad_runs_the_original_and_gradients_flow():
    model, run = official_extractor()
    patch_trusted(model)
    model.train()
    with op_runs("ms_deform_attn") as ops:
        run().sum().backward()
    assert ops["ms_deform_attn"].call_count == 0 and model.sampling_offsets.weight.grad is not None


def test_unsupported_deformable_attention_is_left_alone_with_a_reason():
    model = MSDeformAttn(d_model=64, n_heads=4)
    model.value_proj = torch.nn.Linear(64, 30)
    report = patch_trusted(model)
    assert report.swapped == []
    assert report.skipped[0].reasons == ["value_proj width 30 does not split into 4 heads"]
