"""Models by name for the command line, and their export: `fastdino export MODEL --out model.pt2`.

A MODEL is one of `fastdino bench`'s names (random weights), a transformers checkpoint (a
directory with a config.json, or a hub id prefixed `hf:`), or `package.module:function`, a
function that returns the model (called without arguments; the model is then put in eval mode).
"""

import importlib
import inspect
import os
import sys
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .verify import _leaves, class_maps


def load_model(spec: str, resolution: int = 512, device="cpu",
               dinov3_repo: Optional[str] = None) -> nn.Module:
    """The model SPEC names, in eval mode on `device` (see the module docstring)."""
    from .bench.models import MODELS, build

    if spec in MODELS:
        return build(spec, resolution, 1, device, dinov3_repo).model.eval()
    if spec.startswith("hf:") or os.path.isfile(os.path.join(spec, "config.json")):
        import transformers

        path = spec[3:] if spec.startswith("hf:") else spec
        try:  # Mask2Former, EoMT, ...; a backbone (DINOv3ViT, DINOv3ConvNext) has no such head
            model = transformers.AutoModelForUniversalSegmentation.from_pretrained(path)
        except ValueError:
            model = transformers.AutoModel.from_pretrained(path)
        return model.to(device).eval()
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"model {spec!r}: not a fastdino bench name ({', '.join(MODELS)}), a transformers "
                         "checkpoint directory or hf:<hub id>, nor package.module:function")
    model = getattr(importlib.import_module(module), name)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {module}.{name}() returned a {type(model).__name__}, "
                         "not an nn.Module")
    return model.to(device).eval()


def input_name(model: nn.Module) -> str:
    """The name of the forward's first argument (pixel_values, x, ...): the images go there."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise ValueError(f"{type(model).__name__}.forward takes no positional argument for the images")
    return params[0].name


def named_outputs(out: Any) -> dict[str, Tensor]:
    """Every tensor of a model output by dotted name, in a fixed order; a lone tensor is "output"."""
    return {name or "output": t for name, t in _leaves(out).items()}


class Outputs(nn.Module):
    """The model with the images as its one positional input and its output tensors as a flat
    tuple (the order of `names`): what an exported program and an AOTInductor package return."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] = ()):
        super().__init__()
        self.model, self.arg, self.names = model, input_name(model), names

    def forward(self, images: Tensor):
        leaves = named_outputs(self.model(**{self.arg: images}))
        return tuple(leaves[n] for n in self.names) if self.names else tuple(leaves.values())


def class_map(outputs: dict[str, Tensor]) -> Optional[Tensor]:
    """(B, H, W) class indices from a model's named outputs (fastdino.verify.class_maps: Mask2Former/
    EoMT semantic inference, or the argmax of (B, classes, H, W) logits); None for a backbone."""
    return next(iter(class_maps(outputs).values()), None)


def features(outputs: dict[str, Tensor]) -> Tensor:
    """(B, D) image features of a backbone: its pooler output, else the mean of its last hidden
    state (tokens) or of its last feature map."""
    if "pooler_output" in outputs:
        return outputs["pooler_output"].float()
    last = outputs.get("last_hidden_state", next(iter(outputs.values())))
    return last.float().mean(1) if last.dim() == 3 else last.float().flatten(2).mean(2)


def export(model: nn.Module, example: Tensor, out: str, aoti: bool = True, max_batch: int = 64) -> list[str]:
    """Export the (patched) model with a dynamic batch dimension: an AOTInductor package (`aoti`)
    or a torch.export program saved with torch.export.save. Returns the names of the outputs, in
    the order the package or program returns them (stored in the package's metadata as
    `fastdino.outputs`)."""
    with torch.no_grad():
        names = tuple(named_outputs(model(**{input_name(model): example})))
        wrapped = Outputs(model, names)
        program = torch.export.export(wrapped, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=max_batch)},))
    if aoti:
        torch._inductor.aoti_compile_and_package(
            program, package_path=out,
            inductor_configs={"aot_inductor.metadata": {"fastdino.outputs": ",".join(names)}})
    else:
        torch.export.save(program, out)
    return list(names)


MODEL_HELP = ("a fastdino bench name (random weights), a transformers checkpoint directory or hf:<hub id>, "
              "or package.module:function returning the model")


def add_export_arguments(parser):
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--out", required=True, help="the file to write (model.pt2)")
    parser.add_argument("--format", choices=("aoti", "program"), default="aoti",
                        help="aoti: an AOTInductor package (torch._inductor.aoti_load_package loads it); "
                             "program: the torch.export program (torch.export.load), default aoti")
    parser.add_argument("--resolution", type=int, default=512, help="square input side of the example (512)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the traced example (2; the batch "
                                                             "dimension stays dynamic)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda where available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and example in this dtype (default float32)")
    parser.add_argument("--backend", default=None,
                        help="pin a backend (fastdino.patch's backend=); default: what dispatch picks for "
                             "the traced shapes, from the timing cache where it has them")
    parser.add_argument("--dinov3-repo", default=None, help="a facebookresearch/dinov3 checkout, for the "
                                                            "official-* names")


def export_main(args) -> int:
    from .patch import patch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    try:
        model = load_model(args.model, args.resolution, device, args.dinov3_repo).to(dtype)
    except (ValueError, ImportError, AttributeError, OSError) as e:
        print(f"fastdino export: {e}", file=sys.stderr)
        return 2
    print(patch(model, backend=args.backend), flush=True)
    torch.manual_seed(0)
    example = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)
    names = export(model, example, args.out, aoti=args.format == "aoti", max_batch=args.max_batch)
    print(f"wrote {args.out} ({args.format}): input images (batch 1..{args.max_batch}, 3, {args.resolution}, "
          f"{args.resolution}) {args.dtype} on {device}; outputs, in order: {', '.join(names)}")
    return 0
