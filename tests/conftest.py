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


