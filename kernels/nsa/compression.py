"""Compressed attention (the paper's eq. 7) in Triton: every query over the compressed blocks it may see.

Kernels (forward with log-sum-exp; backward as two kernels, dq per query tile and dk/dv per compressed-key
tile summed over the query heads of its GQA group), host launchers, the autograd Function, and the public
`compressed_attention` with the reference's signature (see reference.compressed_attention for the spec).
Block i (tokens [i*d, i*d + l)) is visible to query t iff t >= i*d + l - 1, so query t sees its first
n(t) = max(t + 1 - l + d, 0) // d blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.nsa.utils import check_compressed

LOG2E = 1.4426950408889634


@triton.jit
def num_visible_blocks(t, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr):
    """Compressed blocks a query at position t sees (0 before the first block is complete)."""
    return tl.maximum(t + 1 - BLOCK_LEN + BLOCK_STRIDE, 0) // BLOCK_STRIDE


@triton.jit
def _fwd_step(q, k_ptr, v_ptr, i, i_end, n_vis, m_i, l_i, acc, qk_scale, H: tl.constexpr, DK: tl.constexpr,
              DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, MASKED: tl.constexpr):
    """One tile of compressed keys i [BC] for query rows [BT]: online-softmax update (log2 domain)."""
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kb = tl.load(k_ptr + i[:, None] * (H * DK) + dk[None, :], mask=(i[:, None] < i_end) & (dk[None, :] < DK), other=0.)
    vb = tl.load(v_ptr + i[:, None] * (H * DV) + dv[None, :], mask=(i[:, None] < i_end) & (dv[None, :] < DV), other=0.)
    s = tl.dot(q, tl.trans(kb)) * qk_scale
    if MASKED:
        s = tl.where(i[None, :] < n_vis[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0., m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb)
    return m_new, l_i, acc


@triton.jit
def compressed_fwd_kernel(q, k, v, o, lse, T, TC, qk_scale, HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr,
                          DV: tl.constexpr, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr, BT: tl.constexpr,
                          BC: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """Grid (cdiv(T, BT), B * HQ). q [B, T, HQ, DK], k [B, TC, H, DK], v [B, TC, H, DV] -> o [B, T, HQ, DV],
    lse [B, T, HQ] float32 (natural log, -inf for a query that sees no block)."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // HQ, pid_bh % HQ
    h = hq // (HQ // H)
    t = pid_t * BT + tl.arange(0, BT)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    row = (b * T + t) * HQ + hq
    q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=(t[:, None] < T) & (dk[None, :] < DK), other=0.)
    n_vis = num_visible_blocks(t, BLOCK_LEN, BLOCK_STRIDE)
    n_lo = num_visible_blocks(pid_t * BT, BLOCK_LEN, BLOCK_STRIDE)  # every row of the tile sees these
    n_hi = tl.minimum(num_visible_blocks(tl.minimum(pid_t * BT + BT, T) - 1, BLOCK_LEN, BLOCK_STRIDE), TC)
    k_ptr = k + (b * TC * H + h) * DK
    v_ptr = v + (b * TC * H + h) * DV
    m_i = tl.full([BT], float("-inf"), tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BDV], tl.float32)
    full_end = (n_lo // BC) * BC
    for i0 in range(0, full_end, BC):
        m_i, l_i, acc = _fwd_step(q_blk, k_ptr, v_ptr, i0 + tl.arange(0, BC), n_hi, n_vis, m_i, l_i, acc, qk_scale,
                                  H, DK, DV, BDK, BDV, False)
    for i0 in range(full_end, n_hi, BC):
        m_i, l_i, acc = _fwd_step(q_blk, k_ptr, v_ptr, i0 + tl.arange(0, BC), n_hi, n_vis, m_i, l_i, acc, qk_scale,
                                  H, DK, DV, BDK, BDV, True)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.)[:, None]
    tl.store(o + row[:, None] * DV + dv[None, :], out.to(o.dtype.element_ty), mask=(t[:, None] < T) & (dv[None, :] < DV))
    lse_row = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.))) / 1.4426950408889634, float("-inf"))
    tl.store(lse + row, lse_row, mask=t < T)


@triton.jit
def compressed_bwd_dq_kernel(q, k, v, do, lse, delta, dq, T, TC, qk_scale, HQ: tl.constexpr, H: tl.constexpr,
                             DK: tl.constexpr, DV: tl.constexpr, BLOCK_LEN: tl.constexpr,
                             BLOCK_STRIDE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BDK: tl.constexpr,
                             BDV: tl.constexpr):
    """Grid (cdiv(T, BT), B * HQ). dq [B, T, HQ, DK] (scaled); delta [B, T, HQ] = rowsum(o * do) float32."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // HQ, pid_bh % HQ
    h = hq // (HQ // H)
    t = pid_t * BT + tl.arange(0, BT)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    row = (b * T + t) * HQ + hq
    t_ok = t < T
    q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=t_ok[:, None] & (dk[None, :] < DK), other=0.)
    do_blk = tl.load(do + row[:, None] * DV + dv[None, :], mask=t_ok[:, None] & (dv[None, :] < DV), other=0.)
    lse2 = tl.load(lse + row, mask=t_ok, other=0.) * 1.4426950408889634
    dlt = tl.load(delta + row, mask=t_ok, other=0.)
    n_vis = num_visible_blocks(t, BLOCK_LEN, BLOCK_STRIDE)
    n_hi = tl.minimum(num_visible_blocks(tl.minimum(pid_t * BT + BT, T) - 1, BLOCK_LEN, BLOCK_STRIDE), TC)
    acc = tl.zeros([BT, BDK], tl.float32)
    for i0 in range(0, n_hi, BC):
        i = i0 + tl.arange(0, BC)
        kb = tl.load(k + ((b * TC + i[:, None]) * H + h) * DK + dk[None, :],
                     mask=(i[:, None] < n_hi) & (dk[None, :] < DK), other=0.)
        vb = tl.load(v + ((b * TC + i[:, None]) * H + h) * DV + dv[None, :],
                     mask=(i[:, None] < n_hi) & (dv[None, :] < DV), other=0.)
        s = tl.dot(q_blk, tl.trans(kb)) * qk_scale
        p = tl.where(i[None, :] < n_vis[:, None], tl.math.exp2(s - lse2[:, None]), 0.)
        dp = tl.dot(do_blk, tl.trans(vb))
        ds = p * (dp - dlt[:, None])
        acc += tl.dot(ds.to(kb.dtype), kb)
    scale = qk_scale / 1.4426950408889634
    tl.store(dq + row[:, None] * DK + dk[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=t_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def compressed_bwd_dkv_kernel(q, k, v, do, lse, delta, dk_out, dv_out, T, TC, qk_scale, HQ: tl.constexpr,
                              H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_LEN: tl.constexpr,
                              BLOCK_STRIDE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                              BDK: tl.constexpr, BDV: tl.constexpr):
    """Grid (cdiv(TC, BC), B * H). dk [B, TC, H, DK], dv [B, TC, H, DV], summed over the group's G query heads."""
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    G: tl.constexpr = HQ // H
    i = pid_c * BC + tl.arange(0, BC)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    i_ok = i < TC
    kb = tl.load(k + ((b * TC + i[:, None]) * H + h) * DK + dk[None, :], mask=i_ok[:, None] & (dk[None, :] < DK),
                 other=0.)
    vb = tl.load(v + ((b * TC + i[:, None]) * H + h) * DV + dv[None, :], mask=i_ok[:, None] & (dv[None, :] < DV),
                 other=0.)
    dk_acc = tl.zeros([BC, BDK], tl.float32)
    dv_acc = tl.zeros([BC, BDV], tl.float32)
    t_first = pid_c * BC * BLOCK_STRIDE + BLOCK_LEN - 1  # first query that sees block pid_c * BC
    for g in range(G):
        hq = h * G + g
        for t0 in range((t_first // BT) * BT, T, BT):
            t = t0 + tl.arange(0, BT)
            t_ok = t < T
            row = (b * T + t) * HQ + hq
            q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=t_ok[:, None] & (dk[None, :] < DK), other=0.)
            do_blk = tl.load(do + row[:, None] * DV + dv[None, :], mask=t_ok[:, None] & (dv[None, :] < DV), other=0.)
            lse2 = tl.load(lse + row, mask=t_ok, other=0.) * 1.4426950408889634
            dlt = tl.load(delta + row, mask=t_ok, other=0.)
            n_vis = num_visible_blocks(t, BLOCK_LEN, BLOCK_STRIDE)
            s = tl.dot(q_blk, tl.trans(kb)) * qk_scale
            p = tl.where((i[None, :] < n_vis[:, None]) & t_ok[:, None], tl.math.exp2(s - lse2[:, None]), 0.)
            dv_acc += tl.dot(tl.trans(p.to(do_blk.dtype)), do_blk)
            dp = tl.dot(do_blk, tl.trans(vb))
            ds = p * (dp - dlt[:, None])
            dk_acc += tl.dot(tl.trans(ds.to(q_blk.dtype)), q_blk)
    scale = qk_scale / 1.4426950408889634
    tl.store(dk_out + ((b * TC + i[:, None]) * H + h) * DK + dk[None, :], (dk_acc * scale).to(dk_out.dtype.element_ty),
             mask=i_ok[:, None] & (dk[None, :] < DK))
    tl.store(dv_out + ((b * TC + i[:, None]) * H + h) * DV + dv[None, :], dv_acc.to(dv_out.dtype.element_ty),
             mask=i_ok[:, None] & (dv[None, :] < DV))


# ------------------------------------------------------------------------------------------- launchers
def _tiles(dk: int, dv: int):
    return triton.next_power_of_2(dk), triton.next_power_of_2(dv)


def compressed_fwd(q, k_cmp, v_cmp, block_len, block_stride, scale, bt=64, bc=64):
    """q [B, T, HQ, Dk], k_cmp/v_cmp [B, Tc, H, D] (contiguous) -> o [B, T, HQ, Dv], lse [B, T, HQ] float32."""
    B, T, HQ, DK = q.shape
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    o = torch.empty(B, T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    bdk, bdv = _tiles(DK, DV)
    compressed_fwd_kernel[(triton.cdiv(T, bt), B * HQ)](
        q, k_cmp, v_cmp, o, lse, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len, block_stride, bt, bc, bdk, bdv,
        num_warps=4 if max(bdk, bdv) <= 64 else 8, num_stages=2)
    return o, lse


def compressed_bwd(q, k_cmp, v_cmp, o, lse, do, block_len, block_stride, scale, bt=64, bc=64):
    """Gradients (dq, dk_cmp, dv_cmp) of compressed attention for output gradient do [B, T, HQ, Dv]."""
    B, T, HQ, DK = q.shape
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    delta = (o.float() * do.float()).sum(-1)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k_cmp)
    dv = torch.empty_like(v_cmp)
    bdk, bdv = _tiles(DK, DV)
    warps = 4 if max(bdk, bdv) <= 64 else 8
    compressed_bwd_dq_kernel[(triton.cdiv(T, bt), B * HQ)](
        q, k_cmp, v_cmp, do, lse, delta, dq, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len, block_stride,
        bt, bc, bdk, bdv, num_warps=warps, num_stages=2)
    if TC:
        compressed_bwd_dkv_kernel[(triton.cdiv(TC, bc), B * H)](
            q, k_cmp, v_cmp, do, lse, delta, dk, dv, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len, block_stride,
            bt, bc, bdk, bdv, num_warps=warps, num_stages=2)
    return dq, dk, dv


class CompressedAttention(torch.autograd.Function):
    """(q, k_cmp, v_cmp) -> (o, lse); lse carries no gradient (it feeds only the block selection)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block_len, block_stride, scale):
        q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
        o, lse = compressed_fwd(q, k_cmp, v_cmp, block_len, block_stride, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (block_len, block_stride, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = compressed_bwd(q, k_cmp, v_cmp, o, lse, do.contiguous(), *ctx.args)
        return dq, dk, dv, None, None, None


def compressed_attention(q, k_cmp, v_cmp, *, block_len=32, block_stride=16, scale=None):
    """Triton compressed attention; spec and shapes: reference.compressed_attention. Returns (o, lse)."""
    check_compressed("compressed_attention", q, k_cmp, v_cmp, block_len, block_stride, scale, triton=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return CompressedAttention.apply(q, k_cmp, v_cmp, block_len, block_stride, scale)
