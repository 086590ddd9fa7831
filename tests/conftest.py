"""Shared test set-up. Triton kernels run in interpreter mode on machines without a GPU."""

import os
from pathlib import Path

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real benchmark rows); tests using it skip where a checkout lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark rows not found at {SHARED_DATA} (present only beside the project's own checkout)")
    return SHARED_DATA
