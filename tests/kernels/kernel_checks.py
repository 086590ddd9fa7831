"""How kernel tests compare an output with the reference."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; an unwritten (non-finite) element fails outright."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite (unwritten) elements"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
