"""Shared fixtures and markers. See pyproject.toml for the markers: slow, gpu, shared_data, ray."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def need_shared_data() -> Path:
    """Return ../shared/data or skip the calling test with a clear message."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: this test needs the shared real images")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return need_shared_data()


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
