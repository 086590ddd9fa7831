"""Shared by the kernel tests: NaN-poisoned output buffers for the full-attention and layer kernels."""

import pytest
import torch

from nsa_eval.kernels import utils


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every buffer the full-attention and layer kernels write (`kernels/utils.py: new_output`) starts as NaN, so an
    element a kernel fails to write shows up."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(utils, "new_output", poisoned)
