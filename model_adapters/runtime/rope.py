"""Rotary position embeddings: the inverse frequencies of each RoPE type (as transformers' modeling_rope_utils.py
computes them, written out here) and the cos/sin tables of given positions (rotate-half convention, as Llama)."""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def inv_frequencies(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None,
                    max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim // 2] float32 (radians per position) and the attention scaling that multiplies cos and sin
    (1.0 except yarn). rope_scaling: None or {"rope_type": "default" | "linear" | "llama3" | "yarn", ...}."""
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    base = float(theta)
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope_type == "default":
        return 1.0 / (base ** exponents), 1.0
    if rope_type == "linear":
        return 1.0 / (base ** exponents) / scaling["factor"], 1.0
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if rope_type == "llama3":
        inv_freq = 1.0 / (base ** exponents)
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        low_freq_wavelen, high_freq_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long waves: / factor
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        factor = scaling.get("factor")
        if factor is None:  # DeepSeek-V3 style: the ratio of the context lengths
            factor = max_position_embeddings / original

        def mscale_of(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
            else:
                attention_factor = mscale_of(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:  # the dim whose wave turns `rotations` times over `original`
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        keep = 1 - ramp  # 1: high frequencies kept as they are, 0: low frequencies interpolated
        return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)
    raise ValueError(f"RoPE type {rope_type!r} is not supported (only {', '.join(ROPE_TYPES)}); use --engine "
                     "transformers")


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] (any int dtype) -> cos, sin [B, T, 1, head_dim/2] float32, times `scaling` (rotate-half
    RoPE: dim i pairs with dim i + head_dim/2). No host sync, so it can run inside a CUDA graph."""
    angles = positions.float()[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    cos, sin = angles.cos(), angles.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos[:, :, None], sin[:, :, None]
