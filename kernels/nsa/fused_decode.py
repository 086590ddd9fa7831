"""One NSA decode step in two launches (issue 20). Spec: reference.nsa_decode; decode.py is the five-launch path.

1. compressed_kernel, grid (B * H, NSPLIT): decode.compressed_decode_kernel as it is (per split of the compressed
   blocks, the partial softmax state of the G query heads of a KV head, and their scaled scores in a float32 scratch
   [B, HQ, Tc_max]); its programs (b * H + h, 0) also zero the counters launch 2 runs on (below), so nothing is kept
   between steps and a CUDA graph replays the step as it is.
2. fused_decode_kernel, a 1-D grid of B * H * (NPART + 1 + NWIN + NSEL) programs. Each program first draws a ticket
   (an atomic counter) and does the work item of that number, so an item only ever waits for items of lower tickets,
   which have started: no deadlock, in whatever order the GPU runs the programs. Items in ticket order:
   - ranking part p of (b, h) (NPART per KV head): merges launch 1's split statistics into the log-sum-exp, ranks its
     chunks of selection blocks from the stored scores (eq. 8-10 and the running top-NP of selection.py, as
     decode.select_decode_kernel) and stores its NP best ranking keys; the last part of (b, h) to finish (a counter)
     merges the NPART lists into the top n (the n-th largest key found by bisection over the int32 keys), writes
     block_indices and raises (b, h)'s ready flag;
   - the compressed merge of (b, h): launch 1's splits -> the normalised compressed output (float32 scratch);
   - window chunk c of (b, h) (NWIN per KV head): WIN_CHUNK of the window's keys;
   - selected split s of (b, h) (NSEL per KV head): waits for the ready flag, then BLOCKS_PER_SPLIT of the n selected
     blocks (tokens after the query masked);
   and the last of the 1 + NWIN + NSEL attention items of (b, h) to finish (a counter) merges the splits of each
   branch and writes the gated sum g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.
Cross-program data (ranking keys, block indices, partial outputs) is published with a CTA barrier then a release
atomic and read after an acquire atomic, through L2 (cache_modifier=".cg"). The selection equals the five-launch
path's: the same scores, the same lse arithmetic and the same ranking keys; only the merge of the parts' lists
differs (a selection of the n largest of unique keys, then the same descending order).

Kernel -> launcher -> public `nsa_decode` (the signature of reference.nsa_decode). The runtime picks this path with
kernel_table("triton-fused") (model_adapters/runtime/ops.py); `kernel_table("triton")` keeps the five launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.nsa.common import attend_tile
from nsa_eval.kernels.nsa.decode import (_group_heads, _splits, compressed_decode_kernel, compressed_splits,
                                         decode_operands, merged_lse2, rank_chunks)
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout
from nsa_eval.kernels.nsa.selection import block_of_key, chunk_blocks, merge_top
from nsa_eval.kernels.nsa.utils import index_bits
from nsa_eval.kernels.utils import LOG2E, dot_precision

# counters int32 [1 + 3 * B * H]: the ticket at 0, then per (b, h) at 1 + 3 * (b * H + h):
RANKED = tl.constexpr(0)  # ranking parts done
READY = tl.constexpr(1)  # 1 once block_indices of (b, h) are written
ATTENDED = tl.constexpr(2)  # attention items done (compressed merge, window chunks, selected splits)


@triton.jit
def compressed_kernel(q, stride_qb, k_cmp, v_cmp, cache_seqlens, scores, part_m, part_l, part_o, counters, TC, qk_scale,
                      HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr,
                      BDV: tl.constexpr, GP: tl.constexpr, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr,
                      BC: tl.constexpr, SPLIT_LEN: tl.constexpr, NSPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (B * H, NSPLIT). decode.compressed_decode_kernel (shapes there: scores [B, HQ, TC], part_m/part_l
    [B, HQ, NSPLIT], part_o [B, HQ, NSPLIT, DV] float32), and counters int32 [1 + 3 * B * H] zeroed for
    fused_decode_kernel: (b, h)'s three by program (b * H + h, 0), the ticket by program (0, 0)."""
    pid_bh = tl.program_id(0)
    if tl.program_id(1) == 0:
        c = tl.arange(0, 4)
        tl.store(counters + 1 + pid_bh * 3 + c, tl.zeros([4], tl.int32), mask=c < 3)
        if pid_bh == 0:
            tl.store(counters, 0)
    compressed_decode_kernel(q, stride_qb, k_cmp, v_cmp, cache_seqlens, scores, part_m, part_l, part_o, TC, qk_scale,
                             HQ, H, DK, DV, BDK, BDV, GP, BLOCK_LEN, BLOCK_STRIDE, BC, SPLIT_LEN, NSPLIT, PRECISION)


@triton.jit
def _merge_splits(part_m, part_l, part_o, hq, g_ok, dv, FIRST: tl.constexpr, COUNT: tl.constexpr,
                  NSPLIT: tl.constexpr, DV: tl.constexpr, GP: tl.constexpr, BDV: tl.constexpr, SB: tl.constexpr):
    """Splits [FIRST, FIRST + COUNT) of the rows hq [GP] (where g_ok) of part_m, part_l [*, NSPLIT] (log2 units) and
    part_o [*, NSPLIT, DV] (unnormalised), SB splits per load, read through L2 -> the normalised output [GP, BDV]
    float32 (0 where no split saw a key)."""
    m = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BDV], tl.float32)
    for s0 in range(0, COUNT, SB):
        s = s0 + tl.arange(0, SB)
        ok = g_ok[:, None] & (s < COUNT)[None, :]
        row = hq[:, None] * NSPLIT + FIRST + s[None, :]  # [GP, SB]
        m_s = tl.load(part_m + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_l + row, mask=ok, other=0., cache_modifier=".cg")
        o_s = tl.load(part_o + row[:, :, None] * DV + dv[None, None, :],
                      mask=ok[:, :, None] & (dv[None, None, :] < DV), other=0., cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(m_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(m_s - m_safe[:, None])  # [GP, SB]
        l_i = l_i * alpha + tl.sum(w * l_s, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_s, 1)
        m = m_new
    return acc / tl.where(l_i > 0, l_i, 1.)[:, None]


@triton.jit
def _rank_part(cache_seqlens, scores, cmp_m, cmp_l, b, hq, g_ok, part, TC, GP: tl.constexpr, BLOCK_LEN: tl.constexpr,
               BLOCK_STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr, NP: tl.constexpr, CMP_SPLITS: tl.constexpr,
               CHUNKS_PER_PART: tl.constexpr, IDX_BITS: tl.constexpr, LEADING: tl.constexpr, LOCAL: tl.constexpr):
    """Ranking part `part` of sequence b's KV head (query rows hq [GP]): the log-sum-exp from launch 1's split
    statistics cmp_m, cmp_l [B, HQ, CMP_SPLITS], then chunks [part * CHUNKS_PER_PART, +CHUNKS_PER_PART) of NP selection
    blocks ranked from scores [B, HQ, TC] -> its NP largest ranking keys [1, NP] int32, descending, -1 padded (the
    arithmetic of decode.select_decode_kernel, so the keys are the five-launch path's)."""
    BC: tl.constexpr = NP * (SELECT_LEN // BLOCK_STRIDE)
    _, _, lse2 = merged_lse2(cmp_m, cmp_l, hq, g_ok, CMP_SPLITS)

    pos = tl.load(cache_seqlens + b) - 1
    return rank_chunks(scores, hq, g_ok, lse2, pos, part * CHUNKS_PER_PART, (part + 1) * CHUNKS_PER_PART, TC, BC, NP,
                       BLOCK_LEN, BLOCK_STRIDE, SELECT_LEN, IDX_BITS, LEADING, LOCAL)


@triton.jit
def top_keys(keys, scratch, NP: tl.constexpr):
    """The NP largest of keys [N] int32 (valid keys >= 0 and unique, -1 = none) -> [1, NP] descending, -1 padded.
    The NP-th largest key t is found bit by bit (the largest t with at least NP keys >= t; 0 when fewer than NP
    keys are valid); the keys >= t are stored by their running count into scratch (NP int32 of global memory the
    program may overwrite, e.g. where the keys came from: every thread has read its keys first), read back, sorted
    (merge_top)."""
    t = tl.sum(keys * 0, 0)  # int32 0
    for i in range(31):
        cand = t | (1 << (30 - i))
        t = tl.where(tl.sum((keys >= cand).to(tl.int32), 0) >= NP, cand, t)
    chosen = keys >= t  # -1 < t: never an empty slot
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.debug_barrier()
    tl.store(scratch + slot, keys, mask=chosen)
    tl.debug_barrier()
    r = tl.arange(0, NP)
    picked = tl.load(scratch + r, mask=r < tl.sum(chosen.to(tl.int32), 0), other=-1, cache_modifier=".cg")
    return merge_top(tl.full([1, NP], -1, tl.int32), picked[None, :], 1, NP)


@triton.jit
def fused_decode_kernel(q, stride_qb, k, v, k_win, v_win, cache_seqlens, scores, cmp_m, cmp_l, cmp_o, part_top,
                        block_indices, part_m, part_l, part_o, o_cmp, g_cmp, g_slc, g_win, stride_gb, stride_gh, out,
                        counters, BH, S, TC, qk_scale, HQ: tl.constexpr, H: tl.constexpr, DK: tl.constexpr,
                        DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, GP: tl.constexpr,
                        BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr,
                        NUM_SELECTED: tl.constexpr, NP: tl.constexpr, CMP_SPLITS: tl.constexpr, NPART: tl.constexpr,
                        NPART_P2: tl.constexpr, CHUNKS_PER_PART: tl.constexpr, IDX_BITS: tl.constexpr,
                        LEADING: tl.constexpr, LOCAL: tl.constexpr, BS: tl.constexpr, NSEL: tl.constexpr,
                        BLOCKS_PER_SPLIT: tl.constexpr, NWIN: tl.constexpr, WINDOW: tl.constexpr,
                        WIN_CHUNK: tl.constexpr, RING: tl.constexpr, SB: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (BH * (NPART + 1 + NWIN + NSEL)), BH = B * H; work items by ticket (module docstring).
    q [B, HQ, DK] (batch stride stride_qb); k/v [B, S, H, D]; k_win/v_win: k/v themselves, or (RING) the window's ring
    [B, WINDOW, H, D] (slots [0, min(length, WINDOW)) filled); cache_seqlens [B] int32; launch 1's scores [B, HQ, TC],
    cmp_m/cmp_l [B, HQ, CMP_SPLITS], cmp_o [B, HQ, CMP_SPLITS, DV]; gates [B, HQ] (strides stride_gb, stride_gh);
    counters int32 [1 + 3 * BH] zeroed by launch 1. Scratch: part_top [BH, NPART, NP] int32, part_m/part_l
    [B, HQ, NSEL + NWIN] and part_o [B, HQ, NSEL + NWIN, DV] float32 (selected splits first), o_cmp [B, HQ, DV]
    float32. -> block_indices [B, 1, H, NUM_SELECTED] int32 (most important first, -1 padded), out [B, HQ, DV]."""
    G: tl.constexpr = HQ // H
    ticket = tl.atomic_add(counters, 1)
    dv = tl.arange(0, BDV)
    if ticket < BH * NPART:  # ---- ranking part
        bh = ticket // NPART
        b, h = bh // H, bh % H
        _, g_ok, hq = _group_heads(b, h, HQ, H, GP)
        top = _rank_part(cache_seqlens, scores, cmp_m, cmp_l, b, hq, g_ok, ticket % NPART, TC, GP, BLOCK_LEN,
                         BLOCK_STRIDE, SELECT_LEN, NP, CMP_SPLITS, CHUNKS_PER_PART, IDX_BITS, LEADING, LOCAL)
        jj = tl.arange(0, NP)
        if NPART > 1:
            tl.store(part_top + ticket * NP + jj[None, :], top)
            tl.debug_barrier()  # every thread's keys are out before the counter says so
        ranked = tl.atomic_add(counters + 1 + 3 * bh + RANKED, 1, sem="acq_rel")
        if ranked == NPART - 1:  # the last part of (b, h): the top n of all parts' lists
            if NPART > 1:
                i = tl.arange(0, NPART_P2 * NP)
                keys = tl.load(part_top + bh * NPART * NP + i, mask=i < NPART * NP, other=-1, cache_modifier=".cg")
                top = top_keys(keys, part_top + bh * NPART * NP, NP)
            tl.store(block_indices + bh * NUM_SELECTED + jj[None, :], block_of_key(top, IDX_BITS),
                     mask=jj[None, :] < NUM_SELECTED)
            tl.debug_barrier()
            tl.atomic_xchg(counters + 1 + 3 * bh + READY, 1, sem="release")
    else:  # ---- an attention item: the compressed merge, a window chunk or a selected split
        item = ticket - BH * NPART
        is_cmp = item < BH
        if NWIN > 0:
            is_win = (item >= BH) & (item < BH * (1 + NWIN))
            win_bh = (item - BH) // NWIN
        else:  # no window branch: a compile-time False drops its code
            is_win = False
            win_bh = item
        sel_item = item - BH * (1 + NWIN)
        bh = tl.where(is_cmp, item, tl.where(is_win, win_bh, sel_item // NSEL))
        b, h = bh // H, bh % H
        g, g_ok, hq = _group_heads(b, h, HQ, H, GP)
        if is_cmp:
            o = _merge_splits(cmp_m, cmp_l, cmp_o, hq, g_ok, dv, 0, CMP_SPLITS, CMP_SPLITS, DV, GP, BDV, SB)
            tl.store(o_cmp + hq[:, None] * DV + dv[None, :], o, mask=g_ok[:, None] & (dv[None, :] < DV))
        else:
            dk = tl.arange(0, BDK)
            q_blk = tl.load(q + b * stride_qb + (h * G + g)[:, None] * DK + dk[None, :],
                            mask=g_ok[:, None] & (dk[None, :] < DK), other=0.)
            offs = tl.arange(0, BS)
            length = tl.load(cache_seqlens + b)
            m_i = tl.full([GP], float("-inf"), tl.float32)
            l_i = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, BDV], tl.float32)
            if is_win:
                chunk = (item - BH) % NWIN
                split = NSEL + chunk
                if RING:
                    lo = chunk * WIN_CHUNK
                    hi = tl.minimum(lo + WIN_CHUNK, tl.minimum(length, WINDOW))
                    base = b * WINDOW
                else:
                    lo = tl.maximum(length - WINDOW, 0) + chunk * WIN_CHUNK
                    hi = tl.minimum(lo + WIN_CHUNK, length)
                    base = b * S
                for i0 in range(lo, hi, BS):
                    key = i0 + offs
                    m_i, l_i, acc = attend_tile(q_blk, k_win + h * DK, v_win + h * DV, base + key, key < hi,
                                                (key < hi)[None, :], m_i, l_i, acc, qk_scale, H, DK, DV, BDK, BDV,
                                                True, PRECISION)
            else:
                split = sel_item % NSEL
                ready = tl.atomic_add(counters + 1 + 3 * bh + READY, 0, sem="acquire")
                while ready == 0:  # the ranking parts of (b, h) hold lower tickets: they run, and finish
                    ready = tl.atomic_add(counters + 1 + 3 * bh + READY, 0, sem="acquire")
                first = split * BLOCKS_PER_SPLIT
                for n in range(first, tl.minimum(first + BLOCKS_PER_SPLIT, NUM_SELECTED)):
                    j = tl.load(block_indices + bh * NUM_SELECTED + n, cache_modifier=".cg")
                    for t0 in range(0, SELECT_LEN, BS):  # the block in tiles of BS keys
                        s_pos = tl.maximum(j, 0) * SELECT_LEN + t0 + offs
                        key_ok = (s_pos < length) & (t0 + offs < tl.where(j >= 0, SELECT_LEN, 0))  # slot -1: none
                        m_i, l_i, acc = attend_tile(q_blk, k + h * DK, v + h * DV, b * S + s_pos, key_ok,
                                                    key_ok[None, :], m_i, l_i, acc, qk_scale, H, DK, DV, BDK, BDV,
                                                    True, PRECISION)
            NS: tl.constexpr = NSEL + NWIN
            tl.store(part_m + hq * NS + split, m_i, mask=g_ok)
            tl.store(part_l + hq * NS + split, l_i, mask=g_ok)
            tl.store(part_o + (hq[:, None] * NS + split) * DV + dv[None, :], acc,
                     mask=g_ok[:, None] & (dv[None, :] < DV))
        tl.debug_barrier()  # every thread's partial output is out before the counter says so
        attended = tl.atomic_add(counters + 1 + 3 * bh + ATTENDED, 1, sem="acq_rel")
        if attended == NSEL + NWIN:  # the last attention item of (b, h): the gated sum
            gate_at = b * stride_gb + (h * G + g) * stride_gh
            mask = g_ok[:, None] & (dv[None, :] < DV)
            o = tl.load(g_cmp + gate_at, mask=g_ok, other=0.).to(tl.float32)[:, None] * \
                tl.load(o_cmp + hq[:, None] * DV + dv[None, :], mask=mask, other=0., cache_modifier=".cg")
            o += tl.load(g_slc + gate_at, mask=g_ok, other=0.).to(tl.float32)[:, None] * \
                _merge_splits(part_m, part_l, part_o, hq, g_ok, dv, 0, NSEL, NSEL + NWIN, DV, GP, BDV, SB)
            if NWIN > 0:
                o += tl.load(g_win + gate_at, mask=g_ok, other=0.).to(tl.float32)[:, None] * \
                    _merge_splits(part_m, part_l, part_o, hq, g_ok, dv, NSEL, NWIN, NSEL + NWIN, DV, GP, BDV, SB)
            tl.store(out + hq[:, None] * DV + dv[None, :], o.to(out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launcher
# launch 2: programs to aim for per step (about 2 per SM of an H100), ranking parts per KV head at most, chunks of
# NP selection blocks per part at most (more parts when a part would rank more), keys per tile of the selected and
# window items (32: no register spills on sm_90 with triton 3.6 or 3.9; 64 spilled with 3.6), warps. Not yet timed.
TILES = {"programs": 264, "max_parts": 64, "chunks_per_part": 4, "keys": 32, "warps": 4}


def launch_shape(B: int, H: int, S: int, layout: NSALayout) -> dict:
    """Launch 2's work items for B sequences of H KV heads over caches of S_max = S tokens (all static: the grid
    depends on shapes only, never on cache_seqlens' values): ranking parts and chunks per part, selected splits and
    blocks per split, window chunks and keys per chunk, the key tile BS (a selection block takes l' / BS tiles)."""
    np_ = chunk_blocks(layout)
    num_chunks = triton.cdiv(triton.cdiv(S, layout.select_len), np_)  # chunks of the longest cache
    parts = min(num_chunks, TILES["max_parts"],
                max(triton.cdiv(num_chunks, TILES["chunks_per_part"]), triton.cdiv(TILES["programs"], B * H)))
    chunks_per_part = triton.cdiv(num_chunks, parts)
    parts = triton.cdiv(num_chunks, chunks_per_part)
    n, window = layout.num_selected, layout.window
    bs = max(16, min(TILES["keys"], triton.next_power_of_2(layout.select_len)))
    sel = _splits(B * H, n)
    blocks_per_split = triton.cdiv(n, sel)
    sel = triton.cdiv(n, blocks_per_split)
    win = _splits(B * H, triton.cdiv(window, 64)) if window else 0  # the five-launch path's count: 64-key units
    win_chunk = triton.cdiv(triton.cdiv(window, win), bs) * bs if window else bs
    return dict(np=np_, parts=parts, chunks_per_part=chunks_per_part, sel=sel, blocks_per_split=blocks_per_split,
                win=win, win_chunk=win_chunk, bs=bs)


def nsa_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win=None, *,
               layout: NSALayout = PAPER_LAYOUT, scale=None, k_window=None, v_window=None, leading_blocks=1,
               local_tokens=None, return_block_indices=False):
    """Triton NSA decode step in two launches; spec and shapes: reference.nsa_decode (return_block_indices: also the
    selected blocks [B, 1, H, n] int32). cache_seqlens' values are not checked here (that would cost a
    device-to-host copy per step): each must lie in [1, S_max]. q may be a view whose batch stride is not HQ * Dk,
    gates views with any strides. No host synchronisation and a grid fixed by the shapes: CUDA-graph capturable."""
    (q, stride_qb, k_cache, v_cache, k_cmp_cache, v_cmp_cache), dims, scale = decode_operands(
        q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win},
        layout, scale, k_window, v_window, leading_blocks, local_tokens)
    B, HQ, DK, S, TC, H, DV, bdk, bdv, gp = dims
    f32 = dict(dtype=torch.float32, device=q.device)

    # launch 1: the five-launch path's compressed kernel, same splits, plus the counters
    bc, warps, stages, nsplit, split_len = compressed_splits(TC, B * H)
    scores = torch.empty(B, HQ, max(TC, 1), **f32)
    cmp_m, cmp_l = torch.empty(B, HQ, nsplit, **f32), torch.empty(B, HQ, nsplit, **f32)
    cmp_o = torch.empty(B, HQ, nsplit, DV, **f32)
    counters = torch.empty(1 + 3 * B * H, dtype=torch.int32, device=q.device)
    compressed_kernel[(B * H, nsplit)](
        q, stride_qb, k_cmp_cache, v_cmp_cache, cache_seqlens, scores, cmp_m, cmp_l, cmp_o, counters, TC,
        scale * LOG2E, HQ, H, DK, DV, bdk, bdv, gp, layout.block_len, layout.block_stride, bc, split_len, nsplit,
        PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)

    # launch 2: ranking, top n, compressed merge, window, selected blocks, gated sum
    shape = launch_shape(B, H, S, layout)
    np_, parts, sel, win = shape["np"], shape["parts"], shape["sel"], shape["win"]
    part_top = torch.empty(B * H, parts, np_, dtype=torch.int32, device=q.device)
    block_indices = torch.empty(B, 1, H, layout.num_selected, dtype=torch.int32, device=q.device)
    part_m, part_l = torch.empty(B, HQ, sel + win, **f32), torch.empty(B, HQ, sel + win, **f32)
    part_o = torch.empty(B, HQ, sel + win, DV, **f32)
    o_cmp = torch.empty(B, HQ, DV, **f32)
    out = torch.empty(B, HQ, DV, dtype=q.dtype, device=q.device)
    ring = k_window is not None
    k_win, v_win = (k_window.contiguous(), v_window.contiguous()) if ring else (k_cache, v_cache)
    gates = [g_cmp, g_slc] + ([g_win] if layout.window else [])
    if len({g.stride() for g in gates}) > 1:  # the kernel takes one pair of strides for all gates
        gates = [g.contiguous() for g in gates]
    sb = max(1, min(8, 2048 // (gp * bdv)))  # splits merged per load: a [GP, SB, BDV] float32 tile (more spilled)
    fused_decode_kernel[(B * H * (parts + 1 + win + sel),)](
        q, stride_qb, k_cache, v_cache, k_win, v_win, cache_seqlens, scores, cmp_m, cmp_l, cmp_o, part_top,
        block_indices, part_m, part_l, part_o, o_cmp, *gates[:2], gates[-1], gates[0].stride(0), gates[0].stride(1),
        out, counters, B * H, S, max(TC, 1), scale * LOG2E, HQ, H, DK, DV, bdk, bdv, gp, layout.block_len,
        layout.block_stride, layout.select_len, layout.num_selected, np_, nsplit, parts, triton.next_power_of_2(parts),
        shape["chunks_per_part"], index_bits(triton.cdiv(S, layout.select_len)), leading_blocks,
        layout.select_len + 1 if local_tokens is None else local_tokens,
        shape["bs"], sel, shape["blocks_per_split"], win, layout.window, shape["win_chunk"], ring, sb,
        PRECISION=dot_precision(q.dtype), num_warps=TILES["warps"], num_stages=1)
    return (out, block_indices) if return_block_indices else out
