import os

import helpers  # noqa: F401  (first: sets TRITON_INTERPRET on CPU before fastdino.kernels loads)
import pytest
import torch

import fastdino
from fastdino import _ext


def pytest_report_header(config):
    ext = f"loaded {_ext.BUILD}" if _ext.HAS_EXT else _ext.EXT_ERROR
    return f"fastdino {fastdino.__version__}: extension {ext}"


def pytest_sessionstart(session):
    # A run that silently lost the extension would skip every C++ test: refuse it unless the
    # no-extension build was asked for (FASTDINO_BUILD_EXT=0).
    if not _ext.HAS_EXT and os.environ.get("FASTDINO_BUILD_EXT") != "0":
        raise pytest.UsageError(
            f"fastdino._C did not load ({_ext.EXT_ERROR}); install with `pip install .` and run `pytest` "
            "from a shell where that install is the one imported (or set FASTDINO_BUILD_EXT=0)"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _timing_cache(tmp_path_factory, monkeypatch):
    """Each test its own empty timing cache: what one test tunes (the demo does) never steers another."""
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path_factory.mktemp("fastdino-cache")))




# Cases of parametrized model tests in the quick subset (`pytest -m quick`), by file::name: one
# per family and kernel backend. The op tests mark theirs where they are defined (quick_cases).
QUICK = {
    "test_patch.py::test_patched_model_matches_original[hf-cpu]",
    "test_patch.py::test_patched_model_matches_original[timm-tree-triton]",
    "test_patch.py::test_unpinned_patch_runs_the_kernels_dispatch_picks[hf]",
    "test_patch_convnext.py::test_patched_convnext_matches_original[hf-channels-last-cpu]",
    "test_patch_deformable.py::test_patched_deformable_attention_matches_original[official-pixel-decoder-triton]",
    "test_patch_masked_attention.py::test_patched_official_decoder_matches_original[dh8-triton]",
    "test_patch_eomt.py::test_patched_eomt_matches_original[dinov3-gated-cpu]",
    "test_patch_transformers_machinery.py::"
    "test_hidden_states_and_attentions_are_recorded[EomtForUniversalSegmentation-cpu]",
    "test_patch_io.py::test_patched_model_saves_and_loads_back_patched[hf-vit-torch.save]",
    "test_meta_device.py::test_a_model_on_the_meta_device_patches_and_loads[hf-mask2former-dinov3]",
}


def pytest_collection_modifyitems(config, items):
    ids = {f"{item.path.name}::{item.name}": item for item in items}
    for name in QUICK:
        if name in ids:
            ids[name].add_marker(pytest.mark.quick)
    collected = {item.path.name for item in items}
    missing = [n for n in QUICK if n.split("::")[0] in collected and n not in ids]
    if missing:  # a renamed case would silently leave the subset
        raise pytest.UsageError(f"tests/conftest.py QUICK names tests that do not exist: {missing}")
