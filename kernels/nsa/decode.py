"""One NSA decode step in Triton, over an NSA cache (raw K/V, compressed K/V, window). Spec: reference.nsa_decode.

1. compressed_decode_kernel, split along the compressed blocks (flash-decoding): per split, partial
   softmax statistics and output of all G heads of a KV head, and the scaled scores kept in a float32
   scratch [B, HQ, Tc_max] so that the selection reads G*4 bytes per block instead of the block's keys again;
2. select_decode_kernel, split along the selection blocks: each part merges the splits into lse (the first
   also into o_cmp) and ranks its chunks from the stored scores with the prefill's eq. 9 weights and running
   top-n (selection.py); merge_decode_kernel merges the parts' top-n lists;
3. sparse_decode_kernel: the selected blocks and the window's keys, cut in splits (a few selected blocks, or a
   chunk of the window, per program) so that the step's programs cover the GPU at any batch size; partial
   softmax statistics per split;
4. combine_decode_kernel merges the splits of each branch and writes the gated sum of the three branches.
Five launches per step; q and the gates may be strided views (of the model's projection output). fused_decode.py
does the same step in two launches (kernel_table("triton-fused") in the runtime); this path stays the default
until GPU timings decide.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.nsa.common import attend_tile, num_visible_blocks
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout
from nsa_eval.kernels.nsa.selection import block_of_key, chunk_blocks, merge_top, overlap_weights, ranking_keys
from nsa_eval.kernels.nsa.utils import check_decode, default_scale, index_bits
from nsa_eval.kernels.utils import LOG2E, dot_precision


@triton.jit
def _group_heads(b, h, HQ: tl.constexpr, H: tl.constexpr, GP: tl.constexpr):
    """The new-token query heads of KV head h of sequence b, padded to GP: g [GP] (head within the group), g_ok
    (g < G = HQ / H) and their rows hq = b * HQ + h * G + g in [B * HQ]."""
    G: tl.constexpr = HQ // H
    g = tl.arange(0, GP)
    return g, g < G, b * HQ + h * G + g


@triton.jit
def _group_queries(q, stride_qb, HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr,
                   GP: tl.constexpr):
    """The program's (axis 0 = b * H + h) new-token queries: the G = HQ / H heads of KV head h of sequence b, from
    q [B, HQ, DK] (batch stride stride_qb) -> b, h, g [GP] (head within the group), g_ok, hq [GP] (row in
    [B * HQ]), q_blk [GP, BDK] (zero padded)."""
    G: tl.constexpr = HQ // H
    pid_bh = tl.program_id(0)
    b, h = pid_bh // H, pid_bh % H
    g = tl.arange(0, GP)
    g_ok = g < G
    dk = tl.arange(0, BDK)
    q_blk = tl.load(q + b * stride_qb + (h * G + g)[:, None] * DK + dk[None, :], mask=g_ok[:, None] & (dk[None, :] < DK),
                    other=0.)
    return b, h, g, g_ok, b * HQ + h * G + g, q_blk


@triton.jit
def _store_split(part_m, part_l, part_o, hq, g_ok, dv, split, m_i, l_i, acc, DV: tl.constexpr, NSPLIT: tl.constexpr):
    """One split's online-softmax state of the group's heads (rows hq [GP] where g_ok) -> part_m, part_l
    [B, HQ, NSPLIT] and part_o [B, HQ, NSPLIT, DV], which the merge reads."""
    tl.store(part_m + hq * NSPLIT + split, m_i, mask=g_ok)
    tl.store(part_l + hq * NSPLIT + split, l_i, mask=g_ok)
    tl.store(part_o + (hq[:, None] * NSPLIT + split) * DV + dv[None, :], acc, mask=g_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def compressed_decode_kernel(q, stride_qb, k_cmp, v_cmp, cache_seqlens, scores, part_m, part_l, part_o, TC, qk_scale,
                             HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             BDK: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr, BLOCK_LEN: tl.constexpr,
                             BLOCK_STRIDE: tl.constexpr, BC: tl.constexpr, SPLIT_LEN: tl.constexpr,
                             NSPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B * H, NSPLIT). q [B, HQ, DK] (batch stride stride_qb); k_cmp/v_cmp [B, TC, H, D]; cache_seqlens [B]
    int32 -> scores [B, HQ, TC] (log2 units), part_m/part_l [B, HQ, NSPLIT], part_o [B, HQ, NSPLIT, DV] float32."""
    b, h, g, g_ok, hq, q_blk = _group_queries(q, stride_qb, HQ, H, DK, BDK, GP)
    split = tl.program_id(1)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    n_vis = num_visible_blocks(tl.load(cache_seqlens + b) - 1, BLOCK_LEN, BLOCK_STRIDE)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n_vis)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    for i0 in range(lo, hi, BC):
        i = i0 + tl.arange(0, BC)
        i_ok = i < hi
        kb = tl.load(k_cmp + ((b * TC + i[:, None]) * H + h) * DK + dk[None, :], mask=i_ok[:, None] & (dk[None, :] < DK),
                     other=0.)
        vb = tl.load(v_cmp + ((b * TC + i[:, None]) * H + h) * DV + dv[None, :], mask=i_ok[:, None] & (dv[None, :] < DV),
                     other=0.)
        s = tl.dot(q_blk, tl.trans(kb), input_precision=PRECISION) * qk_scale
        s = tl.where(i_ok[None, :], s, float("-inf"))
        tl.store(scores + hq[:, None] * TC + i[None, :], s, mask=g_ok[:, None] & i_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new
    _store_split(part_m, part_l, part_o, hq, g_ok, dv, split, m_i, l_i, acc, DV, NSPLIT)


@triton.jit
def _decode_group_probs(scores, hq, g_ok, lse2, n_vis, c, TC, BC: tl.constexpr):
    """Eq. 8 and 10 for the new token: compressed blocks [c*BC, c*BC + BC) -> group-summed probabilities [BC]."""
    i = c * BC + tl.arange(0, BC)
    visible = g_ok[:, None] & (i[None, :] < n_vis)
    s = tl.load(scores + hq[:, None] * TC + i[None, :], mask=visible, other=0.)
    return tl.sum(tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.), 0)


@triton.jit
def merged_lse2(part_m, part_l, hq, g_ok, NSPLIT: tl.constexpr):
    """The compressed branch's splits merged for query rows hq [GP] (g_ok: real heads) from their base-2 maxima and
    sums part_m, part_l [B, HQ, NSPLIT] -> m_safe [GP] (the row maximum, 0 where no split saw a key), l_i [GP] (the
    sum rescaled to m_safe; 0 where none saw one), lse2 [GP] (log2-sum-exp)."""
    sp = tl.arange(0, NSPLIT)
    m_s = tl.load(part_m + hq[:, None] * NSPLIT + sp[None, :], mask=g_ok[:, None], other=float("-inf"))
    m = tl.max(m_s, 1)
    m_safe = tl.where(m == float("-inf"), 0., m)
    l_i = tl.sum(tl.load(part_l + hq[:, None] * NSPLIT + sp[None, :], mask=g_ok[:, None], other=0.) *
                 tl.math.exp2(m_s - m_safe[:, None]), 1)
    return m_safe, l_i, m_safe + tl.math.log2(tl.where(l_i > 0, l_i, 1.))


@triton.jit
def rank_chunks(scores, hq, g_ok, lse2, pos, c_first, c_end, TC, BC: tl.constexpr, NP: tl.constexpr,
                BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr, IDX_BITS: tl.constexpr,
                LEADING: tl.constexpr, LOCAL: tl.constexpr):
    """Chunks [c_first, c_end) of NP selection blocks (BC compressed blocks each) of the new token at position pos,
    ranked from the scaled scores [B, HQ, TC] of query rows hq [GP] (g_ok: real heads) with their log2-sum-exp lse2
    [GP] (eq. 8-10 of the paper, the prefill's arithmetic in selection.py) -> the NP largest ranking keys [1, NP]
    int32, descending, -1 padded. The block before c_first spills its overlap into chunk c_first's first block."""
    n_vis = num_visible_blocks(pos, BLOCK_LEN, BLOCK_STRIDE)
    current = tl.full([1], 0, tl.int32) + pos // SELECT_LEN
    first_local = tl.full([1], 0, tl.int32) + tl.maximum(pos - LOCAL + 1, 0) // SELECT_LEN
    a = tl.arange(0, BC)
    jj = tl.arange(0, NP)
    weights = overlap_weights(a[:, None], jj[None, :], BLOCK_LEN, BLOCK_STRIDE, SELECT_LEN)
    spill = overlap_weights(a, NP, BLOCK_LEN, BLOCK_STRIDE, SELECT_LEN)
    top = tl.full([1, NP], -1, tl.int32)
    carry = tl.zeros([1], tl.float32)
    if c_first > 0:  # the previous chunk's last compressed blocks spill into this part's first block
        carry += tl.sum(_decode_group_probs(scores, hq, g_ok, lse2, n_vis, c_first - 1, TC, BC) * spill, 0)
    for c in range(c_first, tl.minimum(c_end, (pos // SELECT_LEN) // NP + 1)):
        p_group = _decode_group_probs(scores, hq, g_ok, lse2, n_vis, c, TC, BC)
        importance = tl.sum(p_group[:, None] * weights, 0)[None, :]
        importance += tl.where(jj[None, :] == 0, carry[:, None], 0.)
        carry = tl.sum(p_group * spill, 0) + tl.zeros([1], tl.float32)
        top = merge_top(top, ranking_keys(importance, c * NP + jj, current, first_local, LEADING, IDX_BITS), 1, NP)
    return top


@triton.jit
def select_decode_kernel(cache_seqlens, scores, part_m, part_l, part_o, o_cmp, part_top, TC, CHUNKS_PER_PART,
                         HQ: tl.constexpr, H: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr,
                         BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr,
                         NP: tl.constexpr, NSPLIT: tl.constexpr, NPART: tl.constexpr, IDX_BITS: tl.constexpr,
                         LEADING: tl.constexpr, LOCAL: tl.constexpr):
    """Grid (B * H, NPART). Every program merges the splits' statistics into lse (part 0 also writes
    o_cmp [B, HQ, DV]), then ranks its CHUNKS_PER_PART chunks of NP selection blocks from the stored scores
    -> part_top [B * H, NPART, NP] int32 ranking keys, best first."""
    BC: tl.constexpr = NP * (SELECT_LEN // BLOCK_STRIDE)
    pid_bh, part = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    _, g_ok, hq = _group_heads(b, h, HQ, H, GP)
    dv = tl.arange(0, BDV)
    m_safe, l_i, lse2 = merged_lse2(part_m, part_l, hq, g_ok, NSPLIT)
    seen = l_i > 0
    if part == 0:
        acc = tl.zeros([GP, BDV], tl.float32)
        for split in range(NSPLIT):  # one split at a time: a [GP, NSPLIT, BDV] tile would not fit in registers
            w = tl.math.exp2(tl.load(part_m + hq * NSPLIT + split, mask=g_ok, other=float("-inf")) - m_safe)
            acc += w[:, None] * tl.load(part_o + (hq[:, None] * NSPLIT + split) * DV + dv[None, :],
                                        mask=g_ok[:, None] & (dv[None, :] < DV), other=0.)
        tl.store(o_cmp + hq[:, None] * DV + dv[None, :], (acc / tl.where(seen, l_i, 1.)[:, None]).to(o_cmp.dtype.element_ty),
                 mask=g_ok[:, None] & (dv[None, :] < DV))

    pos = tl.load(cache_seqlens + b) - 1
    top = rank_chunks(scores, hq, g_ok, lse2, pos, part * CHUNKS_PER_PART, (part + 1) * CHUNKS_PER_PART, TC, BC, NP,
                      BLOCK_LEN, BLOCK_STRIDE, SELECT_LEN, IDX_BITS, LEADING, LOCAL)
    tl.store(part_top + (pid_bh * NPART + part) * NP + tl.arange(0, NP)[None, :], top)


@triton.jit
def merge_decode_kernel(part_top, block_indices, NUM_SELECTED: tl.constexpr, NP: tl.constexpr, NPART: tl.constexpr,
                        IDX_BITS: tl.constexpr):
    """Grid (B * H). The parts' top-NP keys -> block_indices [B, 1, H, n] int32, most important first."""
    pid_bh = tl.program_id(0)
    jj = tl.arange(0, NP)
    top = tl.full([1, NP], -1, tl.int32)
    for part in range(NPART):
        top = merge_top(top, tl.load(part_top + (pid_bh * NPART + part) * NP + jj[None, :]), 1, NP)
    tl.store(block_indices + pid_bh * NUM_SELECTED + jj[None, :], block_of_key(top, IDX_BITS),
             mask=jj[None, :] < NUM_SELECTED)


@triton.jit
def sparse_decode_kernel(q, stride_qb, k, v, k_win, v_win, cache_seqlens, block_indices, part_m, part_l, part_o, S,
                         qk_scale, HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BDK: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr, SELECT_LEN: tl.constexpr,
                         BS: tl.constexpr, NUM_SELECTED: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
                         SEL_SPLITS: tl.constexpr, WINDOW: tl.constexpr, WIN_CHUNK: tl.constexpr, NSPLIT: tl.constexpr,
                         RING: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B * H, NSPLIT). Split s < SEL_SPLITS: selected blocks [s * BLOCKS_PER_SPLIT, +BLOCKS_PER_SPLIT) of
    block_indices [B, 1, H, n] over k/v [B, S, H, D] (tokens after the query masked); split s >= SEL_SPLITS: chunk
    s - SEL_SPLITS (WIN_CHUNK keys) of the window: the last WINDOW positions of k_win/v_win (k/v themselves), or
    (RING) the filled slots [0, min(length, WINDOW)) of k_win/v_win [B, WINDOW, H, D]. -> part_m, part_l [B, HQ, NSPLIT] (log2 units),
    part_o [B, HQ, NSPLIT, DV] (unnormalised) float32."""
    b, h, g, g_ok, hq, q_blk = _group_queries(q, stride_qb, HQ, H, DK, BDK, GP)
    split = tl.program_id(1)
    dv = tl.arange(0, BDV)
    offs = tl.arange(0, BS)
    length = tl.load(cache_seqlens + b)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    if split < SEL_SPLITS:
        first = split * BLOCKS_PER_SPLIT
        for n in range(first, tl.minimum(first + BLOCKS_PER_SPLIT, NUM_SELECTED)):
            j = tl.load(block_indices + (b * H + h) * NUM_SELECTED + n)
            s_pos = tl.maximum(j, 0) * SELECT_LEN + offs
            key_ok = (s_pos < length) & (offs < tl.where(j >= 0, SELECT_LEN, 0))  # an unused slot (-1) loads nothing
            m_i, l_i, acc = attend_tile(q_blk, k + h * DK, v + h * DV, b * S + s_pos, key_ok, key_ok[None, :], m_i,
                                        l_i, acc, qk_scale, H, DK, DV, BDK, BDV, True, PRECISION)
    else:
        if RING:
            lo = (split - SEL_SPLITS) * WIN_CHUNK
            hi = tl.minimum(lo + WIN_CHUNK, tl.minimum(length, WINDOW))
            base = b * WINDOW
        else:
            lo = tl.maximum(length - WINDOW, 0) + (split - SEL_SPLITS) * WIN_CHUNK
            hi = tl.minimum(lo + WIN_CHUNK, length)
            base = b * S
        for i0 in range(lo, hi, BS):  # k_win/v_win are k/v themselves unless RING (the launcher passes them)
            key = i0 + offs
            m_i, l_i, acc = attend_tile(q_blk, k_win + h * DK, v_win + h * DV, base + key, key < hi,
                                        (key < hi)[None, :], m_i, l_i, acc, qk_scale, H, DK, DV, BDK, BDV, True,
                                        PRECISION)
    _store_split(part_m, part_l, part_o, hq, g_ok, dv, split, m_i, l_i, acc, DV, NSPLIT)


@triton.jit
def _merge_splits(part_m, part_l, part_o, hq, g_ok, dv, DV: tl.constexpr, GP: tl.constexpr, BDV: tl.constexpr,
                  FIRST: tl.constexpr, LAST: tl.constexpr, NSPLIT: tl.constexpr):
    """Splits [FIRST, LAST) of one branch -> its normalised output [GP, BDV] float32 (0 where nothing was seen)."""
    m = tl.full([GP], float("-inf"), tl.float32)
    for split in range(FIRST, LAST):
        m = tl.maximum(m, tl.load(part_m + hq * NSPLIT + split, mask=g_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0., m)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    for split in range(FIRST, LAST):
        w = tl.math.exp2(tl.load(part_m + hq * NSPLIT + split, mask=g_ok, other=float("-inf")) - m_safe)
        l_i += w * tl.load(part_l + hq * NSPLIT + split, mask=g_ok, other=0.)
        acc += w[:, None] * tl.load(part_o + (hq[:, None] * NSPLIT + split) * DV + dv[None, :],
                                    mask=g_ok[:, None] & (dv[None, :] < DV), other=0.)
    return acc / tl.where(l_i > 0, l_i, 1.)[:, None]


@triton.jit
def combine_decode_kernel(o_cmp, g_cmp, g_slc, g_win, stride_gb, stride_gh, part_m, part_l, part_o, out,
                          HQ: tl.constexpr, H: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr,
                          SEL_SPLITS: tl.constexpr, NSPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Grid (B * H). out [B, HQ, DV] = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, the selected (splits
    [0, SEL_SPLITS)) and window (the rest) outputs merged from sparse_decode_kernel's splits; gates [B, HQ] with
    strides (stride_gb, stride_gh), float32 math."""
    pid_bh = tl.program_id(0)
    b, h = pid_bh // H, pid_bh % H
    g, g_ok, hq = _group_heads(b, h, HQ, H, GP)
    dv = tl.arange(0, BDV)
    gate_at = b * stride_gb + (h * (HQ // H) + g) * stride_gh
    mask = g_ok[:, None] & (dv[None, :] < DV)
    o = tl.load(o_cmp + hq[:, None] * DV + dv[None, :], mask=mask, other=0.).to(tl.float32) * \
        tl.load(g_cmp + gate_at, mask=g_ok, other=0.).to(tl.float32)[:, None]
    o += tl.load(g_slc + gate_at, mask=g_ok, other=0.).to(tl.float32)[:, None] * \
        _merge_splits(part_m, part_l, part_o, hq, g_ok, dv, DV, GP, BDV, 0, SEL_SPLITS, NSPLIT)
    if HAS_WINDOW:
        o += tl.load(g_win + gate_at, mask=g_ok, other=0.).to(tl.float32)[:, None] * \
            _merge_splits(part_m, part_l, part_o, hq, g_ok, dv, DV, GP, BDV, SEL_SPLITS, NSPLIT, NSPLIT)
    tl.store(out + hq[:, None] * DV + dv[None, :], o.to(out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launcher
# compressed_decode_kernel: (compressed blocks per step of a program, warps, stages, programs to aim for)
TILES = {"compressed": (128, 8, 2, 264)}  # H200, 64k, d_k 192: 65 vs 76 us per step at batch 1, 84 vs 86 at 8


def _splits(programs_per_split: int, work: int) -> int:
    """Splits of `work` units (blocks, or key tiles) so that the step launches about 2 programs per SM of an H100."""
    return max(1, min(work, triton.next_power_of_2(triton.cdiv(264, 2 * programs_per_split))))


def _rows_view(x):
    """x [B, R, D] -> (x, its batch stride) when each batch element's rows are packed (strides (any, D, 1): a column
    slice of a wider row), else (a contiguous copy, R * D)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x, x.stride(0)
    return x.contiguous(), x.shape[1] * x.shape[2]


def decode_operands(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, gates, layout, scale, k_window,
                    v_window, leading_blocks, local_tokens):
    """The decode launchers' arguments checked (one-line errors), then what they pass (q as rows with its batch
    stride, the caches contiguous), their dims and the scale: -> (q, stride_qb, k_cache, v_cache, k_cmp_cache,
    v_cmp_cache), (B, HQ, Dk, S, Tc, H, Dv, BDK, BDV, GP), scale."""
    check_decode("nsa_decode", q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, gates, layout, scale,
                 triton=True, k_window=k_window, v_window=v_window, leading_blocks=leading_blocks,
                 local_tokens=local_tokens)
    scale = default_scale(q, scale)
    q, stride_qb = _rows_view(q)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    k_cmp_cache, v_cmp_cache = k_cmp_cache.contiguous(), v_cmp_cache.contiguous()
    B, HQ, DK = q.shape
    S, TC, H, DV = k_cache.shape[1], k_cmp_cache.shape[1], k_cmp_cache.shape[2], v_cmp_cache.shape[3]
    dims = (B, HQ, DK, S, TC, H, DV, triton.next_power_of_2(DK), triton.next_power_of_2(DV),
            max(16, triton.next_power_of_2(HQ // H)))
    return (q, stride_qb, k_cache, v_cache, k_cmp_cache, v_cmp_cache), dims, scale


def compressed_splits(TC: int, programs_bh: int):
    """compressed_decode_kernel's tiling for Tc compressed blocks and B * H (programs_bh) KV heads: -> (BC, warps,
    stages, NSPLIT splits, SPLIT_LEN blocks per split), enough splits to cover the GPU's programs."""
    bc, warps, stages, programs = TILES["compressed"]
    nsplit = max(1, min(triton.next_power_of_2(triton.cdiv(max(TC, 1), bc)), triton.next_power_of_2(
        triton.cdiv(programs, programs_bh))))
    return bc, warps, stages, nsplit, triton.cdiv(triton.cdiv(max(TC, 1), nsplit), bc) * bc


def nsa_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win=None, *,
               layout: NSALayout = PAPER_LAYOUT, scale=None, k_window=None, v_window=None, leading_blocks=1,
               local_tokens=None, return_block_indices=False):
    """Triton NSA decode step in five launches (fused_decode.nsa_decode: the same in two); spec and shapes:
    reference.nsa_decode (return_block_indices: also the selected blocks [B, 1, H, n] int32). cache_seqlens' values
    are not checked here (that would cost a device-to-host copy per step): each must lie in [1, S_max]. q may be a
    view whose batch stride is not HQ * Dk (a slice of a wider projection output), gates views with any strides."""
    (q, stride_qb, k_cache, v_cache, k_cmp_cache, v_cmp_cache), dims, scale = decode_operands(
        q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win},
        layout, scale, k_window, v_window, leading_blocks, local_tokens)
    B, HQ, DK, S, TC, H, DV, bdk, bdv, gp = dims
    block_len, block_stride, select_len = layout.block_len, layout.block_stride, layout.select_len
    num_selected, window = layout.num_selected, layout.window
    bc, warps, stages, nsplit, split_len = compressed_splits(TC, B * H)
    f32 = dict(dtype=torch.float32, device=q.device)
    scores = torch.empty(B, HQ, max(TC, 1), **f32)
    part_m, part_l = torch.empty(B, HQ, nsplit, **f32), torch.empty(B, HQ, nsplit, **f32)
    part_o = torch.empty(B, HQ, nsplit, DV, **f32)
    compressed_decode_kernel[(B * H, nsplit)](
        q, stride_qb, k_cmp_cache, v_cmp_cache, cache_seqlens, scores, part_m, part_l, part_o, TC, scale * LOG2E, HQ,
        H, DK, DV, bdk, bdv, gp, block_len, block_stride, bc, split_len, nsplit, PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    o_cmp = torch.empty(B, HQ, DV, dtype=q.dtype, device=q.device)
    np_ = chunk_blocks(layout)
    num_chunks = triton.cdiv(triton.cdiv(S, select_len), np_)  # chunks of the longest cache
    nparts = max(1, min(num_chunks, triton.cdiv(264, B * H)))
    chunks_per_part = triton.cdiv(num_chunks, nparts)
    nparts = triton.cdiv(num_chunks, chunks_per_part)
    part_top = torch.empty(B * H, nparts, np_, dtype=torch.int32, device=q.device)
    bits = index_bits(triton.cdiv(S, select_len))
    select_decode_kernel[(B * H, nparts)](
        cache_seqlens, scores, part_m, part_l, part_o, o_cmp, part_top, max(TC, 1), chunks_per_part, HQ, H, DV, bdv,
        gp, block_len, block_stride, select_len, np_, nsplit, nparts, bits, leading_blocks,
        select_len + 1 if local_tokens is None else local_tokens, num_warps=4)
    block_indices = torch.empty(B, 1, H, num_selected, dtype=torch.int32, device=q.device)
    merge_decode_kernel[(B * H,)](part_top, block_indices, num_selected, np_, nparts, bits, num_warps=1)

    bs = max(16, triton.next_power_of_2(select_len))
    sel_splits = _splits(B * H, num_selected)
    blocks_per_split = triton.cdiv(num_selected, sel_splits)
    sel_splits = triton.cdiv(num_selected, blocks_per_split)
    win_splits = _splits(B * H, triton.cdiv(window, bs)) if window else 0
    win_chunk = triton.cdiv(triton.cdiv(window, win_splits), bs) * bs if window else bs
    splits = sel_splits + win_splits
    part_m, part_l = torch.empty(B, HQ, splits, **f32), torch.empty(B, HQ, splits, **f32)
    part_o = torch.empty(B, HQ, splits, DV, **f32)
    ring = k_window is not None
    k_win, v_win = (k_window.contiguous(), v_window.contiguous()) if ring else (k_cache, v_cache)
    sparse_decode_kernel[(B * H, splits)](
        q, stride_qb, k_cache, v_cache, k_win, v_win, cache_seqlens, block_indices, part_m, part_l, part_o, S,
        scale * LOG2E, HQ, H, DK, DV, bdk, bdv, gp, select_len, bs, num_selected, blocks_per_split, sel_splits,
        window, win_chunk, splits, ring, PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2)
    out = torch.empty(B, HQ, DV, dtype=q.dtype, device=q.device)
    gates = [g_cmp, g_slc] + ([g_win] if window else [])
    if len({g.stride() for g in gates}) > 1:  # the kernel takes one pair of strides for all gates
        gates = [g.contiguous() for g in gates]
    combine_decode_kernel[(B * H,)](
        o_cmp, *gates[:2], gates[-1], gates[0].stride(0), gates[0].stride(1), part_m, part_l, part_o, out, HQ, H, DV, bdv,
        gp, sel_splits, splits, bool(window), num_warps=4)
    return (out, block_indices) if return_block_indices else out
