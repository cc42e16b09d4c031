"""Shared test fixtures: location of ../shared (real data), skipped cleanly when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_NUCLEI_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
WSI_DIR = SHARED_DATA / "wsi"
NUCLEI_DIR = SHARED_DATA / "nuclei"

requires_shared = pytest.mark.skipif(
    not WSI_DIR.is_dir() or not NUCLEI_DIR.is_dir(),
    reason=f"real data not available: {SHARED_DATA} is absent (clone with ../shared beside the repo)",
)


@pytest.fixture
def wsi_dir() -> Path:
    if not WSI_DIR.is_dir():
        pytest.skip(f"real slides not available: {WSI_DIR} is absent")
    return WSI_DIR


@pytest.fixture
def nuclei_dir() -> Path:
    if not NUCLEI_DIR.is_dir():
        pytest.skip(f"real nucleus datasets not available: {NUCLEI_DIR} is absent")
    return NUCLEI_DIR


@pytest.fixture
def torch_one_thread():
    """Run a network test on one torch thread (two cores are shared with other work)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
