"""Compressed attention (the paper's eq. 7) in Triton: every query over the compressed blocks it may see.

Kernels (forward with log-sum-exp; backward as two kernels, dq per query tile and dk/dv per compressed-key
tile summed over the query heads of its GQA group), host launchers, the autograd Function, and the public
`compressed_attention` with the reference's signature (see reference.compressed_attention for the spec).
Block i (tokens [i*d, i*d + l)) is visible to query t iff t >= i*d + l - 1, so query t sees its first
n(t) = max(t + 1 - l + d, 0) // d blocks. Queries may be the last T of S tokens (forward only): row i at
t = i + OFFSET, OFFSET = S - T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.nsa.common import (Packing, attend_tile, backward_rows, kernel_packing, num_visible_blocks,
                                         row_dot, sequence_tile, store_attention)
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout
from nsa_eval.kernels.nsa.utils import check_compressed_args, check_offset_backward, check_varlen, default_scale
from nsa_eval.kernels.utils import LOG2E, dot_precision


@triton.jit
def _program_tile(table, cu, cu_cmp, T, TC, HQ: tl.constexpr, H: tl.constexpr, VARLEN: tl.constexpr):
    """Program (axis 0: a tile of queries or of compressed blocks, axis 1: b * HQ + hq) -> its tile and sequence
    (sequence_tile: tile, bos, T, bos_c, TC), query head hq and KV head h."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // HQ, pid_bh % HQ
    h = hq // (HQ // H)
    tile, bos, T, bos_c, TC = sequence_tile(pid, b, table, cu, cu_cmp, T, TC, VARLEN)
    return tile, bos, T, bos_c, TC, hq, h


@triton.jit
def compressed_fwd_kernel(q, k, v, o, lse, cu, cu_cmp, table, T, TC, OFFSET, qk_scale, HQ: tl.constexpr,
                          H: tl.constexpr,
                          DK: tl.constexpr, DV: tl.constexpr, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                          VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(T, BT) or the table's tiles, B * HQ). q [B, T, HQ, DK], k [B, TC, H, DK], v [B, TC, H, DV]
    -> o [B, T, HQ, DV], lse [B, T, HQ] float32 (natural log, -inf for a query that sees no block).
    VARLEN: B == 1, sequence n is tokens cu[n]:cu[n+1] and blocks cu_cmp[n]:cu_cmp[n+1]; t counts from its 0.
    Query row t stands at position t + OFFSET (OFFSET = S - T >= 0: a chunk after OFFSET cached tokens; 0 packed)."""
    tile, bos, T, bos_c, TC, hq, h = _program_tile(table, cu, cu_cmp, T, TC, HQ, H, VARLEN)
    t = tile * BT + tl.arange(0, BT)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    row = (bos + t) * HQ + hq
    q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=(t[:, None] < T) & (dk[None, :] < DK), other=0.)
    n_vis = num_visible_blocks(t + OFFSET, BLOCK_LEN, BLOCK_STRIDE)
    n_lo = num_visible_blocks(tile * BT + OFFSET, BLOCK_LEN, BLOCK_STRIDE)  # every row of the tile sees these
    n_hi = tl.minimum(num_visible_blocks(tl.minimum(tile * BT + BT, T) - 1 + OFFSET, BLOCK_LEN, BLOCK_STRIDE), TC)
    k_ptr = k + (bos_c * H + h) * DK
    v_ptr = v + (bos_c * H + h) * DV
    m_i = tl.full([BT], float("-inf"), tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BDV], tl.float32)
    full_end = (n_lo // BC) * BC
    for i0 in range(0, full_end, BC):
        i = i0 + tl.arange(0, BC)
        m_i, l_i, acc = attend_tile(q_blk, k_ptr, v_ptr, i, i < n_hi, i[None, :] < n_vis[:, None], m_i, l_i, acc,
                                    qk_scale, H, DK, DV, BDK, BDV, False, PRECISION)
    for i0 in range(full_end, n_hi, BC):
        i = i0 + tl.arange(0, BC)
        m_i, l_i, acc = attend_tile(q_blk, k_ptr, v_ptr, i, i < n_hi, i[None, :] < n_vis[:, None], m_i, l_i, acc,
                                    qk_scale, H, DK, DV, BDK, BDV, True, PRECISION)
    store_attention(o, lse, row, t < T, m_i, l_i, acc, dv, DV)


@triton.jit
def compressed_bwd_dq_kernel(q, k, v, do, lse, delta, dq, cu, cu_cmp, table, T, TC, qk_scale, HQ: tl.constexpr,
                             H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_LEN: tl.constexpr,
                             BLOCK_STRIDE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr,
                             BDV: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """Grid as the forward's. dq [B, T, HQ, DK] (scaled); delta [B, T, HQ] = rowsum(o * do) float32."""
    tile, bos, T, bos_c, TC, hq, h = _program_tile(table, cu, cu_cmp, T, TC, HQ, H, VARLEN)
    t = tile * BT + tl.arange(0, BT)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    row = (bos + t) * HQ + hq
    t_ok = t < T
    q_blk, do_blk, lse2, dlt = backward_rows(q, do, lse, delta, row, t_ok, dk, dv, DK, DV)
    n_vis = num_visible_blocks(t, BLOCK_LEN, BLOCK_STRIDE)
    n_hi = tl.minimum(num_visible_blocks(tl.minimum(tile * BT + BT, T) - 1, BLOCK_LEN, BLOCK_STRIDE), TC)
    acc = tl.zeros([BT, BDK], tl.float32)
    for i0 in range(0, n_hi, BC):
        i = i0 + tl.arange(0, BC)
        kb = tl.load(k + ((bos_c + i[:, None]) * H + h) * DK + dk[None, :],
                     mask=(i[:, None] < n_hi) & (dk[None, :] < DK), other=0.)
        vb = tl.load(v + ((bos_c + i[:, None]) * H + h) * DV + dv[None, :],
                     mask=(i[:, None] < n_hi) & (dv[None, :] < DV), other=0.)
        s = tl.dot(q_blk, tl.trans(kb), input_precision=PRECISION) * qk_scale
        p = tl.where(i[None, :] < n_vis[:, None], tl.math.exp2(s - lse2[:, None]), 0.)
        dp = tl.dot(do_blk, tl.trans(vb), input_precision=PRECISION)
        ds = p * (dp - dlt[:, None])
        acc += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
    scale = qk_scale / 1.4426950408889634
    tl.store(dq + row[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=t_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def compressed_bwd_dkv_kernel(q, k, v, do, lse, delta, dk_out, dv_out, cu, cu_cmp, table, T, TC, qk_scale,
                              HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                              BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr, BT: tl.constexpr,
                              BC: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, VARLEN: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Grid (cdiv(TC, BC) or the table's tiles of compressed blocks, B * HQ). Per query head:
    dk_out [B, TC, HQ, DK], dv_out [B, TC, HQ, DV] float32 (the launcher sums the G heads of each group)."""
    pid_c, bos, T, bos_c, TC, hq, h = _program_tile(table, cu, cu_cmp, T, TC, HQ, H, VARLEN)
    i = pid_c * BC + tl.arange(0, BC)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    i_ok = i < TC
    kb = tl.load(k + ((bos_c + i[:, None]) * H + h) * DK + dk[None, :], mask=i_ok[:, None] & (dk[None, :] < DK),
                 other=0.)
    vb = tl.load(v + ((bos_c + i[:, None]) * H + h) * DV + dv[None, :], mask=i_ok[:, None] & (dv[None, :] < DV),
                 other=0.)
    dk_acc = tl.zeros([BC, BDK], tl.float32)
    dv_acc = tl.zeros([BC, BDV], tl.float32)
    t_first = pid_c * BC * BLOCK_STRIDE + BLOCK_LEN - 1  # first query that sees block pid_c * BC
    t_full = (pid_c * BC + BC - 1) * BLOCK_STRIDE + BLOCK_LEN - 1  # from here on every query sees the whole tile
    for t0 in range((t_first // BT) * BT, T, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < T
        row = (bos + t) * HQ + hq
        q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=t_ok[:, None] & (dk[None, :] < DK), other=0.)
        do_blk = tl.load(do + row[:, None] * DV + dv[None, :], mask=t_ok[:, None] & (dv[None, :] < DV), other=0.)
        lse2 = tl.load(lse + row, mask=t_ok, other=0.) * 1.4426950408889634
        dlt = tl.load(delta + row, mask=t_ok, other=0.)
        s = tl.dot(q_blk, tl.trans(kb), input_precision=PRECISION) * qk_scale
        if t0 < t_full:
            n_vis = num_visible_blocks(t, BLOCK_LEN, BLOCK_STRIDE)
            p = tl.where((i[None, :] < n_vis[:, None]) & t_ok[:, None], tl.math.exp2(s - lse2[:, None]), 0.)
        else:  # rows past T load zeros: q = do = 0 and delta = 0 make their terms vanish
            p = tl.math.exp2(s - lse2[:, None])
        dv_acc += tl.dot(tl.trans(p.to(do_blk.dtype)), do_blk, input_precision=PRECISION)
        dp = tl.dot(do_blk, tl.trans(vb), input_precision=PRECISION)
        ds = p * (dp - dlt[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(q_blk.dtype)), q_blk, input_precision=PRECISION)
    scale = qk_scale / 1.4426950408889634
    tl.store(dk_out + ((bos_c + i[:, None]) * HQ + hq) * DK + dk[None, :], dk_acc * scale,
             mask=i_ok[:, None] & (dk[None, :] < DK))
    tl.store(dv_out + ((bos_c + i[:, None]) * HQ + hq) * DV + dv[None, :], dv_acc,
             mask=i_ok[:, None] & (dv[None, :] < DV))


# ------------------------------------------------------------------------------------------- launchers
# (query rows BT, compressed keys BC, warps, stages) per kernel; halved rows and 2 stages for float32 inputs
TILES = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkv": (64, 64, 4, 2)}


def tiles_for(tiles: tuple, dtype: torch.dtype) -> tuple:
    """Tiles that fit shared memory at this dtype: 4-byte elements take half the rows and 2 stages."""
    bt, bc, warps, stages = tiles
    return (bt // 2, bc, warps, min(stages, 2)) if dtype == torch.float32 else tiles


def _tiles(dk: int, dv: int):
    return triton.next_power_of_2(dk), triton.next_power_of_2(dv)


def compressed_fwd(q, k_cmp, v_cmp, layout: NSALayout, scale, packing: Packing | None = None, offset: int = 0):
    """q [B, T, HQ, Dk], k_cmp/v_cmp [B, Tc, H, D] (contiguous) -> o [B, T, HQ, Dv], lse [B, T, HQ] float32.
    layout: its block_len and block_stride; packing: packed sequences (B == 1) or None; offset: position of query
    row 0 (S - T)."""
    B, T, HQ, DK = q.shape
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    o = torch.empty(B, T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    bdk, bdv = _tiles(DK, DV)
    bt, bc, warps, stages = tiles_for(TILES["fwd"], q.dtype)
    cu, cu_cmp, table, programs = kernel_packing(packing, bt, False, lse, triton.cdiv(T, bt))
    compressed_fwd_kernel[(programs, B * HQ)](
        q, k_cmp, v_cmp, o, lse, cu, cu_cmp, table, T, TC, offset, scale * LOG2E, HQ, H, DK, DV, layout.block_len,
        layout.block_stride, bt, bc, bdk, bdv, packing is not None, PRECISION=dot_precision(q.dtype), num_warps=warps,
        num_stages=stages)
    return o, lse


def compressed_bwd(q, k_cmp, v_cmp, o, lse, do, layout: NSALayout, scale, packing: Packing | None = None):
    """Gradients (dq [B, T, HQ, Dk], dk_cmp [B, Tc, H, Dk], dv_cmp [B, Tc, H, Dv]) of compressed attention for output
    gradient do [B, T, HQ, Dv] (o [B, T, HQ, Dv], lse [B, T, HQ] the forward's)."""
    B, T, HQ, DK = q.shape
    block_len, block_stride = layout.block_len, layout.block_stride
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    delta = row_dot(o, do)
    dq = torch.empty_like(q)
    dk = torch.empty(B, TC, HQ, DK, dtype=torch.float32, device=q.device)  # per query head, summed below
    dv = torch.empty(B, TC, HQ, DV, dtype=torch.float32, device=q.device)
    bdk, bdv = _tiles(DK, DV)
    bt, bc, warps, stages = tiles_for(TILES["dq"], q.dtype)
    cu, cu_cmp, table, programs = kernel_packing(packing, bt, False, lse, triton.cdiv(T, bt))
    compressed_bwd_dq_kernel[(programs, B * HQ)](
        q, k_cmp, v_cmp, do, lse, delta, dq, cu, cu_cmp, table, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len,
        block_stride, bt, bc, bdk, bdv, packing is not None, PRECISION=dot_precision(q.dtype), num_warps=warps,
        num_stages=stages)
    if TC:
        bt, bc, warps, stages = tiles_for(TILES["dkv"], q.dtype)
        cu, cu_cmp, table, programs = kernel_packing(packing, bc, True, lse, triton.cdiv(TC, bc))
        compressed_bwd_dkv_kernel[(programs, B * HQ)](
            q, k_cmp, v_cmp, do, lse, delta, dk, dv, cu, cu_cmp, table, T, TC, scale * LOG2E, HQ, H, DK, DV,
            block_len, block_stride, bt, bc, bdk, bdv, packing is not None, PRECISION=dot_precision(q.dtype),
            num_warps=warps, num_stages=stages)
    group = (B, TC, H, HQ // H)
    return dq, dk.view(*group, DK).sum(3).to(k_cmp.dtype), dv.view(*group, DV).sum(3).to(v_cmp.dtype)


class CompressedAttention(torch.autograd.Function):
    """(q, k_cmp, v_cmp) -> (o, lse); lse carries no gradient (it feeds only the block selection). Backward only
    for offset 0 (callers refuse a graph otherwise: utils.check_offset_backward)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, layout, scale, packing=None, offset=0):
        q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
        o, lse = compressed_fwd(q, k_cmp, v_cmp, layout, scale, packing, offset)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (layout, scale, packing)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = compressed_bwd(q, k_cmp, v_cmp, o, lse, do.contiguous(), *ctx.args)
        return dq, dk, dv, None, None, None, None


def compressed_attention(q, k_cmp, v_cmp, *, layout: NSALayout = PAPER_LAYOUT, scale=None, seq_len=None,
                         cu_seqlens=None):
    """Triton compressed attention; spec and shapes: reference.compressed_attention. Returns (o, lse).
    seq_len > T (queries offset into the sequence) runs forward only: ValueError if a gradient is needed."""
    op = "compressed_attention"
    seq_len = check_compressed_args(op, q, k_cmp, v_cmp, layout, scale, seq_len, cu_seqlens is not None, triton=True)
    offset = seq_len - q.shape[1]
    check_offset_backward(op, offset, q, k_cmp, v_cmp)
    packing = None
    if cu_seqlens is not None:
        packing = Packing.of(*check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride,
                                           {"k_cmp": k_cmp, "v_cmp": v_cmp}), q.device)
    scale = default_scale(q, scale)
    return CompressedAttention.apply(q, k_cmp, v_cmp, layout, scale, packing, offset)
