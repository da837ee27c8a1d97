"""Model stand-ins for the tests: module trees written to the structure, class names and forward
signatures of the official facebookresearch/dinov3 code (ViT, ViT-Adapter, Mask2Former head) and
of timm's Eva (the DINOv3 ViTs), so that `fastdino.patch` sees what it sees in those libraries
when they are not installed. Random init; no weights."""

import fastdino

# The stand-ins are copies of dinov3's and timm's classes in another module: fastdino swaps them
# only when trusted, as a user trusts a vendored copy.
TRUST = ["models"]


def patch_trusted(model, **options):
    """fastdino.patch(model, trust=TRUST, **options)."""
    return fastdino.patch(model, trust=TRUST, **options)


def require_transformers(name: str, release: str):
    """Skip the calling test where the installed transformers predates `release`, the first with
    `name` (fastdino supports transformers 4.56 to 5.x; CI runs the lowest and the newest)."""
    import pytest
    import transformers

    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name} (added in {release})")
