"""Residual add + RMSNorm in Triton, forward only: one pass over each row (the add, the mean square, the scale).

One program takes BLOCK_R rows of BLOCK_D = next_power_of_2(D) columns (one row for D >= 1024, several for
narrow rows). Math in float32 with the rounding of the PyTorch reference: the sum rounded to x's dtype before
it is squared, the normalised row rounded to x's dtype before the multiply by weight.
Kernel -> launcher -> public `add_rms_norm`; spec in reference.add_rms_norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels import utils
from nsa_eval.kernels.layers.reference import check_add_rms_norm
from nsa_eval.kernels.utils import check_triton_device, fail

MAX_D = 8192


@triton.jit
def add_rms_norm_kernel(x, residual, weight, normed, summed, ROWS, stride_x, stride_res, stride_normed,
                        stride_summed, eps, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr):
    """Grid (cdiv(ROWS, BLOCK_R)). s = x (+ residual) [ROWS, D] rounded to x's dtype (stored to `summed` when
    HAS_RESIDUAL); normed = (s * rsqrt(mean(s^2) + eps)).to(dtype) * weight."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < D)
    rows = rows.to(tl.int64)
    dtype = x.dtype.element_ty
    s = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(residual + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.).to(tl.float32)
        s = s.to(dtype)
        tl.store(summed + rows[:, None] * stride_summed + cols[None, :], s, mask=mask)
        s = s.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(s * s, 1) / D + eps)
    w = tl.load(weight + cols, mask=cols < D, other=0.).to(tl.float32)
    y = (s * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
    tl.store(normed + rows[:, None] * stride_normed + cols[None, :], y.to(dtype), mask=mask)


def rms_norm_tiles(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): about 1024 or more elements per program, one warp per 512 of them."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, 1024 // block_d)
    num_warps = min(16, max(1, block_r * block_d // 512))
    return block_r, block_d, num_warps


def add_rms_norm_fwd(x2d: torch.Tensor, residual2d: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     normed2d: torch.Tensor, summed2d: torch.Tensor | None) -> None:
    """Launch on row-major views [ROWS, D] (unit column stride); writes normed2d (and summed2d with a residual)."""
    rows, D = x2d.shape
    block_r, block_d, num_warps = rms_norm_tiles(D)
    has_residual = residual2d is not None
    res, summed = (residual2d, summed2d) if has_residual else (x2d, x2d)  # unused pointers without a residual
    add_rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        x2d, res, weight, normed2d, summed, rows, x2d.stride(0), res.stride(0), normed2d.stride(0), summed.stride(0),
        float(eps), D=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_RESIDUAL=has_residual, num_warps=num_warps,
    )


def add_rms_norm(x, weight, eps, residual=None):
    """Residual add + RMSNorm in Triton -> (normed, summed); spec in reference.add_rms_norm.

    Args:
        x: [..., D] float16, bfloat16 or float32, last dim contiguous, D <= 8192.
        weight: [D], x's dtype.
        eps: added to the mean square (float).
        residual: None or [..., D] like x.
    Returns:
        normed: [..., D] x's dtype, a new contiguous tensor.
        summed: x itself when residual is None, else x + residual rounded to x's dtype (new, contiguous).
    """
    check_add_rms_norm(x, weight, eps, residual)
    check_triton_device("add_rms_norm", x, name="x")
    D = x.shape[-1]
    if D > MAX_D:
        fail("add_rms_norm", f"x's last dim D={D}: the Triton kernel takes D <= {MAX_D}")
    if not weight.is_contiguous():
        fail("add_rms_norm", "weight must be contiguous (call .contiguous())")
    normed = utils.new_output(x.shape, x.dtype, x.device)
    summed = x if residual is None else utils.new_output(x.shape, x.dtype, x.device)
    if x.numel():
        add_rms_norm_fwd(x.reshape(-1, D), None if residual is None else residual.reshape(-1, D), weight, eps,
                         normed.view(-1, D), None if residual is None else summed.view(-1, D))
    return normed, summed
