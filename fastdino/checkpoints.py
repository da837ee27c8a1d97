"""DINOv3 ViT checkpoints for the demo: a transformers DINOv3ViTModel from a state_dict in either key
layout (transformers', or the official dinov3 `.pth` files'), its size read off the weights."""

import re

import torch

# Keys of the official layout (dinov3/models/vision_transformer.py, github.com/facebookresearch/dinov3)
# with no counterpart in transformers' model.
OFFICIAL_DROPPED = re.compile(r"^(rope_embed\.periods|blocks\.\d+\.attn\.qkv\.bias_mask|cls_norm\..*|"
                              r"local_cls_norm\..*|head\..*)$")
ACCEPTED = ("a transformers DINOv3ViTModel state_dict (keys embeddings.*, layer.N.* or model.layer.N.*) "
            "or an official dinov3 ViT checkpoint (keys cls_token, storage_tokens, patch_embed.*, "
            "blocks.N.*), any of ViT-S/B/L/16 and their + variants, as a .pth/.pt/.bin/.safetensors "
            "file; or a transformers model directory")


def is_official(state: dict) -> bool:
    return "cls_token" in state and any(k.startswith("blocks.") for k in state)


def official_to_transformers(state: dict) -> dict:
    """The official layout renamed to transformers' DINOv3ViTModel (hub) names: qkv split into
    q/k/v (the K bias dropped: transformers has none), LayerScale gamma -> lambda1, fc1/fc2 ->
    up/down_proj, w1/w2/w3 -> gate/up/down_proj, storage tokens -> register tokens."""
    out = {}
    for key, value in state.items():
        if OFFICIAL_DROPPED.match(key):
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if m is None:
            renamed = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
                       "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
                       "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
                       "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
            if key == "mask_token":
                out["embeddings.mask_token"] = value.reshape(1, 1, -1)
            elif key in renamed:
                out[renamed[key]] = value
            else:
                raise ValueError(f"--weights: unexpected key {key!r} in an official dinov3 checkpoint")
            continue
        i, rest = m.groups()
        prefix = f"layer.{i}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            q, k, v = value.chunk(3, dim=0)
            kind = rest.rsplit(".", 1)[1]
            out[prefix + f"attention.q_proj.{kind}"] = q
            out[prefix + f"attention.v_proj.{kind}"] = v
            if kind == "weight":
                out[prefix + "attention.k_proj.weight"] = k
            continue
        for old, new in (("attn.proj.", "attention.o_proj."), ("ls1.gamma", "layer_scale1.lambda1"),
                         ("ls2.gamma", "layer_scale2.lambda1"), ("mlp.fc1.", "mlp.up_proj."),
                         ("mlp.fc2.", "mlp.down_proj."), ("mlp.w1.", "mlp.gate_proj."),
                         ("mlp.w2.", "mlp.up_proj."), ("mlp.w3.", "mlp.down_proj."), ("norm1.", "norm1."),
                         ("norm2.", "norm2.")):
            if rest.startswith(old):
                out[prefix + new + rest[len(old):]] = value
                break
        else:
            raise ValueError(f"--weights: unexpected key {key!r} in an official dinov3 checkpoint")
    return out


def config_from_state(state: dict, head_dim: int = 64) -> dict:
    """DINOv3ViTConfig arguments read off transformers-named weights (hub names, layer.N.*). The
    head count is not in the weights: `head_dim` (64 in every released ViT but 7B's 128)."""
    width = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layer\.(\d+)\.", k)))
    gated = "layer.0.mlp.gate_proj.weight" in state
    patch = state["embeddings.patch_embeddings.weight"].shape[-1]
    registers = state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0
    return dict(hidden_size=width, intermediate_size=state["layer.0.mlp.up_proj.weight"].shape[0],
                num_hidden_layers=layers, num_attention_heads=width // head_dim,
                num_register_tokens=registers,
                patch_size=patch, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                query_bias="layer.0.attention.q_proj.bias" in state,
                value_bias="layer.0.attention.v_proj.bias" in state,
                key_bias="layer.0.attention.k_proj.bias" in state, layer_norm_eps=1e-5, rope_theta=100.0)


def load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def vit_from_state_dict(state: dict):
    """A transformers DINOv3ViTModel holding `state` (either layout), sized from the weights."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cls = state.get("embeddings.cls_token", state.get("cls_token"))
    head_dim = 128 if cls is not None and cls.shape[-1] == 4096 else 64
    if is_official(state):
        if "rope_embed.periods" in state:  # (head_dim / 4,): the one place the head count shows
            head_dim = 4 * state["rope_embed.periods"].numel()
        state = official_to_transformers(state)
    # transformers 5.x nests the layers under model.: accept both, build from hub names
    state = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in state.items()}
    if "embeddings.cls_token" not in state or "layer.0.mlp.up_proj.weight" not in state:
        raise ValueError(f"--weights: not a DINOv3 ViT checkpoint; fastdino demo accepts {ACCEPTED}")
    model = DINOv3ViTModel(DINOv3ViTConfig(**config_from_state(state, head_dim)))
    prefix = "model." if any(k.startswith("model.layer.") for k in model.state_dict()) else ""
    state = {(prefix + k if k.startswith("layer.") else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--weights: keys that do not fit a DINOv3ViTModel: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; fastdino demo accepts {ACCEPTED}")
    return model
