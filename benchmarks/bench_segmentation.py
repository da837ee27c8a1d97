"""Segmentation heads with masked attention (transformers, random init, bf16), side by side:

  eomt-s, eomt-l   EomtDinov3ForUniversalSegmentation, DINOv3 ViT-S/16 or ViT-L/16, 200 queries, 4 masked
                   blocks (COCO panoptic setting), at --eomt-resolutions; --eomt-masks on keeps the masked
                   blocks running (attn_mask_probs = 1, as in training), off is EoMT's inference setting
  m2f-decoder      Mask2Former's transformer decoder (Mask2FormerTransformerModule: 9 masked-attention
                   layers, hidden 256, 8 heads, 100 queries) on the pyramid of a --m2f-resolutions image
                   (levels at 1/32, 1/16, 1/8, mask features at 1/4)
  convnext-t/s/b/l DINOv3 ConvNeXt (transformers' DINOv3ConvNextBackbone, last stage) + the linear head
                   as dinov3 builds it (BatchNorm + 1x1 conv, 150 ADE20K classes, upsampled x4), channels-last
                   model and input (the fair eager baseline), at --convnext-resolutions; extra variants
                   fastdino-cuda (fused_linear pinned too)
  m2f-pixel        Mask2Former's pixel decoder (6 deformable encoder layers, 256 wide, 8 heads) on a
                   Swin-T-wide pyramid (1/4 .. 1/32) of a --m2f-resolutions image, in fp32, with the extra
                   variant fastdino-bf16 (precision="bf16"); then fastdino.verify of a whole random-init
                   Mask2Former (Swin backbone) with the bf16 policy: errors and argmax agreement

Variants: eager, compile (torch.compile default), fastdino (fastdino.patch). Reports ms per batch,
img/s (FPS at batch 1), peak memory and each variant's error against eager. Usage (GPU):
  python benchmarks/bench_segmentation.py --json out.json
"""

import argparse
import json
import sys

import torch
from bench_backbone import commit_meta, markdown, run_variants

import fastdino
from fastdino.bench.models import CONVNEXT as CONVNEXT_SIZES
from fastdino.bench.models import ConvNeXtLinear

EOMT = {
    "eomt-s": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    "eomt-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
}
VARIANTS = ["eager", "compile", "fastdino"]
CONVNEXT = [f"convnext-{size}" for size in CONVNEXT_SIZES]  # + dinov3's linear head
PYRAMID = [96, 192, 384, 768]  # Swin-T's channels at 1/4 .. 1/32


def eomt(name, res, masks, dtype):
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    cfg = EomtDinov3Config(**EOMT[name], image_size=res, patch_size=16, num_queries=200, num_blocks=4,
                           num_labels=133)
    torch.manual_seed(0)
    model = EomtDinov3ForUniversalSegmentation(cfg).to("cuda", dtype).eval()
    model.attn_mask_probs.fill_(1.0 if masks == "on" else 0.0)
    return model


def convnext_linear(name, dtype):
    torch.manual_seed(0)
    model = ConvNeXtLinear(name.split("-")[1])
    return model.to("cuda", dtype, memory_format=torch.channels_last).eval()


def m2f_decoder(dtype):
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

    torch.manual_seed(0)
    cfg = Mask2FormerConfig(hidden_dim=256, num_attention_heads=8, dim_feedforward=2048, decoder_layers=10,
                            num_queries=100)
    return Mask2FormerTransformerModule(in_features=256, config=cfg).to("cuda", dtype).eval()


def m2f_pixel_decoder():
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    torch.manual_seed(0)
    return Mask2FormerPixelDecoder(Mask2FormerConfig(), feature_channels=PYRAMID).to("cuda").eval()


def verify_bf16(res, batch):
    """fastdino.verify of a whole random-init Mask2Former (default Swin backbone) with the bf16 policy."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(num_labels=150)).to("cuda").eval()  # ADE20K
    report = fastdino.verify(model, {"pixel_values": torch.randn(batch, 3, res, res, device="cuda")},
                             precision="bf16")
    print(f"fastdino.verify, Mask2Former (Swin) {res}px b{batch}, precision bf16:\n{report}", flush=True)
    return dict(resolution=res, batch=batch, worst_rel=report.worst_rel, min_agreement=report.min_agreement,
                errors=[vars(e) for e in report.errors], agreement=[vars(a) for a in report.agreement])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="eomt-s,eomt-l,m2f-decoder,m2f-pixel,convnext-t")
    p.add_argument("--eomt-resolutions", default="640")
    p.add_argument("--eomt-masks", default="on,off")
    p.add_argument("--m2f-resolutions", default="512,896")
    p.add_argument("--convnext-resolutions", default="512,224")
    p.add_argument("--batches", default="1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_segmentation needs a CUDA device", file=sys.stderr)
        return 1
    dtype, variants, rows, checks = torch.bfloat16, args.variants.split(","), [], []
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            if name == "m2f-pixel":
                model = m2f_pixel_decoder()
                for res in map(int, args.m2f_resolutions.split(",")):
                    feats = [torch.randn(batch, c, res // s, res // s, device="cuda")
                             for c, s in zip(PYRAMID, (4, 8, 16, 32))]
                    row = dict(model=name, resolution=res, batch=batch, dtype="torch.float32")
                    rows += run_variants(model, lambda m: m(feats).mask_features,
                                         variants + ["fastdino-bf16"],
                                         args.iters, row)
                    checks.append(verify_bf16(res, batch))
                continue
            if name == "m2f-decoder":
                model = m2f_decoder(dtype)
                for res in map(int, args.m2f_resolutions.split(",")):
                    feats = [torch.randn(batch, 256, res // s, res // s, device="cuda", dtype=dtype)
                             for s in (32, 16, 8)]
                    mask_features = torch.randn(batch, 256, res // 4, res // 4, device="cuda", dtype=dtype)
                    row = dict(model=name, resolution=res, batch=batch, dtype=str(dtype))
                    rows += run_variants(model, lambda m: m(feats, mask_features).masks_queries_logits[-1],
                                         variants, args.iters, row)
                continue
            if name in CONVNEXT:
                model = convnext_linear(name, dtype)
                for res in map(int, args.convnext_resolutions.split(",")):
                    pixels = torch.randn(batch, 3, res, res, device="cuda", dtype=dtype)
                    pixels = pixels.to(memory_format=torch.channels_last)
                    row = dict(model=f"{name} + linear", resolution=res, batch=batch, dtype=str(dtype))
                    rows += run_variants(model, lambda m: m(pixels), variants + ["fastdino-cuda"], args.iters,
                                         row)
                del model
                torch.cuda.empty_cache()
                continue
            for res in map(int, args.eomt_resolutions.split(",")):
                for masks in args.eomt_masks.split(","):
                    model = eomt(name, res, masks, dtype)
                    pixels = torch.randn(batch, 3, res, res, device="cuda", dtype=dtype)
                    row = dict(model=f"{name} masks {masks}", resolution=res, batch=batch, dtype=str(dtype))
                    rows += run_variants(model, lambda m: m(pixel_values=pixels).masks_queries_logits,
                                         variants,
                                         args.iters, row)
                    del model
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": commit_meta(), "rows": rows, "verify": checks}, f, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
