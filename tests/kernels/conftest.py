"""Shared by the kernel tests: NaN-poisoned output buffers for the full-attention kernels."""

import pytest
import torch

from nsa_eval.kernels.attention import parallel


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every buffer the full-attention kernels write starts as NaN, so an element a kernel fails to write shows up."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(parallel, "new_output", poisoned)
