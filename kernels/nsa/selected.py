"""Selected attention (eq. 11-12) in Triton, group-centric as the paper's Figure 3.

Forward and dq: one program per (query position, KV head) loads all G query heads of the group at that
position (the rows of one tensor-core tile) and streams only the n chosen KV blocks of length l', masking
the tokens after the query. dk/dv: the (query, block) pairs are sorted by block on the device (an inverted
index, no host sync); each program takes one block and a segment of at most SEGMENT queries that chose it,
gathers their G heads as rows and adds its block's dk/dv with float32 atomics, so a block every query chose
(block 0) spreads over many programs.

Kernels -> launchers -> autograd Function -> public `selected_attention` (spec: reference.selected_attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.nsa.common import Packing, attend_tile, backward_rows, row_dot, store_attention
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout, check_layout
from nsa_eval.kernels.nsa.utils import (check_block_indices, check_offset_backward, check_prefill_length, check_qkv,
                                        check_varlen, default_scale)
from nsa_eval.kernels.utils import LOG2E, dot_precision


@triton.jit
def _program_queries(T, H: tl.constexpr, TPP: tl.constexpr):
    """Program (axis 0: TPP consecutive queries, axis 1: b * H + h) -> b, h and its query rows [t_lo, t_hi)."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    return pid_bh // H, pid_bh % H, pid_t * TPP, tl.minimum(pid_t * TPP + TPP, T)


@triton.jit
def selected_fwd_kernel(q, k, v, block_indices, token_starts, o, lse, T, S, qk_scale,
                        HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                        BDV: tl.constexpr, GP: tl.constexpr, SELECT_LEN: tl.constexpr, BS: tl.constexpr,
                        NUM_SELECTED: tl.constexpr, TPP: tl.constexpr, VARLEN: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Grid (cdiv(T, TPP), B * H): TPP consecutive queries per program, one after the other (their shared
    blocks, 0 and the local ones, then come from L1). q [B, T, HQ, DK], k [B, S, H, DK], v [B, S, H, DV],
    block_indices [B, T, H, n] int32 -> o [B, T, HQ, DV], lse [B, T, HQ] float32. Prefill: the query at row t
    stands at position t + S - T (S >= T: the queries are the last T of the S keys).
    VARLEN: B == 1, row t's sequence starts at row token_starts[t]; positions and blocks count from there."""
    G: tl.constexpr = HQ // H
    b, h, t_lo, t_hi = _program_queries(T, H, TPP)
    g = tl.arange(0, GP)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    offs = tl.arange(0, BS)
    for t in range(t_lo, t_hi):
        kv_start = b * S
        if VARLEN:
            kv_start = tl.load(token_starts + t)
            pos = t - kv_start
        else:
            pos = t + S - T
        qrow = (b * T + t) * HQ + h * G + g
        q_blk = tl.load(q + qrow[:, None] * DK + dk[None, :], mask=(g[:, None] < G) & (dk[None, :] < DK), other=0.)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BDV], tl.float32)
        for n in range(NUM_SELECTED):
            j = tl.load(block_indices + ((b * T + t) * H + h) * NUM_SELECTED + n)
            s_pos = tl.maximum(j, 0) * SELECT_LEN + offs
            key_ok = (s_pos <= pos) & (offs < tl.where(j >= 0, SELECT_LEN, 0))  # an unused slot (-1) loads nothing
            m_i, l_i, acc = attend_tile(q_blk, k + h * DK, v + h * DV, kv_start + s_pos, key_ok, key_ok[None, :], m_i,
                                        l_i, acc, qk_scale, H, DK, DV, BDK, BDV, True, PRECISION)
        store_attention(o, lse, qrow, g < G, m_i, l_i, acc, dv, DV)


@triton.jit
def selected_bwd_dq_kernel(q, k, v, block_indices, token_starts, do, lse, delta, dq, T, qk_scale,
                           HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                           BDV: tl.constexpr, GP: tl.constexpr, SELECT_LEN: tl.constexpr, BS: tl.constexpr,
                           NUM_SELECTED: tl.constexpr, TPP: tl.constexpr, VARLEN: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Grid (cdiv(T, TPP), B * H). dq [B, T, HQ, DK]; do [B, T, HQ, DV]; lse, delta = rowsum(o * do): [B, T, HQ]
    float32. VARLEN as in the forward."""
    G: tl.constexpr = HQ // H
    b, h, t_lo, t_hi = _program_queries(T, H, TPP)
    g = tl.arange(0, GP)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    g_ok = g < G
    offs = tl.arange(0, BS)
    for t in range(t_lo, t_hi):
        if VARLEN:
            kv_start = tl.load(token_starts + t)
        else:
            kv_start = b * T
        pos = b * T + t - kv_start
        qrow = (b * T + t) * HQ + h * G + g
        q_blk, do_blk, lse2, dlt = backward_rows(q, do, lse, delta, qrow, g_ok, dk, dv, DK, DV)
        acc = tl.zeros([GP, BDK], tl.float32)
        for n in range(NUM_SELECTED):
            j = tl.load(block_indices + ((b * T + t) * H + h) * NUM_SELECTED + n)
            s_pos = tl.maximum(j, 0) * SELECT_LEN + offs
            key_ok = (s_pos <= pos) & (offs < tl.where(j >= 0, SELECT_LEN, 0))
            kv_row = (kv_start + s_pos) * H + h
            kb = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.)
            vb = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.)
            s = tl.dot(q_blk, tl.trans(kb), input_precision=PRECISION) * qk_scale
            p = tl.where(key_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.)
            dp = tl.dot(do_blk, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - dlt[:, None])
            acc += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
        tl.store(dq + qrow[:, None] * DK + dk[None, :], (acc * (qk_scale / 1.4426950408889634)).to(dq.dtype.element_ty),
                 mask=g_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def selected_bwd_dkv_kernel(q, k, v, do, lse, delta, pair_tokens, pair_offsets, segment_keys, segment_first,
                            block_starts, block_ends, dk32, dv32, T, qk_scale, NUM_KEYS, HQ: tl.constexpr,
                            H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                            GP: tl.constexpr, SELECT_LEN: tl.constexpr, BS: tl.constexpr, NJ: tl.constexpr,
                            BTQ: tl.constexpr, SEGMENT: tl.constexpr, VARLEN: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Grid (number of segments, an upper bound). Segment p belongs to key = segment_keys[p] = (b*H + h)*NJ + j
    (>= NUM_KEYS: nothing to do) and covers pair_tokens[pair_offsets[key] + (p - segment_first[key]) * SEGMENT:]
    (at most SEGMENT queries that chose block j). Adds into dk32 [B, T, H, DK], dv32 [B, T, H, DV] float32.
    VARLEN: B == 1, j numbers the blocks of all sequences one after the other; block j is rows
    [block_starts[j], min(block_starts[j] + SELECT_LEN, block_ends[j])) and pair_tokens are rows too."""
    G: tl.constexpr = HQ // H
    R: tl.constexpr = BTQ * GP
    pid = tl.program_id(0)
    key = tl.load(segment_keys + pid)
    if key < NUM_KEYS:
        bh = key // NJ
        j = key % NJ
        b, h = bh // H, bh % H
        start = tl.load(pair_offsets + key) + (pid - tl.load(segment_first + key)) * SEGMENT
        end = tl.minimum(start + SEGMENT, tl.load(pair_offsets + key + 1))
        dk = tl.arange(0, BDK)
        dv = tl.arange(0, BDV)
        offs = tl.arange(0, BS)
        if VARLEN:  # rows of the packed tensor (b == 0); a query sees a block only within its sequence
            s_pos = tl.load(block_starts + j) + offs
            s_end = tl.load(block_ends + j)
        else:
            s_pos = j * SELECT_LEN + offs
            s_end = T
        key_ok = (offs < SELECT_LEN) & (s_pos < s_end)
        kv_row = (b * T + s_pos) * H + h
        kb = tl.load(k + kv_row[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.)
        vb = tl.load(v + kv_row[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.)
        dk_acc = tl.zeros([BS, BDK], tl.float32)
        dv_acc = tl.zeros([BS, BDV], tl.float32)
        rows = tl.arange(0, R)
        g = rows % GP
        for p0 in range(start, end, BTQ):
            pair = p0 + rows // GP
            row_ok = (pair < end) & (g < G)
            t = tl.load(pair_tokens + pair, mask=row_ok, other=0)
            qrow = (b * T + t) * HQ + h * G + g
            q_blk = tl.load(q + qrow[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.)
            do_blk = tl.load(do + qrow[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                             other=0.)
            lse2 = tl.load(lse + qrow, mask=row_ok, other=0.) * 1.4426950408889634
            dlt = tl.load(delta + qrow, mask=row_ok, other=0.)
            s = tl.dot(q_blk, tl.trans(kb), input_precision=PRECISION) * qk_scale
            visible = row_ok[:, None] & key_ok[None, :] & (s_pos[None, :] <= t[:, None])
            p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.)
            dv_acc += tl.dot(tl.trans(p.to(do_blk.dtype)), do_blk, input_precision=PRECISION)
            dp = tl.dot(do_blk, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - dlt[:, None])
            dk_acc += tl.dot(tl.trans(ds.to(q_blk.dtype)), q_blk, input_precision=PRECISION)
        scale = qk_scale / 1.4426950408889634
        tl.atomic_add(dk32 + kv_row[:, None] * DK + dk[None, :], dk_acc * scale, mask=key_ok[:, None] & (dk[None, :] < DK),
                      sem="relaxed")
        tl.atomic_add(dv32 + kv_row[:, None] * DV + dv[None, :], dv_acc, mask=key_ok[:, None] & (dv[None, :] < DV),
                      sem="relaxed")


# ------------------------------------------------------------------------------------------- launchers
# dkv: (query rows per step = tokens x padded group, queries per segment, warps, stages)
TILES = {"fwd": (4, 2, 4), "dq": (4, 2, 4), "dkv": (64, 256, 4, 2)}  # fwd/dq: (warps, stages, queries per program)


def _tile_sizes(q, v, H, select_len):
    return (triton.next_power_of_2(q.shape[3]), triton.next_power_of_2(v.shape[3]),
            max(16, triton.next_power_of_2(q.shape[2] // H)), max(16, triton.next_power_of_2(select_len)))


def selected_fwd(q, k, v, block_indices, select_len, scale, packing: Packing | None = None):
    """q [B, T, HQ, Dk], k/v [B, S, H, D], block_indices [B, T, H, n] (contiguous) -> o, lse [B, T, HQ] float32.
    With packing (B == 1), each query at its position within its sequence."""
    B, T, HQ, DK = q.shape
    S, H, DV = k.shape[1], k.shape[2], v.shape[3]
    o = torch.empty(B, T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    bdk, bdv, gp, bs = _tile_sizes(q, v, H, select_len)
    warps, stages, tpp = TILES["fwd"]
    token_starts = block_indices if packing is None else packing.token_starts()
    selected_fwd_kernel[(triton.cdiv(T, tpp), B * H)](
        q, k, v, block_indices, token_starts, o, lse, T, S, scale * LOG2E,
        HQ, H, DK, DV, bdk, bdv, gp, select_len, bs, block_indices.shape[3], tpp, packing is not None,
        PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def inverted_index(block_indices, num_blocks: int, segment: int, first_blocks=None):
    """Queries per selection block, cut in segments, built on the device without a host sync.

    block_indices [B, T, H, n] -> (pair_tokens [P] int32 query positions sorted by key = (b*H + h)*NJ + j,
    pair_offsets [NK + 1] where key's queries start, segment_keys [grid] key of each segment (NK past the last),
    segment_first [NK] first segment of each key, grid); NK = B*H*NJ, grid an upper bound on the segments.
    first_blocks [T] (packed, B == 1): added to each query's block indices, so j numbers all sequences' blocks.
    """
    B, T, H, n = block_indices.shape
    num_keys = B * H * num_blocks
    dev = block_indices.device
    bh = (torch.arange(B, device=dev)[:, None, None, None] * H + torch.arange(H, device=dev)[None, None, :, None])
    first = 0 if first_blocks is None else first_blocks[None, :, None, None]
    keys = torch.where(block_indices >= 0, bh * num_blocks + first + block_indices, num_keys).flatten()
    tokens = torch.arange(T, device=dev, dtype=torch.int32)[None, :, None, None].expand(B, T, H, n).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    pair_tokens = tokens[order].contiguous()
    pair_offsets = torch.searchsorted(sorted_keys, torch.arange(num_keys + 1, device=dev)).to(torch.int32)
    segments = (pair_offsets[1:] - pair_offsets[:-1] + segment - 1) // segment
    segment_end = torch.cumsum(segments, 0)
    segment_first = (segment_end - segments).to(torch.int32)
    grid = triton.cdiv(keys.numel(), segment) + num_keys
    segment_keys = torch.searchsorted(segment_end, torch.arange(grid, device=dev), right=True).to(torch.int32)
    return pair_tokens, pair_offsets, segment_keys, segment_first, grid


def packed_blocks(packing: Packing, select_len: int):
    """Selection blocks of all packed sequences numbered one after the other: (first block of each token's
    sequence [T], first row of each block [NJ], end row of its sequence [NJ]) int32, and NJ."""
    dev = packing.cu.device
    starts, ends, firsts = [], [], []
    for bos, length in zip(packing.cu.tolist(), packing.lengths):
        count = triton.cdiv(length, select_len)
        firsts.append(len(starts))
        starts += [bos + j * select_len for j in range(count)]
        ends += [bos + length] * count
    first_blocks = torch.repeat_interleave(torch.tensor(firsts, dtype=torch.int32, device=dev),
                                           torch.tensor(packing.lengths, device=dev))
    as_tensor = (lambda x: torch.tensor(x, dtype=torch.int32, device=dev))
    return first_blocks, as_tensor(starts), as_tensor(ends), len(starts)


def selected_bwd(q, k, v, block_indices, o, lse, do, select_len, scale, packing: Packing | None = None):
    """Gradients (dq, dk, dv) of selected attention for output gradient do [B, T, HQ, Dv]."""
    B, T, HQ, DK = q.shape
    H, DV = k.shape[2], v.shape[3]
    delta = row_dot(o, do)
    bdk, bdv, gp, bs = _tile_sizes(q, v, H, select_len)
    dq = torch.empty_like(q)
    warps, stages, tpp = TILES["dq"]
    token_starts = block_indices if packing is None else packing.token_starts()
    selected_bwd_dq_kernel[(triton.cdiv(T, tpp), B * H)](
        q, k, v, block_indices, token_starts, do, lse, delta, dq, T, scale * LOG2E, HQ, H, DK, DV, bdk, bdv, gp,
        select_len, bs, block_indices.shape[3], tpp, packing is not None, PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    rows, segment, warps, stages = TILES["dkv"]
    if packing is None:
        first_blocks, block_starts, block_ends, num_blocks = None, block_indices, block_indices, triton.cdiv(T, select_len)
    else:
        first_blocks, block_starts, block_ends, num_blocks = packed_blocks(packing, select_len)
    pair_tokens, pair_offsets, segment_keys, segment_first, grid = inverted_index(block_indices, num_blocks, segment,
                                                                                  first_blocks)
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    gq = triton.next_power_of_2(HQ // H)
    selected_bwd_dkv_kernel[(grid,)](
        q, k, v, do, lse, delta, pair_tokens, pair_offsets, segment_keys, segment_first, block_starts, block_ends,
        dk32, dv32, T, scale * LOG2E, B * H * num_blocks, HQ, H, DK, DV, bdk, bdv, gq, select_len, bs, num_blocks,
        max(1, rows // gq), segment, packing is not None, PRECISION=dot_precision(q.dtype), num_warps=warps,
        num_stages=stages)
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


class SelectedAttention(torch.autograd.Function):
    """(q, k, v) -> o for fixed block_indices (which carry no gradient). Backward for S == T (or packed) only
    (callers refuse a graph otherwise: utils.check_offset_backward)."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, select_len, scale, packing=None):
        q, k, v, block_indices = q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous()
        o, lse = selected_fwd(q, k, v, block_indices, select_len, scale, packing=packing)
        ctx.save_for_backward(q, k, v, block_indices, o, lse)
        ctx.args = (select_len, scale, packing)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, block_indices, o, lse = ctx.saved_tensors
        dq, dk, dv = selected_bwd(q, k, v, block_indices, o, lse, do.contiguous(), *ctx.args)
        return dq, dk, dv, None, None, None, None


def selected_attention(q, k, v, block_indices, *, layout: NSALayout = PAPER_LAYOUT, scale=None, cu_seqlens=None):
    """Triton selected attention; spec and shapes: reference.selected_attention. S > T (queries offset into the
    keys) runs forward only: ValueError if a gradient is needed."""
    op = "selected_attention"
    check_layout(op, layout)
    check_qkv(op, q, k, v, triton=True)
    check_block_indices(op, block_indices, q, k.shape[2])
    packing = None
    if cu_seqlens is None:
        check_prefill_length(op, q, k)
        check_offset_backward(op, k.shape[1] - q.shape[1], q, k, v)
    else:
        packing = Packing.of(*check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride,
                                           num_keys=k.shape[1]), q.device)
    scale = default_scale(q, scale)
    return SelectedAttention.apply(q, k, v, block_indices, layout.select_len, scale, packing)
