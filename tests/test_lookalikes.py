"""Swap only what fastdino knows: classes with the names fastdino matches but another origin, other
parts or other math are left alone, with the reason in the report, and compute exactly what they
computed before. Also: the origin checks themselves (library release, dinov3 code digest, replaced
methods, hooks, trust)."""

import os
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from models import TRUST, patch_trusted
from models.dinov3_convnext_official import Block as ConvNeXtBlock
from models.dinov3_convnext_official import LayerNorm as ChannelsLastLayerNorm
from models.dinov3_official import LayerScale
from models.dinov3_official import Mlp as DinoMlp
from models.dinov3_official import SelfAttention as DinoSelfAttention
from models.dinov3_official import SelfAttentionBlock as DinoBlock
from torch import nn

import fastdino
from fastdino.fused import sources
from fastdino.fused.common import is_fused

pytestmark = pytest.mark.quick

DIM, HEADS = 32, 2


def _rope(n_patches=9, head_dim=DIM // HEADS):
    angles = torch.rand(n_patches, head_dim // 2) * 6.0
    angles = torch.cat((angles, angles), -1)
    return angles.sin(), angles.cos()


# -- look-alikes, each with the name of a class fastdino swaps ------------------------------------


class SelfAttention(nn.Module):
    """dinov3's attribute names plus a QK-norm: LayerNorms on q and k."""

    def __init__(self, dim=DIM, num_heads=HEADS):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // num_heads), nn.LayerNorm(dim // num_heads)

    def forward(self, x, attn_bias=None, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    """dinov3's Mlp names with another activation."""

    def __init__(self, act, dim=DIM):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), act, nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLUFFN(nn.Module):
    """dinov3's SwiGLUFFN names; the hidden size is the full ratio (no 2/3, no alignment)."""

    def __init__(self, dim=DIM, hidden=4 * DIM):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SelfAttentionBlock(nn.Module):
    """dinov3's block structure exactly, with post-norm math: a different function of the same
    parameters."""

    def __init__(self, dim=DIM, num_heads=HEADS):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = DinoSelfAttention(dim, num_heads, mask_k_bias=False)
        self.ls1, self.ls2 = LayerScale(dim, 0.5), LayerScale(dim, 0.5)
        self.mlp = DinoMlp(dim, 4 * dim)
        self.sample_drop_ratio = 0.0

    def forward(self, x, rope=None):
        x = self.norm1(x + self.ls1(self.attn(x, rope=rope)))
        return self.norm2(x + self.ls2(self.mlp(x)))

    def _forward_list(self, x_list, rope_list=None):
        return [self.forward(x, r) for x, r in zip(x_list, rope_list)]


class ResidualScaleBlock(DinoBlock):
    """dinov3's block with a learned residual scale: a parameter the fused seam would not read."""

    def __init__(self):
        super().__init__(DIM, HEADS)
        self.residual_scale = nn.Parameter(torch.full((DIM,), 0.5))

    def _forward_list(self, x_list, rope_list=None):
        out = []
        for x, rope in zip(x_list, rope_list):
            x = x * self.residual_scale + self.ls1(self.attn(self.norm1(x), rope=rope))
            out.append(x + self.ls2(self.mlp(self.norm2(x))))
        return out


ResidualScaleBlock.__name__ = ResidualScaleBlock.__qualname__ = "SelfAttentionBlock"


class GRN(nn.Module):
    """ConvNeXt V2's global response normalisation (channels last)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.rand(dim)), nn.Parameter(torch.rand(dim))

    def forward(self, x):
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


class Block(nn.Module):
    """A ConvNeXt V2 block: dinov3's names, GRN after the activation, no LayerScale."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ChannelsLastLayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.grn = GRN(4 * dim)
        self.gamma = None
        self.drop_path = nn.Identity()

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class NoLayerScaleBlock(nn.Module):
    """dinov3's ConvNeXt block names without LayerScale, defined by a user."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ChannelsLastLayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = None
        self.drop_path = nn.Identity()

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


NoLayerScaleBlock.__name__ = NoLayerScaleBlock.__qualname__ = "Block"


class LoraLinear(nn.Module):
    """A LoRA wrapper as PEFT builds one: the frozen base Linear plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank=4):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def _tokens(n=10):
    return torch.randn(2, n, DIM)


def _lora_attention():
    attn = DinoSelfAttention(DIM, HEADS, mask_k_bias=False)
    attn.qkv = LoraLinear(attn.qkv)
    return attn


def _kernel_5_block():
    block = ConvNeXtBlock(DIM)
    block.dwconv = nn.Conv2d(DIM, DIM, kernel_size=5, padding=2, groups=DIM)
    return block


def _random_layer_scales(module):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return module


# (name, module, its input, trusted, a phrase the reason must contain)
LOOKALIKES = {
    "qk-norm SelfAttention": (lambda: SelfAttention(), lambda: (_tokens(), {"rope": _rope()}), False,
                              "not in dinov3.layers.attention"),
    "qk-norm SelfAttention, trusted": (lambda: SelfAttention(), lambda: (_tokens(), {"rope": _rope()}), True,
                                       "extra submodules k_norm, q_norm"),
    "Mlp with SiLU": (lambda: Mlp(nn.SiLU()), lambda: (_tokens(), {}), True, "act is SiLU, not exact GELU"),
    "Mlp with tanh GELU": (lambda: Mlp(nn.GELU(approximate="tanh")), lambda: (_tokens(), {}), True,
                           "act is GELU, not exact GELU"),
    "Mlp with SiLU, untrusted": (lambda: Mlp(nn.SiLU()), lambda: (_tokens(), {}), False,
                                 "fastdino does not know its code"),
    "SwiGLUFFN, another hidden size rule": (lambda: SwiGLUFFN(), lambda: (_tokens(), {}), False,
                                            "not in dinov3.layers.ffn_layers"),
    "post-norm SelfAttentionBlock": (lambda: _random_layer_scales(SelfAttentionBlock()),
                                     lambda: (_tokens(), {"rope": _rope()}), False, "fastdino does not know"),
    "SelfAttentionBlock with a residual scale": (lambda: ResidualScaleBlock(),
                                                 lambda: ([_tokens()], {"rope_list": [_rope()]}), True,
                                                 "extra parameters or buffers residual_scale"),
    "ConvNeXt V2 block (GRN)": (lambda: Block(), lambda: (torch.randn(2, DIM, 9, 7), {}), True,
                                "extra submodules grn"),
    "ConvNeXt block, kernel 5": (_kernel_5_block, lambda: (torch.randn(2, DIM, 9, 7), {}), True,
                                 "not a 7x7 stride-1 conv"),
    "ConvNeXt block without LayerScale, user's": (lambda: NoLayerScaleBlock(),
                                                  lambda: (torch.randn(2, DIM, 9, 7), {}), False,
                                                  "not in dinov3.models.convnext"),
    "LoRA on qkv": (_lora_attention, lambda: (_tokens(), {"rope": _rope()}), True,
                    "qkv is LoraLinear, not nn.Linear"),
}


@pytest.mark.parametrize("name", LOOKALIKES)
def test_a_lookalike_is_left_alone_with_its_reason_and_computes_what_it_did(name):
    make, inputs, trusted, why = LOOKALIKES[name]
    module = make().eval()
    args, kwargs = inputs()
    call = module._forward_list if "rope_list" in kwargs else module
    with torch.no_grad():
        before = call(args, **kwargs)
    # trusted: the user vouches for the module that defines the class (and fastdino checks its parts)
    report = fastdino.patch(module, backend="ref", trust=[type(module).__module__] if trusted else ())
    assert not any(is_fused(m) for m in module.modules()), report.details()
    root = [s for s in report.skipped if s.path == ""]
    assert root and why in "; ".join(root[0].reasons), report.details()
    assert why in str(report)  # the summary shows the reason too
    with torch.no_grad():
        after = call(args, **kwargs)
    if isinstance(before, list):
        before, after = torch.stack(before), torch.stack(after)
    assert torch.equal(before, after)


def test_the_same_classes_trusted_are_swapped():
    """The control: the stand-ins these look-alikes differ from are swapped when trusted, and
    left alone with the origin reason when not."""
    block = DinoBlock(DIM, HEADS).eval()
    swapped = {s.original for s in patch_trusted(block).swapped}
    assert swapped == {"SelfAttentionBlock", "SelfAttention", "Mlp"}
    fastdino.unpatch(block)
    report = fastdino.patch(block)
    assert not report.swapped
    assert all("trust=['models.dinov3_official']" in "; ".join(s.reasons) for s in report.skipped)


def test_peft_lora_on_qkv_is_left_alone():
    peft = pytest.importorskip("peft")
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=1,
                                           intermediate_size=2 * DIM, image_size=32, patch_size=16)).eval()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = lora(pixel_values=pixels).last_hidden_state
    report = fastdino.patch(lora, cache=False)
    attention = [s for s in report.skipped if s.cls == "DINOv3ViTAttention"]
    assert attention and "q_proj is not an nn.Linear" in "; ".join(attention[0].reasons), report.details()
    with torch.no_grad():
        assert torch.equal(lora(pixel_values=pixels).last_hidden_state, before)


# -- origin: library release, dinov3's code digest, replaced methods ------------------------------


def _hf_vit():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    return DINOv3ViTModel(DINOv3ViTConfig(hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=1,
                                          intermediate_size=2 * DIM, image_size=32, patch_size=16)).eval()


def _first(model, cls):
    return next(m for m in model.modules() if type(m).__name__ == cls)


def test_a_library_release_outside_the_range_is_left_alone(monkeypatch):
    monkeypatch.setattr(sources, "library_version", lambda library: "6.1.0")
    report = fastdino.patch(_hf_vit())
    assert not report.swapped
    assert "transformers 6.1.0 is outside the releases" in str(report)
    monkeypatch.setattr(sources, "library_version", lambda library: "4.55.4")
    assert not fastdino.patch(_hf_vit()).swapped
    monkeypatch.setattr(sources, "library_version", lambda library: "4.56.0")
    assert fastdino.patch(_hf_vit()).swapped  # the control: the lowest release in the range


def test_a_method_replaced_on_a_known_class_is_left_alone(monkeypatch):
    from transformers.models.dinov3_vit import modeling_dinov3_vit as hf

    def forward(self, x):  # a user's monkeypatch of the MLP
        return self.down_proj(self.act_fn(self.up_proj(x)) * 2)

    monkeypatch.setattr(hf.DINOv3ViTMLP, "forward", forward)
    report = fastdino.patch(_hf_vit())
    mlp = [s for s in report.skipped if s.cls == "DINOv3ViTMLP"]
    assert mlp and "DINOv3ViTMLP.forward was replaced by tests.test_lookalikes" in mlp[0].reasons[0]


@pytest.fixture
def dinov3_package(tmp_path, monkeypatch):
    """A package named dinov3 on sys.path whose layers.attention defines a SelfAttention (not the
    repository's code): the digest check must refuse it."""
    layers = tmp_path / "dinov3" / "layers"
    layers.mkdir(parents=True)
    (tmp_path / "dinov3" / "__init__.py").write_text("")
    (layers / "__init__.py").write_text("")
    (layers / "attention.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn


        class SelfAttention(nn.Module):
            def __init__(self, dim, num_heads):
                super().__init__()
                self.num_heads = num_heads
                self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
                self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)

            def forward(self, x, attn_bias=None, rope=None):
                B, N, C = x.shape
                q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).transpose(1, 3).unbind(2)
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
                return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
    '''))
    depth = tmp_path / "dinov3" / "eval" / "depth" / "models"
    depth.mkdir(parents=True)
    for d in (depth.parent.parent, depth.parent, depth):
        (d / "__init__.py").write_text("")
    (depth / "linear_head.py").write_text(textwrap.dedent('''
        from torch import nn


        class LinearHead(nn.Module):
            """A depth head with the segmentation head's parts: bins, not classes."""

            def __init__(self, channels, bins):
                super().__init__()
                self.batchnorm_layer = nn.BatchNorm2d(channels)
                self.conv = nn.Conv2d(channels, bins, kernel_size=1)
                self.dropout = nn.Dropout2d(0.0)

            def _forward_feature(self, inputs):
                return inputs[0]

            def forward(self, inputs):
                return self.conv(self.batchnorm_layer(self._forward_feature(inputs))).softmax(1)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n == "dinov3" or n.startswith("dinov3.")]:
        del sys.modules[name]


def test_dinov3_code_that_differs_from_the_known_commit_is_left_alone(dinov3_package):
    from dinov3.layers.attention import SelfAttention as Changed

    module = Changed(DIM, HEADS).eval()
    x = _tokens()
    with torch.no_grad():
        before = module(x)
    report = fastdino.patch(module, backend="ref")
    assert not report.swapped
    assert f"code differs from dinov3 at {sources.DINOV3_COMMIT[:10]}" in report.skipped[0].reasons[0]
    with torch.no_grad():
        assert torch.equal(module(x), before)
    # Trusting it is the user's word that it is dinov3's code: the structure checks still apply.
    fastdino.patch(module, trust=["dinov3.layers"])
    assert is_fused(module)


def test_dinov3_depth_linear_head_is_left_alone(dinov3_package):
    from dinov3.eval.depth.models.linear_head import LinearHead

    head = LinearHead(DIM, 8).eval()
    with torch.no_grad():
        head.batchnorm_layer.running_var.uniform_(0.5, 2.0)
    features = [torch.randn(2, DIM, 5, 6)]
    with torch.no_grad():
        before = head(features)
    report = fastdino.patch(head)
    assert not report.swapped
    assert "not in dinov3.eval.segmentation.models.heads.linear_head" in report.skipped[0].reasons[0]
    with torch.no_grad():
        assert torch.equal(head(features), before)


def test_the_digest_ignores_comments_formatting_and_docstrings_not_code():
    base = "class A:\n    def f(self, x):\n        return g(x) + 1\n\ndef g(x):\n    return x * 2\n"
    same = ('class A:\n    """Doc."""\n    def f(self, x):  # comment\n'
            '        return (g(x)\n                + 1)\n'
            '\n\ndef g(x):\n    return x * 2\n')
    changed_helper = base.replace("x * 2", "x * 3")
    changed_method = base.replace("+ 1", "+ 2")
    digest = sources.source_digest(base, "A")
    assert digest == sources.source_digest(same, "A")
    assert digest != sources.source_digest(changed_helper, "A")  # a module-level function it calls
    assert digest != sources.source_digest(changed_method, "A")
    assert sources.source_digest(base, "B") is None


# -- hooks and trust ------------------------------------------------------------------------------


def test_a_hook_on_a_part_the_fused_forward_skips_leaves_the_module_alone():
    model = _hf_vit()
    layer = _first(model, "DINOv3ViTLayer")
    seen = []
    layer.norm2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=pixels).last_hidden_state
    report = fastdino.patch(model, cache=False)  # untuned on CPU: the fused forms run the model's code
    skipped = {s.cls: s.reasons for s in report.skipped}
    assert "hooks on norm2" in skipped["DINOv3ViTLayer"][0]
    assert is_fused(layer.attention)  # a hook below the layer does not stop its attention's swap
    seen.clear()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, before)
    assert seen  # the hook ran


def test_a_hook_on_the_mlp_runs_after_patching():
    model = _hf_vit()
    mlp = _first(model, "DINOv3ViTLayer").mlp
    seen = []
    mlp.register_forward_hook(lambda m, args, out: seen.append(1))
    fastdino.patch(model, backend="cpu")
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert is_fused(mlp) and seen == [1]


def test_global_module_hooks_leave_everything_alone():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        report = fastdino.patch(_hf_vit())
    finally:
        handle.remove()
    assert not report.swapped
    assert "global module hooks" in str(report)


@pytest.mark.parametrize("trust", ["models", [""], [None]])
def test_trust_must_be_a_list_of_module_names(trust):
    with pytest.raises(ValueError, match="trust must be a list of module names"):
        fastdino.patch(nn.Linear(2, 2), trust=trust)


def test_trust_lasts_for_one_patch_call():
    patch_trusted(DinoBlock(DIM, HEADS))
    assert sources.TRUSTED == ()
    assert not fastdino.patch(DinoBlock(DIM, HEADS)).swapped
    assert TRUST == ["models"]


@pytest.mark.skipif(not os.environ.get("DINOV3_REPO"),
                    reason="set DINOV3_REPO to a facebookresearch/dinov3 checkout")
def test_the_known_digests_are_those_of_the_dinov3_checkout():
    """The digests fastdino keeps are those of the dinov3 code at the commit it names: compute them
    from a checkout of it (scripts/gpu_run.sh fetches one for the segmentor benchmark)."""
    root = os.environ["DINOV3_REPO"]
    modules = {
        "SelfAttentionBlock": "layers.block", "SelfAttention": "layers.attention",
        "RopePositionEmbedding": "layers.rope_position_encoding", "Mlp": "layers.ffn_layers",
        "SwiGLUFFN": "layers.ffn_layers", "LayerScale": "layers.layer_scale", "Block": "models.convnext",
        "LayerNorm": "models.convnext", "LinearHead": "eval.segmentation.models.heads.linear_head",
        "MSDeformAttn": "eval.segmentation.models.utils.ms_deform_attn",
        "MultiScaleMaskedTransformerDecoder":
            "eval.segmentation.models.heads.mask2former_transformer_decoder",
        "MSDeformAttnPixelDecoder": "eval.segmentation.models.heads.pixel_decoder",
        "DINOv3_Adapter": "eval.segmentation.models.backbone.dinov3_adapter",
    }
    assert set(modules) == {name for name, _ in sources.DINOV3_DIGESTS}
    for name, digest in sources.DINOV3_DIGESTS:
        path = os.path.join(root, "dinov3", *modules[name].split(".")) + ".py"
        with open(path) as f:
            assert sources.source_digest(f.read(), name) == digest, name


def test_of_two_rules_for_a_class_name_the_report_gives_the_one_that_got_furthest():
    """timm's Mlp with an active hidden norm: dinov3's Mlp rule fails on structure, timm's on the
    norm; the report names the norm (a trusted stand-in of timm's class)."""
    from models.timm_eva import Mlp as TimmMlp

    mlp = TimmMlp(DIM, 4 * DIM)
    mlp.norm = nn.LayerNorm(4 * DIM)
    report = patch_trusted(mlp)
    assert not report.swapped and report.skipped[0].reasons == ["norm is active"], report.details()
