"""Block selection (eq. 8-10 and top-n) in Triton, without the T x Tc probability matrix.

One program takes BT queries of one KV head with all G query heads of its group, walks the selection blocks
in chunks of NP (with the NP * l'/d compressed blocks that start inside them), recomputes the compressed
probabilities exp(q k_cmp^T * scale - lse), sums them over the group's heads (eq. 10), maps them onto
selection blocks with reference.compressed_to_selection_weights (eq. 9; a compressed block that runs past the
chunk carries its share into the next chunk) and keeps a running top-NP per query, merging a chunk only when
one of its candidates beats a query's current n-th. Ranking keys are int32: the float32 bits of the
importance with the low IDX_BITS bits replaced by (2^IDX_BITS - 1 - j) (utils.index_bits), so ties go to the
lower block index exactly as in the reference; forced blocks (0 and the two local blocks) get importance
+inf, blocks after the query's own -1.

Kernel -> launcher -> public `select_blocks` (no autograd: the indices carry no gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.nsa.common import Packing, kernel_packing, num_visible_blocks, sequence_tile
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout
from nsa_eval.kernels.nsa.utils import check_compressed_args, check_lse, check_varlen, default_scale, index_bits
from nsa_eval.kernels.utils import LOG2E, dot_precision


@triton.jit
def overlap_weights(i, j, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr):
    """Eq. 9 weight of compressed block i for selection block j: shared tokens / stride (broadcasting)."""
    lo = tl.maximum(i * BLOCK_STRIDE, j * SELECT_LEN)
    hi = tl.minimum(i * BLOCK_STRIDE + BLOCK_LEN, j * SELECT_LEN + SELECT_LEN)
    return tl.maximum(hi - lo, 0).to(tl.float32) / BLOCK_STRIDE


@triton.jit
def ranking_keys(importance, j, current, first_local, LEADING: tl.constexpr, IDX_BITS: tl.constexpr):
    """int32 keys [R, NP] for selection blocks j [NP] of queries whose own block is current [R]; -1 = never. Forced
    (always first): blocks j < LEADING and first_local [R] <= j <= current (NSA: LEADING 1, first_local current - 1)."""
    MASK: tl.constexpr = (1 << IDX_BITS) - 1
    forced = (j[None, :] < LEADING) | ((j[None, :] >= first_local[:, None]) & (j[None, :] <= current[:, None]))
    importance = tl.where(forced, float("inf"), importance)
    key = (importance.to(tl.int32, bitcast=True) & ~MASK) | (MASK - j[None, :])
    return tl.where(j[None, :] <= current[:, None], key, -1)


@triton.jit
def merge_top(top, cand, R: tl.constexpr, NP: tl.constexpr):
    """The NP largest keys of top [R, NP] and cand [R, NP], in descending order (keys unique except -1);
    top unchanged when no query has a candidate above its smallest key."""
    if tl.max((tl.max(cand, 1) > tl.min(top, 1)).to(tl.int32), 0) > 0:
        both = tl.reshape(tl.join(top, cand), (R, 2 * NP))
        rank = tl.sum((both[:, None, :] > both[:, :, None]).to(tl.int32), 2)  # [R, 2NP]: keys larger than each
        r = tl.arange(0, NP)
        top = tl.max(tl.where(rank[:, :, None] == r[None, None, :], both[:, :, None], -1), 1)
    return top


@triton.jit
def block_of_key(top, IDX_BITS: tl.constexpr):
    """Selection-block index of each ranking key (-1 for empty slots), int32."""
    MASK: tl.constexpr = (1 << IDX_BITS) - 1
    return tl.where(top >= 0, MASK - (top & MASK), -1)


@triton.jit
def _select_chunk(q_blk, k_ptr, lse2, n_vis, c, top, carry, weights, spill, current, qk_scale, TC,
                  H: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
                  BC: tl.constexpr, NP: tl.constexpr, IDX_BITS: tl.constexpr, PRECISION: tl.constexpr):
    """Selection blocks [c*NP, c*NP + NP) for BT queries: importance (eq. 8-10) and the running top-NP."""
    a = tl.arange(0, BC)
    jj = tl.arange(0, NP)
    dk = tl.arange(0, BDK)
    i = c * BC + a
    kb = tl.load(k_ptr + i[:, None] * (H * DK) + dk[None, :], mask=(i[:, None] < TC) & (dk[None, :] < DK), other=0.)
    s = tl.dot(q_blk, tl.trans(kb), input_precision=PRECISION) * qk_scale
    p = tl.where(i[None, :] < n_vis[:, None], tl.math.exp2(s - lse2[:, None]), 0.)
    p_group = tl.sum(tl.reshape(p, (BT, GP, BC)), 1)  # eq. 10: [BT, BC]
    importance = tl.sum(p_group[:, :, None] * weights[None, :, :], 1)  # eq. 9: [BT, NP]
    importance += tl.where(jj[None, :] == 0, carry[:, None], 0.)
    carry = tl.sum(p_group * spill[None, :], 1)
    top = merge_top(top, ranking_keys(importance, c * NP + jj, current, current - 1, 1, IDX_BITS), BT, NP)
    return top, carry


@triton.jit
def select_kernel(q, k_cmp, lse, block_indices, cu, cu_cmp, table, T, TC, OFFSET, qk_scale, HQ: tl.constexpr,
                  H: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, GP: tl.constexpr, BLOCK_LEN: tl.constexpr,
                  BLOCK_STRIDE: tl.constexpr, SELECT_LEN: tl.constexpr, NUM_SELECTED: tl.constexpr,
                  NP: tl.constexpr, BT: tl.constexpr, IDX_BITS: tl.constexpr, VARLEN: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Grid (cdiv(T, BT) or the table's tiles, B * H). q [B, T, HQ, DK], k_cmp [B, TC, H, DK], lse [B, T, HQ]
    float32 -> block_indices [B, T, H, NUM_SELECTED] int32, most important first, -1 padded. VARLEN: B == 1,
    sequences cu / cu_cmp (common.sequence_tile), positions and block indices from each sequence's 0.
    Query row t stands at position t + OFFSET (OFFSET = S - T: a chunk after cached tokens; 0 when packed)."""
    G: tl.constexpr = HQ // H
    R: tl.constexpr = BT * GP
    BC: tl.constexpr = NP * (SELECT_LEN // BLOCK_STRIDE)
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    tile, bos, T, bos_c, TC = sequence_tile(pid_t, b, table, cu, cu_cmp, T, TC, VARLEN)
    rows = tl.arange(0, R)
    tok = tile * BT + rows // GP
    g = rows % GP
    row_ok = (tok < T) & (g < G)
    dk = tl.arange(0, BDK)
    qrow = (bos + tok) * HQ + h * G + g
    q_blk = tl.load(q + qrow[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.)
    lse2 = tl.load(lse + qrow, mask=row_ok, other=0.) * 1.4426950408889634
    n_vis = tl.where(row_ok, num_visible_blocks(tok + OFFSET, BLOCK_LEN, BLOCK_STRIDE), 0)
    toks = tile * BT + tl.arange(0, BT)
    current = (toks + OFFSET) // SELECT_LEN
    a = tl.arange(0, BC)
    jj = tl.arange(0, NP)
    weights = overlap_weights(a[:, None], jj[None, :], BLOCK_LEN, BLOCK_STRIDE, SELECT_LEN)  # same in every chunk
    spill = overlap_weights(a, NP, BLOCK_LEN, BLOCK_STRIDE, SELECT_LEN)  # share of the next chunk's first block
    top = tl.full([BT, NP], -1, tl.int32)
    carry = tl.zeros([BT], tl.float32)
    last_block = (tl.minimum(tile * BT + BT, T) - 1 + OFFSET) // SELECT_LEN
    k_ptr = k_cmp + (bos_c * H + h) * DK
    for c in range(0, last_block // NP + 1):  # (an unmasked loop for the chunks every query sees ran slower)
        top, carry = _select_chunk(q_blk, k_ptr, lse2, n_vis, c, top, carry, weights, spill, current, qk_scale, TC,
                                   H, DK, BDK, GP, BT, BC, NP, IDX_BITS, PRECISION)
    r = tl.arange(0, NP)
    out = block_indices + ((bos + toks[:, None]) * H + h) * NUM_SELECTED + r[None, :]
    tl.store(out, block_of_key(top, IDX_BITS), mask=(toks[:, None] < T) & (r[None, :] < NUM_SELECTED))


# ------------------------------------------------------------------------------------------- launcher
TILES = {"select": (64, 4, 2)}  # (query rows per program = tokens x padded group, warps, stages)


def chunk_blocks(layout: NSALayout) -> int:
    """NP: selection blocks per chunk, a power of 2 >= n whose compressed blocks fill a >= 16-wide dot."""
    return max(triton.next_power_of_2(layout.num_selected),
               triton.next_power_of_2(-(-16 // (layout.select_len // layout.block_stride))))


def select_fwd(q, k_cmp, lse, layout: NSALayout, scale, packing: Packing | None = None, offset: int = 0):
    """q [B, T, HQ, Dk], k_cmp [B, Tc, H, Dk], lse [B, T, HQ] (contiguous) -> block_indices [B, T, H, n] int32
    (n = layout.num_selected). packing: packed sequences (B == 1) or None; offset: position of query row 0 (S - T)."""
    B, T, HQ, DK = q.shape
    select_len, num_selected = layout.select_len, layout.num_selected
    TC, H = k_cmp.shape[1], k_cmp.shape[2]
    gp = triton.next_power_of_2(HQ // H)
    rows, warps, stages = TILES["select"]
    bt = max(1, rows // gp)
    block_indices = torch.empty(B, T, H, num_selected, dtype=torch.int32, device=q.device)
    cu, cu_cmp, table, programs = kernel_packing(packing, bt, False, lse, triton.cdiv(T, bt))
    longest = T + offset if packing is None else max(packing.lengths)
    select_kernel[(programs, B * H)](
        q, k_cmp, lse, block_indices, cu, cu_cmp, table, T, TC, offset, scale * LOG2E, HQ, H, DK, triton.next_power_of_2(DK),
        gp, layout.block_len, layout.block_stride, select_len, num_selected, chunk_blocks(layout),
        bt, index_bits(triton.cdiv(longest, select_len)), packing is not None, PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    return block_indices


def select_blocks(q, k_cmp, lse, *, layout: NSALayout = PAPER_LAYOUT, scale=None, seq_len=None, cu_seqlens=None):
    """Triton block selection; spec and shapes: reference.select_blocks."""
    op = "select_blocks"
    seq_len = check_compressed_args(op, q, k_cmp, k_cmp, layout, scale, seq_len, cu_seqlens is not None, triton=True)
    check_lse(op, lse, q)
    packing = None
    if cu_seqlens is not None:
        packing = Packing.of(*check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride, {"k_cmp": k_cmp}),
                             q.device)
    scale = default_scale(q, scale)
    return select_fwd(q.detach().contiguous(), k_cmp.detach().contiguous(), lse.contiguous(), layout, scale, packing,
                      seq_len - q.shape[1])
