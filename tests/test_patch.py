"""fastdino.patch on tiny random-init models: transformers' DINOv3ViT and a module tree following
the official dinov3 code. Patched outputs match, state_dict is untouched, unpatch restores."""

import contextlib
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import DEVICE, op_args, op_runs, requires_ext
from models import patch_trusted, require_transformers
from models.dinov3_official import DinoVisionTransformer, RopePositionEmbedding
from models.timm_eva import Eva

import fastdino
from fastdino import _ext
from fastdino.fused.common import residual_layer_norm

transformers = pytest.importorskip("transformers")

# Relative error ||patched - original|| / ||original|| allowed, per dtype.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Backends pinned in the model tests, on the device the suite runs on.
BACKENDS = (["cuda" if DEVICE.type == "cuda" else "cpu", "triton", "ref"] if _ext.HAS_EXT
            else ["triton", "ref"])
OPS = ("add_layer_norm", "rope_attention", "fused_linear")  # the backbone blocks' ops


def hf_vit(gated=False, layers=2, **kw):
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
               num_register_tokens=4, image_size=64, patch_size=16, layerscale_value=0.5)
    if gated:
        cfg.update(use_gated_mlp=True, hidden_act="silu")
    cfg.update(kw)
    return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)).eval()


def official_vit(**kw):
    torch.manual_seed(0)
    model = DinoVisionTransformer(**kw).eval()
    for blk in model.blocks:  # LayerScale init 1e-5 would hide the branch: give it weight
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                ls.gamma.data.uniform_(0.2, 1.0)
    return model


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_hf(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


def run_official(model, pixels):
    with torch.no_grad():
        feats = model.forward_features(pixels)
        taps = model.get_intermediate_layers(pixels, n=2)
    outs = [feats["x_prenorm"], feats["x_norm_patchtokens"], *taps]
    return torch.cat([t.flatten() for t in outs])


HF_SWAPS = {"DINOv3ViTLayer": "FusedDINOv3ViTLayer", "DINOv3ViTAttention": "FusedDINOv3ViTAttention",
            "DINOv3ViTRopePositionEmbedding": "CachedDINOv3ViTRopePositionEmbedding"}
OFFICIAL_SWAPS = {"SelfAttentionBlock": "FusedSelfAttentionBlock", "SelfAttention": "FusedSelfAttention",
                  "RopePositionEmbedding": "CachedRopePositionEmbedding"}
TIMM_SWAPS = {"EvaBlock": "FusedEvaBlock", "EvaAttention": "FusedEvaAttention"}
# The MLP of each family, GELU and SwiGLU: {original class: fused class}
MLP = {"hf": {"DINOv3ViTMLP": "FusedDINOv3ViTMLP"},
       "hf-gated": {"DINOv3ViTGatedMLP": "FusedDINOv3ViTGatedMLP"},
       "official": {"Mlp": "FusedMlp"}, "official-swiglu": {"SwiGLUFFN": "FusedSwiGLUFFN"},
       "timm": {"Mlp": "FusedMlp"}, "timm-swiglu": {"SwiGLU": "FusedSwiGLU"}}


def timm_tree(**kw):
    torch.manual_seed(0)
    return Eva(**kw).eval()


def run_timm(model, pixels):
    with torch.no_grad():
        return model.forward_features(pixels)


# name: (build, run, {original class: fused class}, fused op calls per run = blocks x forward passes)
MODELS = {
    "hf": (hf_vit, run_hf, HF_SWAPS | MLP["hf"], 2),
    "hf-gated": (lambda: hf_vit(gated=True), run_hf, HF_SWAPS | MLP["hf-gated"], 2),
    "official": (official_vit, run_official, OFFICIAL_SWAPS | MLP["official"], 4),
    "official-swiglu": (lambda: official_vit(ffn="swiglu"), run_official,
                        OFFICIAL_SWAPS | MLP["official-swiglu"], 4),
    "official-no-layerscale": (lambda: official_vit(layerscale_init=None), run_official,
                               OFFICIAL_SWAPS | MLP["official"], 4),
    "timm-tree": (timm_tree, run_timm, TIMM_SWAPS | MLP["timm"], 2),
    "timm-tree-no-bias-no-layerscale": (lambda: timm_tree(qkv_bias=False, init_values=None), run_timm,
                                        TIMM_SWAPS | MLP["timm"], 2),
    "timm-tree-swiglu": (lambda: timm_tree(swiglu_mlp=True), run_timm, TIMM_SWAPS | MLP["timm-swiglu"], 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_patched_model_matches_original(name, backend):
    build, run, swaps, calls = MODELS[name]
    check_patched_matches(build().to(DEVICE), run, swaps, calls, backend,
                          layerscale="no-layerscale" not in name)


def check_patched_matches(model, run, swaps, calls, backend, layerscale=True):
    """Patch `model` on `backend`: the swaps, untouched state_dict, op calls, outputs and unpatch."""
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE)  # 4x3 patches: H != W exercises the RoPE layout
    ref = run(model, pixels)
    keys = list(model.state_dict().keys())
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}

    report = patch_trusted(model, backend=backend)
    originals = [s.original for s in report.swapped]
    assert {c: originals.count(c) for c in swaps} == {c: 1 if "Rope" in c else 2 for c in swaps}
    assert all(s.fused == swaps[s.original] and s.backend == ("cache" if "Rope" in s.original else backend)
               for s in report.swapped)
    assert list(model.state_dict().keys()) == keys
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors  # shared, not copied

    with op_runs(*OPS) as runs:
        out = run(model, pixels)
    seam, attn, linear = (runs[op] for op in OPS)
    assert seam.call_count == calls and all(c.args[0] == backend for c in seam.call_args_list)
    # the attention's Triton form: q and k rotated in their projection GEMM's epilogue (one fused qkv
    # projection, or transformers' q_proj and k_proj), then SDPA; the others run rope_attention
    rotating = [c for c in linear.call_args_list if op_args("fused_linear", c)["cos"] is not None]
    per_layer = 2 if type(model).__name__.startswith("DINOv3ViT") else 1
    assert len(rotating) == (calls * per_layer if backend == "triton" else 0)
    assert attn.call_count == (0 if backend == "triton" else calls)
    assert all(c.args[0] == backend for c in attn.call_args_list)
    # MLP: input side + output side with LayerScale and residual; "ref" runs the original modules
    assert linear.call_count - len(rotating) == (0 if backend == "ref" else 2 * calls)
    assert all(c.args[0] == backend for c in linear.call_args_list)
    if backend != "ref" and layerscale:
        assert sum(op_args("fused_linear", c)["gamma"] is not None for c in linear.call_args_list) == calls
    assert rel_err(out, ref) <= REL_TOL[torch.float32]

    assert fastdino.unpatch(model) == len(report.swapped)
    assert all(type(m).__name__ not in swaps.values() for m in model.modules())
    torch.testing.assert_close(run(model, pixels), ref, atol=0, rtol=0)


@contextlib.contextmanager
def priority(table):
    """Every backbone op's dispatch priority set to `table` ({device type: backends})."""
    with contextlib.ExitStack() as stack:
        for op in OPS:
            stack.enter_context(mock.patch.dict(fastdino.ops.OPS[op].priority, table))
        yield


@pytest.mark.parametrize("name", ["hf", "official-swiglu", "timm-tree"])
def test_unpinned_patch_runs_the_original_where_dispatch_picks_the_reference(name):
    # Where no kernel is preferred on the device (CPU today), the patched blocks must not run the
    # ops' fp32 references (slower, other rounding) but the model's own modules: bit for bit.
    build, run, swaps, calls = MODELS[name]
    model = build().to(DEVICE, torch.bfloat16)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE, dtype=torch.bfloat16)
    ref = run(model, pixels)
    patch_trusted(model)
    with priority({"cpu": ("ref",), "cuda": ("ref",)}), op_runs(*OPS) as ops:
        out = run(model, pixels)
    assert {op: m.call_count for op, m in ops.items()} == {op: 0 for op in OPS}
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@requires_ext
@pytest.mark.parametrize("name", ["hf", "official-swiglu", "timm-tree"])
def test_unpinned_patch_runs_the_kernels_dispatch_picks(name):
    build, run, swaps, calls = MODELS[name]
    model = build().to(DEVICE)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE)
    ref = run(model, pixels)
    patch_trusted(model)
    with priority({DEVICE.type: (BACKENDS[0], "ref")}), op_runs(*OPS) as ops:
        out = run(model, pixels)
    assert {op: m.call_count for op, m in ops.items()} == {"add_layer_norm": calls, "rope_attention": calls,
                                                           "fused_linear": 2 * calls}
    assert rel_err(out, ref) <= REL_TOL[torch.float32]


def test_rope_tables_are_computed_once_per_size_and_follow_the_periods_buffer():
    model = official_vit()
    pixels = torch.randn(1, 3, 64, 48)
    patch_trusted(model)
    with mock.patch.object(RopePositionEmbedding, "forward", autospec=True,
                           side_effect=RopePositionEmbedding.forward) as compute:
        run_official(model, pixels)  # forward_features + get_intermediate_layers: 4 blocks ask for the tables
        assert compute.call_count == 1
        run_official(model, torch.randn(1, 3, 32, 32))  # another grid size
        assert compute.call_count == 2
        ref = run_official(model, pixels)
        assert compute.call_count == 2
        with torch.no_grad():
            model.rope_embed.periods.mul_(2.0)  # in-place edit (what load_state_dict does)
        changed = run_official(model, pixels)
        assert compute.call_count == 3 and rel_err(changed, ref) > 1e-3
        model.train()
        model.rope_embed(H=4, W=3)
        assert compute.call_count == 4  # training: coordinates are augmented, never cached


def test_official_tree_state_dict_keys_follow_dinov3():
    model = official_vit(depth=1)
    expected = ["cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "rope_embed.periods", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
                "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.bias_mask",
                "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.ls1.gamma",
                "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
                "blocks.0.ls2.gamma", "norm.weight", "norm.bias"]
    assert sorted(model.state_dict().keys()) == sorted(expected)
    patch_trusted(model)
    assert sorted(model.state_dict().keys()) == sorted(expected)


def test_report_paths_follow_the_model_and_patch_twice_is_a_noop():
    model = hf_vit()
    first = patch_trusted(model)
    # CPU parameters: the measured-fastest path
    assert all(s.backend in ("ref", "cache") for s in first.swapped)
    prefix = "model.layer" if hasattr(model, "model") else "layer"  # transformers 5.x vs 4.x
    paths = ["rope_embeddings"] + [f"{prefix}.{i}{part}" for i in range(2) for part in ("", ".attention",
                                                                                        ".mlp")]
    assert [s.path for s in first.swapped] == paths
    text = str(first).splitlines()
    assert text[0] == "fastdino.patch: 7 modules swapped, 0 left alone (parameters on cpu, float32)"
    assert text[1] == "  cache their RoPE tables per image size: 1 DINOv3ViTRopePositionEmbedding"
    assert text[2].startswith("  run the model's own code (no kernel is picked for this device and dtype")
    assert text[2].endswith(": 2 DINOv3ViTLayer (add_layer_norm), 2 DINOv3ViTAttention (rope_attention), "
                            "2 DINOv3ViTMLP (fused_linear)")
    assert "DINOv3ViTLayer -> FusedDINOv3ViTLayer [ref]" in first.details()
    pinned = str(patch_trusted(hf_vit(), backend="ref"))
    assert "run on the pinned backend 'ref': 2 DINOv3ViTLayer (add_layer_norm)" in pinned
    assert "own code" not in pinned
    second = patch_trusted(model)
    assert second.swapped == [] and second.already_patched == paths
    assert fastdino.unpatch(model) == 7 and fastdino.unpatch(model) == 0


def test_load_state_dict_after_patching_is_used():
    patched, reference = hf_vit(), hf_vit()
    patch_trusted(patched)
    patched.load_state_dict(reference.state_dict())
    pixels = torch.randn(1, 3, 64, 64)
    assert rel_err(run_hf(patched, pixels), run_hf(reference, pixels)) <= REL_TOL[torch.float32]


def test_unsupported_variant_is_left_alone_with_a_reason():
    model = hf_vit()
    layer = model.model.layer[1] if hasattr(model, "model") else model.layer[1]
    layer.norm2 = torch.nn.RMSNorm(64)
    layer.mlp.act_fn = torch.nn.GELU(approximate="tanh")
    report = patch_trusted(model)
    assert len(report.swapped) == 5 and len(report.skipped) == 2
    reasons = {s.cls: s.reasons for s in report.skipped}
    assert reasons["DINOv3ViTLayer"] == ["norm2 is RMSNorm, not nn.LayerNorm"]
    assert reasons["DINOv3ViTMLP"] == ["act_fn is GELU, not exact GELU"]
    assert "left" in str(report)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "gated"])
def test_bf16_model_matches_original(gated, backend):
    model = hf_vit(gated=gated).to(DEVICE, torch.bfloat16)
    pixels = torch.randn(2, 3, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    ref = run_hf(model, pixels)
    patch_trusted(model, backend=backend)
    assert rel_err(run_hf(model, pixels), ref) <= REL_TOL[torch.bfloat16]


def test_autocast_keeps_the_original_dtypes():
    # Under autocast the residual stream is fp32 and the branch bf16: the seam upcasts the branch
    # (exact) and returns fp32 like the original modules.
    model = hf_vit()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run_hf(model, pixels)
        patch_trusted(model, backend=BACKENDS[0])
        with op_runs("fused_linear") as ops:
            out = run_hf(model, pixels)
    assert ops["fused_linear"].call_count == 0  # the Linears run in autocast's dtype: the original MLP runs
    assert out.dtype == ref.dtype
    assert rel_err(out, ref) <= REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("ls_dtype,norm_dtype", [(torch.float32, torch.float32), (torch.bfloat16,
                                                                                  torch.float32)])
def test_seam_keeps_the_original_dtypes_and_values(ls_dtype, norm_dtype):
    # bf16 activations with an fp32 LayerScale promote y to fp32; fp32 LayerNorm parameters keep z
    # in bf16 but must not be rounded: both cases run the original modules, bit for bit.
    ls = type("LayerScale", (torch.nn.Module,), {"forward": lambda self, t: t * self.gamma})()
    ls.gamma = torch.nn.Parameter(torch.rand(32, dtype=ls_dtype))
    norm = torch.nn.LayerNorm(32).to(norm_dtype)
    x, branch = torch.randn(2, 5, 32, dtype=torch.bfloat16), torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with torch.no_grad(), op_runs("add_layer_norm") as ops:
        pinned = SimpleNamespace(_fastdino_backend=BACKENDS[0])  # pinned: the dtype rule decides
        y, z = residual_layer_norm(x, branch, ls, norm, pinned)
        y_ref = x + ls(branch)
        z_ref = norm(y_ref)
    assert ops["add_layer_norm"].call_count == 0
    assert (y.dtype, z.dtype) == (y_ref.dtype, z_ref.dtype)
    torch.testing.assert_close(z, z_ref, atol=0, rtol=0)


@requires_ext
def test_training_with_drop_path_runs_the_original_and_gradients_flow():
    model = official_vit(drop_path_rate=0.5).train()
    patch_trusted(model)
    pixels = torch.randn(2, 3, 32, 32)
    with op_runs("add_layer_norm") as ops:
        model.forward_features(pixels)["x_prenorm"].sum().backward()
    assert ops["add_layer_norm"].call_count == 0  # stochastic depth: the original forward runs
    model = hf_vit().train()
    patch_trusted(model)
    out = model(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state
    out.sum().backward()  # requires grad: the original modules run, autograd works
    assert all(p.grad is not None for p in model.parameters()
               if p.requires_grad and p.dim() == 1 and p.numel() == 64)


@pytest.mark.slow
@requires_ext
def test_patched_model_compiles_fullgraph_with_inductor():
    model = hf_vit()
    pixels = torch.randn(1, 3, 64, 64)
    ref = run_hf(model, pixels)
    patch_trusted(model, backend=BACKENDS[0])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(pixel_values=pixels).last_hidden_state
    assert rel_err(out, ref) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_backbone_feature_maps_match(backend):
    # The segmentation heads' taps: DINOv3ViTBackbone returns reshaped hidden states of chosen layers.
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_register_tokens=4, image_size=64,
                                       patch_size=16,
                                       layerscale_value=0.5, out_indices=[1, 3])
    require_transformers("DINOv3ViTBackbone", "5.0")
    model = transformers.DINOv3ViTBackbone(cfg).eval().to(DEVICE)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE)
    with torch.no_grad():
        ref = model(pixels).feature_maps
        patch_trusted(model, backend=backend)
        out = model(pixels).feature_maps
    assert [o.shape for o in out] == [r.shape for r in ref] == [(2, 64, 4, 3)] * 2
    assert all(rel_err(o, r) <= REL_TOL[torch.float32] for o, r in zip(out, ref))


def test_timm_attention_whose_prefix_disagrees_with_the_tables_runs_the_original():
    # timm rotates everything after num_prefix_tokens; rope_attention everything after N - HW.
    # Where the two disagree (tokens prepended in front, e.g. EoMT queries, without longer tables)
    # the original runs and fails as it would unpatched, rather than rotating other tokens.
    model = timm_tree()
    attn = model.blocks[0].attn
    x = torch.randn(1, 3 + 5 + 12, 64)
    rope = model.rope.get_embed(shape=(4, 3))
    with pytest.raises(RuntimeError) as unpatched:
        attn(x, rope=rope)
    patch_trusted(model)
    with op_runs("rope_attention") as ops, pytest.raises(RuntimeError) as patched:
        attn(x, rope=rope)
    assert ops["rope_attention"].call_count == 0 and str(patched.value) == str(unpatched.value)


# timm's DINOv3 ports, shrunk: GELU MLP, SwiGLU (S+/H+/7B) and separate q/v biases (the _qkvb weights)
REAL_TIMM = {"vit_small_patch16_dinov3": MLP["timm"], "vit_small_plus_patch16_dinov3": MLP["timm-swiglu"],
             "vit_small_patch16_dinov3_qkvb": MLP["timm"]}


def real_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, depth=2, embed_dim=64, num_heads=4, img_size=64)
    except Exception as e:  # noqa: BLE001 - a timm without the DINOv3 port
        pytest.skip(f"timm {timm.__version__} cannot build {name}: {e}")
    for pname, p in model.named_parameters():  # LayerScale 1e-5 and zero biases would hide the branches
        if "gamma" in pname or pname.endswith(("q_bias", "v_bias")):
            p.data.uniform_(0.2, 1.0)
    return model.eval()


def run_real_timm(model, pixels):
    """forward_features and the segmentation heads' taps (forward_intermediates): 2 passes of 2 blocks."""
    with torch.no_grad():
        taps = model.forward_intermediates(pixels, indices=2, output_fmt="NCHW", intermediates_only=True)
        return torch.cat([model.forward_features(pixels).flatten()] + [t.flatten() for t in taps])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", REAL_TIMM)
def test_real_timm_dinov3_matches(name, backend):
    check_patched_matches(real_timm(name).to(DEVICE), run_real_timm, TIMM_SWAPS | REAL_TIMM[name], 4, backend)


@pytest.mark.parametrize("name", ["hf", "official", "timm-tree"])
def test_rope_epilogue_is_decided_once(name):
    """The Triton form's projections: whether they can take the RoPE epilogue is worked out on the
    first forward and kept per signature, so a steady-state forward does no reasons work; timm's
    tables (halves of one tensor, rows 2 D apart) are read in place."""
    build, run, _, calls = MODELS[name]
    model = build().to(DEVICE)
    pixels = torch.randn(2, 3, 64, 48, device=DEVICE)
    ref = run(model, pixels)
    patch_trusted(model, backend="triton")
    op = fastdino.ops.OPS["fused_linear"]
    with mock.patch.object(op, "runnable", wraps=op.runnable) as runnable:
        run(model, pixels)
        first = runnable.call_count
        with op_runs("fused_linear") as runs:
            out = run(model, pixels)
    assert first > 0 and runnable.call_count == first
    linear = runs["fused_linear"].call_args_list
    assert sum(op_args("fused_linear", c)["cos"] is not None for c in linear) >= calls
    assert rel_err(out, ref) <= REL_TOL[torch.float32]
