"""SwiGLU's pointwise part in Triton, forward only: silu(gate) * up from one fused gate/up projection output.

One program takes BLOCK columns of one row: it reads gate and up (I columns apart) and writes one output
block, with the reference's rounding (silu rounded to the dtype, then the product).
Kernel -> launcher -> public `silu_mul`; spec in reference.silu_mul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels import utils
from nsa_eval.kernels.layers.reference import check_silu_mul
from nsa_eval.kernels.utils import check_triton_device


@triton.jit
def silu_mul_kernel(gate_up, out, I, stride_in, BLOCK: tl.constexpr):
    """Grid (ROWS, cdiv(I, BLOCK)). out [ROWS, I] (contiguous) = silu(gate_up[:, :I]) * gate_up[:, I:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dtype = out.dtype.element_ty
    gate = tl.load(gate_up + row * stride_in + cols, mask=mask, other=0.).to(tl.float32)
    up = tl.load(gate_up + row * stride_in + I + cols, mask=mask, other=0.).to(tl.float32)
    silu = (gate / (1. + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out + row * I + cols, (silu * up).to(dtype), mask=mask)


def silu_mul_block(I: int) -> tuple[int, int]:
    """(BLOCK, num_warps): up to 1024 columns per program; 4 warps (8 elements a thread) for full blocks."""
    block = min(1024, triton.next_power_of_2(I))
    return block, max(1, min(4, block // 256))


def silu_mul_fwd(gate_up2d: torch.Tensor, out2d: torch.Tensor) -> None:
    """Launch on gate_up2d [ROWS, 2*I] (unit column stride) -> out2d [ROWS, I] contiguous."""
    rows, I = out2d.shape
    block, num_warps = silu_mul_block(I)
    silu_mul_kernel[(rows, triton.cdiv(I, block))](gate_up2d, out2d, I, gate_up2d.stride(0), BLOCK=block,
                                                   num_warps=num_warps)


def silu_mul(gate_up):
    """silu(gate) * up in Triton; spec in reference.silu_mul.

    Args:
        gate_up: [..., 2*I] float16, bfloat16 or float32 (gate columns, then up columns), last dim contiguous.
    Returns:
        [..., I] in gate_up's dtype, a new contiguous tensor.
    """
    check_silu_mul(gate_up)
    check_triton_device("silu_mul", gate_up, name="gate_up")
    I = gate_up.shape[-1] // 2
    out = utils.new_output((*gate_up.shape[:-1], I), gate_up.dtype, gate_up.device)
    if out.numel():
        silu_mul_fwd(gate_up.reshape(-1, 2 * I), out.view(-1, I))
    return out
