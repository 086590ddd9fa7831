"""What the NSA Triton kernels share.

The Triton building blocks of the compressed, selection, selected and decode kernels (compression.py, selection.py,
selected.py, decode.py): `attend_tile` (one online-softmax step over a tile of keys), `num_visible_blocks`, the
packed sequences as the kernels read them (`Packing`, `kernel_packing`, `sequence_tile`) and `row_dot` (the
backward's delta = rowsum(o * do)). What every op shares (checks, LOG2E, block tables) is in kernels/utils.py.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa_eval.kernels.utils import block_table


@triton.jit
def num_visible_blocks(t, BLOCK_LEN: tl.constexpr, BLOCK_STRIDE: tl.constexpr):
    """Compressed blocks a query at position t sees (0 before the first block is complete)."""
    return tl.maximum(t + 1 - BLOCK_LEN + BLOCK_STRIDE, 0) // BLOCK_STRIDE


@dataclasses.dataclass
class Packing:
    """Packed sequences (cu_seqlens, B == 1) as the kernels read them; layout: reference's module docstring."""

    cu: torch.Tensor  # int32 [N+1] token offsets
    cu_cmp: torch.Tensor  # int32 [N+1] compressed-block offsets
    lengths: list[int]  # tokens per sequence
    cmp_lengths: list[int]  # compressed blocks per sequence

    @classmethod
    def of(cls, offsets: list[int], blocks: list[int], device) -> Packing:
        return cls(torch.tensor(offsets, dtype=torch.int32, device=device),
                   torch.tensor(blocks, dtype=torch.int32, device=device),
                   [b - a for a, b in zip(offsets, offsets[1:])], [b - a for a, b in zip(blocks, blocks[1:])])

    def tiles(self, rows: int, compressed: bool = False) -> torch.Tensor:
        """int32 [programs, 2]: (sequence, tile) for tiles of `rows` tokens (or compressed blocks) per sequence."""
        return block_table(self.cmp_lengths if compressed else self.lengths, rows, self.cu.device, False)

    def token_starts(self) -> torch.Tensor:
        """int32 [T]: the first token of each token's sequence."""
        return torch.repeat_interleave(self.cu[:-1], torch.tensor(self.lengths, device=self.cu.device))


def kernel_packing(packing: Packing | None, rows: int, compressed: bool, dummy: torch.Tensor, programs: int):
    """(cu, cu_cmp, tile table, number of programs along the tiles) for a launch; dummies when not packed."""
    if packing is None:
        return dummy, dummy, dummy, programs
    table = packing.tiles(rows, compressed)
    return packing.cu, packing.cu_cmp, table, table.shape[0]


@triton.jit
def sequence_tile(pid, b, table, cu, cu_cmp, T, TC, VARLEN: tl.constexpr):
    """(tile, first token row, tokens, first compressed row, compressed blocks) of program pid's sequence:
    batch row b unpacked, the table's (sequence, tile) entry when packed (B == 1)."""
    if VARLEN:
        n = tl.load(table + 2 * pid)
        tile = tl.load(table + 2 * pid + 1)
        bos = tl.load(cu + n)
        n_tok = tl.load(cu + n + 1) - bos
        bos_c = tl.load(cu_cmp + n)
        n_cmp = tl.load(cu_cmp + n + 1) - bos_c
    else:
        tile = pid
        bos = b * T
        n_tok = T + 0
        bos_c = b * TC
        n_cmp = TC + 0
    return tile, bos, n_tok, bos_c, n_cmp


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
def attend_tile(q, k_ptr, v_ptr, rows, load_ok, visible, m_i, l_i, acc, qk_scale, H: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, MASKED: tl.constexpr,
                PRECISION: tl.constexpr):
    """Online-softmax update (log2 domain) of query rows q [R, BDK] with one tile of keys of one KV head: token rows
    [BS] of k/v (k_ptr, v_ptr point at that head of token 0; tokens H * D apart), loaded where load_ok [BS].
    MASKED: scores where visible ([R, BS], or [1, BS] for every row) is false are -inf. PRECISION: the dots'
    input_precision (utils.dot_precision).
    -> m_i, l_i [R] (running max and sum), acc [R, BDV] (unnormalised output). Used by the compressed, selected and
    decode kernels."""
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kb = tl.load(k_ptr + rows[:, None] * (H * DK) + dk[None, :], mask=load_ok[:, None] & (dk[None, :] < DK), other=0.)
    vb = tl.load(v_ptr + rows[:, None] * (H * DV) + dv[None, :], mask=load_ok[:, None] & (dv[None, :] < DV), other=0.)
    s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0., m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_attention(o, lse, row, row_ok, m_i, l_i, acc, dv, DV: tl.constexpr):
    """A forward kernel's end for rows `row` [R] of o [*, DV] and lse (where row_ok [R]): o = acc / l_i in o's dtype,
    lse = the natural-log log-sum-exp from the log2-domain m_i, l_i; 0 and -inf for a row that saw no key."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.)[:, None]
    tl.store(o + row[:, None] * DV + dv[None, :], out.to(o.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    lse_row = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.))) / 1.4426950408889634, float("-inf"))
    tl.store(lse + row, lse_row, mask=row_ok)


@triton.jit
def backward_rows(q, do, lse, delta, row, row_ok, dk, dv, DK: tl.constexpr, DV: tl.constexpr):
    """A backward kernel's per-query inputs at rows `row` [R] (0 where not row_ok): q [R, BDK] and do [R, BDV] tiles
    (dk, dv: the column ranges), lse in log2 units and delta = rowsum(o * do)."""
    q_blk = tl.load(q + row[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.)
    do_blk = tl.load(do + row[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.)
    lse2 = tl.load(lse + row, mask=row_ok, other=0.) * 1.4426950408889634
    dlt = tl.load(delta + row, mask=row_ok, other=0.)
    return q_blk, do_blk, lse2, dlt

