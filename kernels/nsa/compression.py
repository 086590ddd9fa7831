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

from nsa_eval.kernels.nsa.utils import check_compressed, check_reference_only

LOG2E = 1.4426950408889634


@triton.jit
def num_visible_blocks(t, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr):
    """Compressed blocks a query at position t sees (0 before the first block is complete)."""
    return tl.maximum(t + 1 - BLOCK_LEN + BLOCK_STRIDE, 0) // BLOCK_STRIDE


@triton.jit
def row_dot_kernel(a, b, out, ROWS, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Grid (cdiv(ROWS, BR)). out[r] = sum_d a[r, d] * b[r, d] in float32 (a, b [ROWS, D] row-major)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    mask = (r[:, None] < ROWS) & (d[None, :] < D)
    x = tl.load(a + r[:, None] * D + d[None, :], mask=mask, other=0.).to(tl.float32)
    y = tl.load(b + r[:, None] * D + d[None, :], mask=mask, other=0.).to(tl.float32)
    tl.store(out + r, tl.sum(x * y, 1), mask=r < ROWS)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1) in float32 for contiguous a, b [..., D], without float32 temporaries."""
    rows, D = a.numel() // a.shape[-1], a.shape[-1]
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    row_dot_kernel[(triton.cdiv(rows, 32),)](a, b, out, rows, D, 32, triton.next_power_of_2(D), num_warps=4)
    return out


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
    """Grid (cdiv(TC, BC), B * HQ). Per query head: dk_out [B, TC, HQ, DK], dv_out [B, TC, HQ, DV] float32
    (the launcher sums the G heads of each group)."""
    pid_c, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // HQ, pid_bh % HQ
    h = hq // (HQ // H)
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
    t_full = (pid_c * BC + BC - 1) * BLOCK_STRIDE + BLOCK_LEN - 1  # from here on every query sees the whole tile
    for t0 in range((t_first // BT) * BT, T, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < T
        row = (b * T + t) * HQ + hq
        q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=t_ok[:, None] & (dk[None, :] < DK), other=0.)
        do_blk = tl.load(do + row[:, None] * DV + dv[None, :], mask=t_ok[:, None] & (dv[None, :] < DV), other=0.)
        lse2 = tl.load(lse + row, mask=t_ok, other=0.) * 1.4426950408889634
        dlt = tl.load(delta + row, mask=t_ok, other=0.)
        s = tl.dot(q_blk, tl.trans(kb)) * qk_scale
        if t0 < t_full:
            n_vis = num_visible_blocks(t, BLOCK_LEN, BLOCK_STRIDE)
            p = tl.where((i[None, :] < n_vis[:, None]) & t_ok[:, None], tl.math.exp2(s - lse2[:, None]), 0.)
        else:  # rows past T load zeros: q = do = 0 and delta = 0 make their terms vanish
            p = tl.math.exp2(s - lse2[:, None])
        dv_acc += tl.dot(tl.trans(p.to(do_blk.dtype)), do_blk)
        dp = tl.dot(do_blk, tl.trans(vb))
        ds = p * (dp - dlt[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(q_blk.dtype)), q_blk)
    scale = qk_scale / 1.4426950408889634
    tl.store(dk_out + ((b * TC + i[:, None]) * HQ + hq) * DK + dk[None, :], dk_acc * scale,
             mask=i_ok[:, None] & (dk[None, :] < DK))
    tl.store(dv_out + ((b * TC + i[:, None]) * HQ + hq) * DV + dv[None, :], dv_acc,
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


def compressed_fwd(q, k_cmp, v_cmp, block_len, block_stride, scale):
    """q [B, T, HQ, Dk], k_cmp/v_cmp [B, Tc, H, D] (contiguous) -> o [B, T, HQ, Dv], lse [B, T, HQ] float32."""
    B, T, HQ, DK = q.shape
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    o = torch.empty(B, T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    bdk, bdv = _tiles(DK, DV)
    bt, bc, warps, stages = tiles_for(TILES["fwd"], q.dtype)
    compressed_fwd_kernel[(triton.cdiv(T, bt), B * HQ)](
        q, k_cmp, v_cmp, o, lse, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len, block_stride, bt, bc, bdk, bdv,
        num_warps=warps, num_stages=stages)
    return o, lse


def compressed_bwd(q, k_cmp, v_cmp, o, lse, do, block_len, block_stride, scale):
    """Gradients (dq, dk_cmp, dv_cmp) of compressed attention for output gradient do [B, T, HQ, Dv]."""
    B, T, HQ, DK = q.shape
    TC, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    delta = row_dot(o, do)
    dq = torch.empty_like(q)
    dk = torch.empty(B, TC, HQ, DK, dtype=torch.float32, device=q.device)  # per query head, summed below
    dv = torch.empty(B, TC, HQ, DV, dtype=torch.float32, device=q.device)
    bdk, bdv = _tiles(DK, DV)
    bt, bc, warps, stages = tiles_for(TILES["dq"], q.dtype)
    compressed_bwd_dq_kernel[(triton.cdiv(T, bt), B * HQ)](
        q, k_cmp, v_cmp, do, lse, delta, dq, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len, block_stride,
        bt, bc, bdk, bdv, num_warps=warps, num_stages=stages)
    if TC:
        bt, bc, warps, stages = tiles_for(TILES["dkv"], q.dtype)
        compressed_bwd_dkv_kernel[(triton.cdiv(TC, bc), B * HQ)](
            q, k_cmp, v_cmp, do, lse, delta, dk, dv, T, TC, scale * LOG2E, HQ, H, DK, DV, block_len, block_stride,
            bt, bc, bdk, bdv, num_warps=warps, num_stages=stages)
    group = (B, TC, H, HQ // H)
    return dq, dk.view(*group, DK).sum(3).to(k_cmp.dtype), dv.view(*group, DV).sum(3).to(v_cmp.dtype)


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


def compressed_attention(q, k_cmp, v_cmp, *, block_len=32, block_stride=16, scale=None, cu_seqlens=None):
    """Triton compressed attention; spec and shapes: reference.compressed_attention. Returns (o, lse).
    cu_seqlens (packed batches) is not supported here yet: ValueError."""
    check_reference_only("compressed_attention", cu_seqlens)
    check_compressed("compressed_attention", q, k_cmp, v_cmp, block_len, block_stride, scale, triton=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return CompressedAttention.apply(q, k_cmp, v_cmp, block_len, block_stride, scale)
