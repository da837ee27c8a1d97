"""fastdino.patch on DINOv3 ConvNeXts: tiny random-init transformers DINOv3ConvNextModel, a module
tree following dinov3's ConvNeXt (tests/models/dinov3_convnext_official.py), timm's ConvNeXt where
timm is installed, and dinov3's linear head. Patched outputs match, state_dict is untouched,
unpatch restores."""

import copy

import pytest
import torch
from helpers import DEVICE, op_args, op_runs, requires_ext
from models import patch_trusted
from models.dinov3_convnext_official import Block, ConvNeXt, ConvNeXtLinearSegmentor, LinearHead
from test_patch import BACKENDS, REL_TOL, priority, rel_err

import fastdino
from fastdino.ops import OPS

transformers = pytest.importorskip("transformers")

OPS_RUN = ("dwconv_layer_norm", "fused_linear")


def with_layer_scale(model, gamma=True):
    """Random weights a 1e-6 LayerScale would hide: gamma in [0.2, 1], norms and biases random."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 1.0)
            elif p.dim() == 1:
                p.normal_(0, 0.5)
    return model


def hf_convnext(**kw):
    torch.manual_seed(0)
    cfg = transformers.DINOv3ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], **kw)
    return with_layer_scale(transformers.DINOv3ConvNextModel(cfg).eval())


def official_convnext(layer_scale=True):
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1, 2, 1), layer_scale_init_value=1e-6 if layer_scale else 0)
    return with_layer_scale(model.eval())


def timm_convnext():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.convnext.ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=0)
    return with_layer_scale(model.eval())


def run_hf(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


def run_maps(model, pixels):
    """Every stage's map of dinov3's tree and timm's (forward_intermediates), flattened."""
    with torch.no_grad():
        if hasattr(model, "get_intermediate_layers"):
            maps = model.get_intermediate_layers(pixels, n=4)
        else:
            maps = model.forward_intermediates(pixels, intermediates_only=True)
    return torch.cat([m.flatten() for m in maps])


# name: (build, run, original class, fused class, blocks)
MODELS = {
    "hf": (hf_convnext, run_hf, "DINOv3ConvNextLayer", "FusedDINOv3ConvNextLayer", 5),
    "official": (official_convnext, run_maps, "Block", "FusedBlock", 5),
    "official-no-layerscale": (lambda: official_convnext(False), run_maps, "Block", "FusedBlock", 5),
    "timm": (timm_convnext, run_maps, "ConvNeXtBlock", "FusedConvNeXtBlock", 5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("name", MODELS)
def test_patched_convnext_matches_original(name, channels_last, backend):
    build, run, original, fused, blocks = MODELS[name]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build().to(DEVICE, memory_format=memory_format)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE).to(memory_format=memory_format)  # 16x12 .. 2x1 maps
    ref = run(model, pixels)
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}

    report = patch_trusted(model, backend=backend)
    swapped = [s for s in report.swapped if s.original == original]
    assert len(swapped) == blocks and all(s.fused == fused and s.backend == backend for s in swapped)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    with op_runs(*OPS_RUN) as runs:
        out = run(model, pixels)
    dwconv, linear = (runs[op] for op in OPS_RUN)
    assert dwconv.call_count == blocks and all(c.args[0] == backend for c in dwconv.call_args_list)
    # MLP: fc1 + GELU, then fc2 with gamma and the residual in its epilogue; "ref" runs the Linears
    assert linear.call_count == (0 if backend == "ref" else 2 * blocks)
    if backend != "ref":
        residuals = [op_args("fused_linear", c)["residual"] for c in linear.call_args_list[1::2]]
        assert all(r is not None for r in residuals)
        gammas = [op_args("fused_linear", c)["gamma"] for c in linear.call_args_list[1::2]]
        assert all((g is None) == (name == "official-no-layerscale") for g in gammas)
    assert rel_err(out, ref) <= REL_TOL[torch.float32], rel_err(out, ref)

    assert fastdino.unpatch(model) == len(report.swapped)
    torch.testing.assert_close(run(model, pixels), ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_bf16_convnext_matches_original(backend):
    model = hf_convnext().to(DEVICE, torch.bfloat16)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE, dtype=torch.bfloat16)
    ref = run_hf(model, pixels)
    patch_trusted(model, backend=backend)
    assert rel_err(run_hf(model, pixels), ref) <= REL_TOL[torch.bfloat16]


def test_blocks_keep_the_stage_channels_last():
    # The block returns its input's NCHW shape in channels-last memory: the next block's residual
    # is then read in place, and the downsamplers keep the layout.
    model = official_convnext().to(DEVICE)
    patch_trusted(model, backend=BACKENDS[0])
    x = torch.randn(1, 16, 9, 7, device=DEVICE)
    with torch.no_grad():
        y = model.stages[0][0](x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)


def test_unpinned_patch_runs_the_original_where_dispatch_picks_the_reference():
    model = hf_convnext().to(DEVICE, torch.bfloat16)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE, dtype=torch.bfloat16)
    ref = run_hf(model, pixels)
    report = patch_trusted(model)
    refs_only = {"cpu": ("ref",), "cuda": ("ref",)}
    with priority(refs_only), mock_priority("dwconv_layer_norm", refs_only), op_runs(*OPS_RUN) as runs:
        out = run_hf(model, pixels)
    assert {op: m.call_count for op, m in runs.items()} == {op: 0 for op in OPS_RUN}
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    if DEVICE.type == "cpu":  # the report says so: no kernel is picked for CPU tensors
        assert {s.backend for s in report.swapped} == {"ref"}


def mock_priority(op, table):
    from unittest import mock

    return mock.patch.dict(OPS[op].priority, table)


@requires_ext
def test_unpinned_patch_runs_the_kernel_dispatch_picks_and_the_linears_as_they_are():
    # fused_linear is not picked until its kernels are timed: the MLP runs the block's Linears on
    # the fused tokens, the residual added to the NHWC view of the input.
    model = hf_convnext().to(DEVICE)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE)
    ref = run_hf(model, pixels)
    patch_trusted(model)
    with mock_priority("dwconv_layer_norm", {DEVICE.type: (BACKENDS[0], "ref")}), op_runs(*OPS_RUN) as runs:
        out = run_hf(model, pixels)
    assert runs["dwconv_layer_norm"].call_count == 5 and runs["fused_linear"].call_count == 0
    assert rel_err(out, ref) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_batch_size_changing_every_call(backend):
    model = official_convnext().to(DEVICE)
    pixels = torch.randn(5, 3, 32, 32, device=DEVICE)
    refs = [run_maps(model, pixels[:b]) for b in (3, 1, 5, 2)]
    patch_trusted(model, backend=backend)
    for b, ref in zip((3, 1, 5, 2), refs):
        assert rel_err(run_maps(model, pixels[:b]), ref) <= REL_TOL[torch.float32]


def test_training_with_drop_path_and_grad_runs_the_original():
    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1, 1, 1), drop_path_rate=0.5).to(DEVICE).train()
    patch_trusted(model, backend=BACKENDS[0])
    with op_runs(*OPS_RUN) as runs:
        model(torch.randn(2, 3, 32, 32, device=DEVICE)).sum().backward()
    # drop path rates 0, 1/6, 1/3, 1/2: the first block (no drop path) runs pinned, its backward the
    # reference's; the others run their original forward
    assert runs["dwconv_layer_norm"].call_count == 1
    assert all(s[0].dwconv.weight.grad is not None for s in model.stages)


def test_autocast_runs_the_original():
    model = official_convnext().to(DEVICE)
    pixels = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref = run_maps(model, pixels)
        patch_trusted(model, backend=BACKENDS[0])
        with op_runs(*OPS_RUN) as runs:
            out = run_maps(model, pixels)
    assert runs["dwconv_layer_norm"].call_count == 0
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_unsupported_blocks_are_left_alone_with_a_reason():
    block = Block(16)
    block.dwconv = torch.nn.Conv2d(16, 16, 5, padding=2, groups=16)
    block.norm.data_format = "channels_first"
    report = patch_trusted(torch.nn.Sequential(block))
    assert report.swapped == []
    assert report.skipped[0].reasons == ["dwconv is not a 7x7 stride-1 conv with padding 3 (kernel (5, 5), "
                                         "stride (1, 1), padding (2, 2), dilation (1, 1))"]
    block = Block(16)
    block.act = torch.nn.GELU(approximate="tanh")
    block.norm.data_format = "channels_first"
    assert patch_trusted(block).skipped[0].reasons == ["norm normalizes channels_first",
                                                        "act is GELU, not exact GELU"]


def test_other_classes_named_block_are_left_alone_with_their_origin():
    class Block(torch.nn.Module):  # e.g. timm's ViT block: the name alone says nothing
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(8, 8)

    report = patch_trusted(torch.nn.Sequential(Block()))
    assert report.swapped == []
    assert [s.reasons[0].split(":")[0] for s in report.skipped] == [
        "Block is defined in tests.test_patch_convnext, not in dinov3.models.convnext"]


def test_patched_convnext_compiles_fullgraph():
    model = official_convnext().to(DEVICE)
    pixels = torch.randn(1, 3, 32, 32, device=DEVICE)
    patch_trusted(model, backend="triton")
    torch._dynamo.reset()
    maps = lambda x: model.get_intermediate_layers(x, n=4)  # noqa: E731
    compiled = torch.compile(maps, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for got, want in zip(compiled(pixels), model.get_intermediate_layers(pixels, n=4)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


# -- dinov3's linear head: BatchNorm folded into the conv -----------------------------------------


def segmentor(batchnorm=torch.nn.SyncBatchNorm):
    torch.manual_seed(0)
    model = ConvNeXtLinearSegmentor(n_classes=7, depths=(1, 1, 1, 1))
    model.head = LinearHead([128], 7, batchnorm=batchnorm)
    with torch.no_grad():
        bn = model.head.batchnorm_layer
        bn.running_mean.normal_(0, 2), bn.running_var.uniform_(0.5, 3), bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.5)
    return with_layer_scale(model).to(DEVICE).eval()


@pytest.mark.parametrize("batchnorm", [torch.nn.SyncBatchNorm, torch.nn.BatchNorm2d], ids=["sync", "bn2d"])
def test_linear_head_runs_its_batchnorm_folded(batchnorm):
    model = segmentor(batchnorm)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE)
    taps = [torch.randn(2, 128, 2, 2, device=DEVICE), torch.randn(2, 64, 4, 3, device=DEVICE)]
    head = LinearHead([128, 64], 5, batchnorm=batchnorm).to(DEVICE).eval()
    with torch.no_grad():
        head.batchnorm_layer.running_var.uniform_(0.5, 2)
        ref, ref_head, ref_pred = model(pixels), head(taps), head.predict(taps, (9, 7))
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patch_trusted(model)
    patch_trusted(head)
    heads = [(s.fused, s.backend) for s in report.swapped if s.original == "LinearHead"]
    assert heads == [("FoldedLinearHead", "fold")]
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    with torch.no_grad(), op_runs("dwconv_layer_norm") as runs:
        out = model(pixels)
        out_head, out_pred = head(taps), head.predict(taps, (9, 7))
    assert runs["dwconv_layer_norm"].call_count == 0  # CPU: the blocks' original forward (dispatch's pick)
    for got, want in ((out, ref), (out_head, ref_head), (out_pred, ref_pred)):
        assert got.shape == want.shape and rel_err(got, want) <= REL_TOL[torch.float32]
    assert len(model.head.__dict__["_fastdino_cache"]) == 1  # one fold, reused


def test_linear_head_fold_follows_load_state_dict_and_training():
    model = segmentor()
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    patch_trusted(model)
    with torch.no_grad():
        model(pixels)
    other = segmentor()
    with torch.no_grad():
        other.head.batchnorm_layer.running_mean.add_(1.0)
        other.head.conv.weight.mul_(-2)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(pixels), other(pixels), atol=1e-5, rtol=1e-5)
    original = copy.deepcopy(model.head)
    fastdino.unpatch(original)
    taps = [torch.randn(2, 128, 2, 2, device=DEVICE)]
    for head in (model.head, original):  # batch statistics and dropout: the original forward
        head.train()
        torch.manual_seed(1)
        head.out = head(taps)
    torch.testing.assert_close(model.head.out, original.out, atol=0, rtol=0)


def test_linear_head_without_batchnorm_is_left_alone():
    head = LinearHead([16], 3, use_batchnorm=False)
    report = patch_trusted(head)
    assert report.skipped[0].reasons == ["batchnorm_layer is Identity: no BatchNorm to fold"]


def test_fold_of_a_batchnorm_without_affine_parameters():
    from fastdino.fused.convnext import fold_batchnorm

    bn, conv = torch.nn.BatchNorm2d(6, affine=False).eval(), torch.nn.Conv2d(6, 4, 1)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 6, 3, 5)
        torch.testing.assert_close(torch.nn.functional.conv2d(x, *fold_batchnorm(bn, conv)), conv(bn(x)),
                                   atol=1e-5, rtol=1e-5)


def test_timm_gelu_is_recognised_as_exact():
    from fastdino.fused.mlp import is_exact_gelu

    class GELU(torch.nn.Module):  # timm.layers.activations.GELU: F.gelu(x)
        pass

    GELU.__module__ = "timm.layers.activations"
    assert is_exact_gelu(GELU()) and not is_exact_gelu(torch.nn.GELU(approximate="tanh"))
