"""Rotate-half RoPE in place in Triton, forward only, on strided views (a column slice of a fused projection).

One program takes one token (b, t) and BLOCK_R of its R heads: it loads the token's cos/sin row once and rotates
a [BLOCK_R, D/2] tile of each half in float32, rounding to x's dtype on the store. Masks cover R not a multiple
of BLOCK_R and D/2 not a power of 2.
Kernel -> launcher -> public `rotary_`; spec in reference.rotary_.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.layers.reference import check_rotary
from nsa_eval.kernels.utils import check_triton_device


@triton.jit
def rotary_kernel(x, cos, sin, T, R, stride_xb, stride_xt, stride_xr, stride_cb, stride_ct, stride_sb, stride_st,
                  HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid (B * T, cdiv(R, BLOCK_R)). x [B, T, R, 2 * HALF] (unit last stride) <- (x1 cos - x2 sin,
    x2 cos + x1 sin); cos, sin float32 [B, T, HALF] (unit last stride)."""
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    c = tl.load(cos + b * stride_cb + t * stride_ct + cols, mask=col_ok, other=0.)[None, :]
    s = tl.load(sin + b * stride_sb + t * stride_st + cols, mask=col_ok, other=0.)[None, :]
    mask = (heads[:, None] < R) & col_ok[None, :]
    first = x + b * stride_xb + t * stride_xt + heads[:, None].to(tl.int64) * stride_xr + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.).to(tl.float32)
    dtype = x.dtype.element_ty
    tl.store(first, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * c + x1 * s).to(dtype), mask=mask)


def rotary_tiles(R: int, half: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_HALF): about 2048 elements of x per program (D=192: 8 heads)."""
    block_half = triton.next_power_of_2(half)
    return min(triton.next_power_of_2(R), max(1, 1024 // block_half)), block_half


def rotary_fwd_(x: torch.Tensor, cos3: torch.Tensor, sin3: torch.Tensor) -> None:
    """Launch on x [B, T, R, D] and tables [B, T, D/2] (unit last strides)."""
    B, T, R, D = x.shape
    block_r, block_half = rotary_tiles(R, D // 2)
    rotary_kernel[(B * T, triton.cdiv(R, block_r))](
        x, cos3, sin3, T, R, x.stride(0), x.stride(1), x.stride(2), cos3.stride(0), cos3.stride(1),
        sin3.stride(0), sin3.stride(1), HALF=D // 2, BLOCK_R=block_r, BLOCK_HALF=block_half, num_warps=4,
    )


def rotary_(x, cos, sin):
    """Rotate-half RoPE in place in Triton; returns x. Spec in reference.rotary_.

    Args:
        x: [B, T, R, D] float16, bfloat16 or float32, D even, last dim contiguous, other strides arbitrary.
        cos, sin: [B, T, 1, D/2] or [B, T, D/2] float32, last dim contiguous.
    """
    check_rotary(x, cos, sin)
    check_triton_device("rotary_", x, name="x")
    B, T, R, D = x.shape
    if x.numel():
        rotary_fwd_(x, cos.reshape(B, T, D // 2), sin.reshape(B, T, D // 2))
    return x
