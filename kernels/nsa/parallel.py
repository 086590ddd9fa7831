"""The whole NSA prefill on the Triton kernels: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (eq. 5).

compressed attention (compression.py) -> block selection from its log-sum-exp (selection.py) -> selected
attention (selected.py) and the sliding-window branch (the full-attention kernel's window,
nsa_eval.kernels.attention); each branch is its own autograd Function and the gated sum one more (a fused
kernel each way: one pass over the branch outputs instead of five), so gradients reach q, k, v, k_cmp, v_cmp
and the gates. Spec and shapes: reference.nsa_attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.attention import attention
from nsa_eval.kernels.nsa.common import Packing
from nsa_eval.kernels.nsa.compression import CompressedAttention
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout
from nsa_eval.kernels.nsa.selected import SelectedAttention
from nsa_eval.kernels.nsa.selection import select_fwd
from nsa_eval.kernels.nsa.utils import (check_block_indices, check_nsa, check_offset_backward, check_varlen,
                                        default_scale)


@triton.jit
def gated_sum_fwd_kernel(o1, o2, o3, g1, g2, g3, out, ROWS, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                         THREE: tl.constexpr):
    """Grid (cdiv(ROWS, BR)). out [ROWS, D] = g1 * o1 + g2 * o2 (+ g3 * o3), gates [ROWS], float32 math."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    r_ok = r < ROWS
    at = r[:, None] * D + d[None, :]
    mask = r_ok[:, None] & (d[None, :] < D)
    acc = tl.load(o1 + at, mask=mask, other=0.).to(tl.float32) * tl.load(g1 + r, mask=r_ok, other=0.).to(tl.float32)[:, None]
    acc += tl.load(o2 + at, mask=mask, other=0.).to(tl.float32) * tl.load(g2 + r, mask=r_ok, other=0.).to(tl.float32)[:, None]
    if THREE:
        acc += tl.load(o3 + at, mask=mask, other=0.).to(tl.float32) * tl.load(g3 + r, mask=r_ok, other=0.).to(tl.float32)[:, None]
    tl.store(out + at, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gate_grads(do, o, g, do_o, dg, r, at, r_ok, mask):
    x = tl.load(o + at, mask=mask, other=0.).to(tl.float32)
    tl.store(dg + r, tl.sum(x * do, 1).to(dg.dtype.element_ty), mask=r_ok)
    gate = tl.load(g + r, mask=r_ok, other=0.).to(tl.float32)
    tl.store(do_o + at, (do * gate[:, None]).to(do_o.dtype.element_ty), mask=mask)


@triton.jit
def gated_sum_bwd_kernel(do, o1, o2, o3, g1, g2, g3, do1, do2, do3, dg1, dg2, dg3, ROWS, D: tl.constexpr,
                         BR: tl.constexpr, BD: tl.constexpr, THREE: tl.constexpr):
    """Grid (cdiv(ROWS, BR)). do_i = g_i * do [ROWS, D]; dg_i = rowsum(o_i * do) [ROWS]."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    r_ok = r < ROWS
    at = r[:, None] * D + d[None, :]
    mask = r_ok[:, None] & (d[None, :] < D)
    dout = tl.load(do + at, mask=mask, other=0.).to(tl.float32)
    _gate_grads(dout, o1, g1, do1, dg1, r, at, r_ok, mask)
    _gate_grads(dout, o2, g2, do2, dg2, r, at, r_ok, mask)
    if THREE:
        _gate_grads(dout, o3, g3, do3, dg3, r, at, r_ok, mask)


def _gate_grid(outputs):
    rows, D = outputs[0].numel() // outputs[0].shape[-1], outputs[0].shape[-1]
    return (triton.cdiv(rows, 16),), rows, D, triton.next_power_of_2(D)


class GatedSum(torch.autograd.Function):
    """(o_1, g_1, o_2, g_2[, o_3, g_3]) -> sum_i g_i[..., None] * o_i; outputs [B, T, HQ, Dv], gates [B, T, HQ]."""

    @staticmethod
    def forward(ctx, *pairs):
        outputs = [x.contiguous() for x in pairs[0::2]]
        gates = [g.contiguous() for g in pairs[1::2]]
        three = len(outputs) == 3
        grid, rows, D, BD = _gate_grid(outputs)
        out = torch.empty_like(outputs[0])
        o3, g3 = (outputs[2], gates[2]) if three else (outputs[0], gates[0])
        gated_sum_fwd_kernel[grid](outputs[0], outputs[1], o3, gates[0], gates[1], g3, out, rows, D, 16, BD, three,
                                   num_warps=4)
        ctx.save_for_backward(*outputs, *gates)
        return out

    @staticmethod
    def backward(ctx, do):
        saved = ctx.saved_tensors
        n = len(saved) // 2
        outputs, gates = saved[:n], saved[n:]
        grid, rows, D, BD = _gate_grid(outputs)
        d_outputs = [torch.empty_like(o) for o in outputs]
        d_gates = [torch.empty_like(g) for g in gates]
        pick = (lambda xs: xs[2] if n == 3 else xs[0])
        gated_sum_bwd_kernel[grid](do.contiguous(), *outputs[:2], pick(outputs), *gates[:2], pick(gates),
                                   *d_outputs[:2], pick(d_outputs), *d_gates[:2], pick(d_gates), rows, D, 16, BD,
                                   n == 3, num_warps=4)
        return tuple(x for pair in zip(d_outputs, d_gates) for x in pair)


def gated_sum(o_1, g_1, o_2, g_2, o_3=None, g_3=None):
    """Eq. 5's sum of branch outputs: o_i [..., Dv] (one shape and dtype), gates g_i [...] -> sum_i g_i * o_i
    [..., Dv] in o_1's dtype, float32 math; one fused kernel (and one backward). The third pair is optional."""
    pairs = [o_1, g_1, o_2, g_2] + ([o_3, g_3] if o_3 is not None else [])
    return GatedSum.apply(*pairs)


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win=None, *, layout: NSALayout = PAPER_LAYOUT, scale=None,
                  block_indices=None, return_block_indices=False, cu_seqlens=None):
    """Triton NSA prefill, forward and backward; spec and shapes: reference.nsa_attention. With cu_seqlens every
    kernel maps its programs to (sequence, position within it) through the packing's offsets. S > T (the queries
    are the last T of the S keys, a chunk over a cache) runs forward only: ValueError if a gradient is needed."""
    op = "nsa_attention"
    check_nsa(op, q, k, v, k_cmp, v_cmp, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}, layout, scale, triton=True,
              varlen=cu_seqlens is not None)
    packing = None
    if cu_seqlens is not None:
        packing = Packing.of(*check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride,
                                           {"k_cmp": k_cmp, "v_cmp": v_cmp}, num_keys=k.shape[1]), q.device)
    offset = k.shape[1] - q.shape[1]
    check_offset_backward(op, offset, q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win)
    scale = default_scale(q, scale)
    o_cmp, lse = CompressedAttention.apply(q, k_cmp, v_cmp, layout, scale, packing, offset)
    if block_indices is None:
        block_indices = select_fwd(q.detach().contiguous(), k_cmp.detach().contiguous(), lse, layout, scale, packing,
                                   offset)
    else:
        check_block_indices(op, block_indices, q, k.shape[2])
    o_slc = SelectedAttention.apply(q, k, v, block_indices, layout.select_len, scale, packing)
    branches = [o_cmp, g_cmp, o_slc, g_slc]
    if layout.window:
        branches += [attention(q, k, v, causal=True, window=layout.window, scale=scale, cu_seqlens=cu_seqlens), g_win]
    o = GatedSum.apply(*branches)
    return (o, block_indices) if return_block_indices else o
