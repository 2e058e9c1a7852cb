"""Shared fixtures: tiny synthetic datasets made once per session, and a private decode cache."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: one intra-op thread per process keeps parallel work (Ray workers, loaders) from thrashing.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/anodfd."""
    old = os.environ.get("ANODFD_CACHE_DIR")
    os.environ["ANODFD_CACHE_DIR"] = str(tmp_path_factory.mktemp("decode-cache"))
    yield
    if old is None:
        os.environ.pop("ANODFD_CACHE_DIR", None)
    else:
        os.environ["ANODFD_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def synth_ol(tmp_path_factory):
    """A few dozen OL stand-in pairs at 128x128, in the paper's layout."""
    from anodfd.data.synthetic import synthesize

    return synthesize("OL", tmp_path_factory.mktemp("data") / "OL", pairs=48, seed=1, size=(128, 128),
                      workers=2, progress=False)
