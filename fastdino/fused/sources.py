"""Where a class fastdino swaps must come from: a known library's module, at a release (or, for the
dinov3 repository, which has no releases, a code digest) that the fused form was written against.

A class name alone proves nothing: many vision codebases define `Mlp`, `Block`, `SelfAttention` or
`LayerNorm` with other math. So a module is swapped only when its class is defined in one of the
modules its rule names and the library is in the rule's range, or when the user vouches for the
module that defines it (`fastdino.patch(model, trust=[...])`: a vendored copy). The fused form's
structure checks apply either way.
"""

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Optional

# Module names (or packages) whose classes the running fastdino.patch treats as copies of the
# libraries' classes: set by patch(model, trust=...) for the duration of the call.
TRUSTED: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """The library code a fused form was written against.

    `modules`: the modules that define the classes it swaps. `versions`: the release range
    (low <= version < high) whose forward code the fused form follows, for libraries with
    releases. `digests`: for code without releases (the dinov3 repository), {class name: digest of
    the class's code} at the commit read (`commit`); a class whose code differs is left alone."""

    library: str
    modules: tuple[str, ...]
    versions: Optional[tuple[str, str]] = None
    digests: tuple[tuple[str, str], ...] = ()
    commit: str = ""

    def __str__(self) -> str:
        where = " or ".join(self.modules)
        if self.versions:
            return f"{self.library} {self.versions[0]} to <{self.versions[1]} ({where})"
        return f"{self.library} ({where})"


# transformers 4.56 to 5.x: DINOv3 arrived in 4.56; the forwards followed were read in 4.56 and 5.x
# (CI tests the lowest and the newest)
TRANSFORMERS_RELEASES = ("4.56", "6")


def transformers(*models: str) -> Source:
    """transformers' modeling files of `models` (e.g. "dinov3_vit")."""
    return Source("transformers", tuple(f"transformers.models.{m}.modeling_{m}" for m in models),
                  TRANSFORMERS_RELEASES)


def timm(*modules: str) -> Source:
    """timm's `modules` (e.g. "models.eva"), 1.0.26 to 1.x: the DINOv3 Eva models arrived in
    1.0.20, but the fused forms follow 1.0.26's EvaAttention (head_dim kept) and forwards (is_causal)."""
    return Source("timm", tuple(f"timm.{m}" for m in modules), ("1.0.26", "2"))


# The dinov3 repository (github.com/facebookresearch/dinov3) as fastdino's fused forms follow it:
# its code at this commit; code_digest() of each class swapped (and of the parts checked by class).
DINOV3_COMMIT = "6876159a11b4df116f30f667f8c9888617df0751"
DINOV3_DIGESTS = (
    ("SelfAttentionBlock", "7a3ac676bd27c25e"),  # dinov3.layers.block
    ("SelfAttention", "55aa99dc43fbc8b5"),  # dinov3.layers.attention
    ("RopePositionEmbedding", "0acaa2bd54ea9f7d"),  # dinov3.layers.rope_position_encoding
    ("Mlp", "8bcd567196a45e8e"),  # dinov3.layers.ffn_layers
    ("SwiGLUFFN", "c073a13308c9d47a"),  # dinov3.layers.ffn_layers
    ("LayerScale", "0a9239b0a92b8513"),  # dinov3.layers.layer_scale
    ("Block", "ea283f9d1f2c3a39"),  # dinov3.models.convnext
    ("LayerNorm", "d4ec44f1dfdc19b1"),  # dinov3.models.convnext
    ("LinearHead", "3009187e6a4508fb"),  # dinov3.eval.segmentation.models.heads.linear_head
    ("MSDeformAttn", "7b9fb743b705954d"),  # dinov3.eval.segmentation.models.utils.ms_deform_attn
    ("MultiScaleMaskedTransformerDecoder", "5c00fd7d5b427b00"),  # ...heads.mask2former_transformer_decoder
    ("MSDeformAttnPixelDecoder", "43c90605490d20b5"),  # dinov3.eval.segmentation.models.heads.pixel_decoder
    ("DINOv3_Adapter", "c25755b1848c4b5e"),  # dinov3.eval.segmentation.models.backbone.dinov3_adapter
)


def dinov3(*modules: str) -> Source:
    return Source("dinov3", tuple(f"dinov3.{m}" for m in modules), digests=DINOV3_DIGESTS,
                  commit=DINOV3_COMMIT)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


@functools.cache
def library_version(library: str) -> Optional[str]:
    module = sys.modules.get(library)
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            return None
    return str(version)


def is_trusted(cls: type) -> bool:
    return any(cls.__module__ == m or cls.__module__.startswith(m + ".") for m in TRUSTED)


def is_from(obj, name: str, source: Source) -> bool:
    """Whether obj is an instance of the class `name` of `source` (or of a trusted copy)."""
    cls = type(obj)
    return cls.__name__ == name and (cls.__module__ in source.modules or is_trusted(cls))


def origin_reasons(cls: type, source: Source) -> list[str]:
    """Why `cls` is not the class of `source` that fastdino's fused form follows ([] if it is)."""
    if is_trusted(cls):
        return []
    if cls.__module__ not in source.modules:
        return [f"{cls.__name__} is defined in {cls.__module__}, not in {' or '.join(source.modules)}: "
                f"fastdino does not know its code (patch(model, trust=[{cls.__module__!r}]) swaps it if it "
                f"is a copy of {source.library}'s)"]
    if source.versions:
        version = library_version(source.library)
        low, high = source.versions
        if version is None or not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
            return [f"{source.library} {version} is outside the releases fastdino's fused {cls.__name__} "
                    f"follows ({low} to <{high})"]
    known = dict(source.digests)
    if cls.__name__ in known and cls.__module__.startswith(source.library + "."):
        digest = code_digest(cls)
        if digest != known[cls.__name__]:
            return [f"{cls.__name__}'s code differs from {source.library} at {source.commit[:10]}, the code "
                    f"fastdino's fused form follows (digest {digest}, expected {known[cls.__name__]})"]
    return []


def method_reasons(cls: type, names, source: Source) -> list[str]:
    """Methods the fused form replaces or relies on that code outside the library has replaced on
    the class (a monkeypatch): their code is not what the fused form follows. (The library's own
    decorators and base classes, and torch's, are its code.)"""
    if is_trusted(cls):
        return []
    out = []
    for name in names:
        fn = getattr(cls, name, None)
        module = getattr(fn, "__module__", None) or ""
        own = module in source.modules or module.split(".")[0] in (source.library, "torch")
        if fn is not None and module and not own:
            out.append(f"{cls.__name__}.{name} was replaced by {module}.{getattr(fn, '__qualname__', name)}")
    return out


@functools.cache
def code_digest(cls: type) -> Optional[str]:
    """The digest of a class's code as source_digest gives it; None where its source is unreadable."""
    module = sys.modules.get(cls.__module__)
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    return source_digest(text, cls.__name__)


def source_digest(text: str, name: str) -> Optional[str]:
    """sha256 (16 hex digits) of class `name` in the module source `text`, with the module-level
    functions and classes its code names (a decoder's layer classes), as ast.unparse writes them
    without docstrings: comments, formatting and docstrings do not count, any change to the code
    does."""
    tree = ast.parse(text)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        return None
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in used
                 and n is not node]
    for n in ast.walk(ast.Module(body=[node, *functions], type_ignores=[])):
        body = getattr(n, "body", None)
        if (isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            n.body = body[1:] or [ast.Pass()]
    code = "\n".join(ast.unparse(n) for n in (node, *functions))
    return hashlib.sha256(code.encode()).hexdigest()[:16]
