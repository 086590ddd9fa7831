"""The decode step's KV-cache write in Triton: every (cache, new token) pair of a layer in one launch.

dests[i][b, slots[i][b]] = sources[i][b] for up to 6 pairs: one program copies one row's H_i heads of D_i columns
of one pair, in tiles of [BLOCK_H heads, next_power_of_2(D_i) columns] (masked: D_i need not be a power of 2). The
pairs travel as tuples of tensors and strides (one specialisation per pair count, dtypes and head shapes). No
host synchronisation and no allocation, so a CUDA graph can capture it; the slot values are not checked here.
Kernel -> launcher -> public `cache_write_`; spec in reference.cache_write_.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nsa_eval.kernels.layers.reference import check_cache_write
from nsa_eval.kernels.utils import check_triton_device

MAX_TILE = 1024


@triton.jit
def copy_row(dest, source, slot, b, stride_db, stride_ds, stride_dh, stride_sb, stride_sh, H: tl.constexpr,
             D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """dest[b, slot[b]] = source[b] in tiles of [BLOCK_H heads, BLOCK_D >= D columns]: dest [B, S, H, D] and
    source [B, H, D] with unit last strides."""
    dest_row = dest + b * stride_db + tl.load(slot + b).to(tl.int64) * stride_ds
    source_row = source + b * stride_sb
    cols = tl.arange(0, BLOCK_D)
    for first in tl.range(0, H, BLOCK_H):
        heads = first + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < H) & (cols[None, :] < D)
        heads = heads.to(tl.int64)[:, None]
        values = tl.load(source_row + heads * stride_sh + cols[None, :], mask=mask)
        tl.store(dest_row + heads * stride_dh + cols[None, :], values, mask=mask)


@triton.jit
def cache_write_kernel(dests, sources, slots, dest_strides, source_strides, HEADS: tl.constexpr,
                       DIMS: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIMS: tl.constexpr,
                       PAIRS: tl.constexpr):
    """Grid (B, PAIRS). Program (b, i) copies row b of pair i. Tuples of PAIRS entries: tensors dests
    [B, S_i, H_i, D_i], sources [B, H_i, D_i], slots [B]; dest_strides (b, s, h), source_strides (b, h);
    HEADS (H_i), DIMS (D_i) and their tiles BLOCK_HEADS, BLOCK_DIMS."""
    b = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1)
    for i in tl.static_range(PAIRS):
        if pair == i:
            copy_row(dests[i], sources[i], slots[i], b, dest_strides[i][0], dest_strides[i][1], dest_strides[i][2],
                     source_strides[i][0], source_strides[i][1], HEADS[i], DIMS[i], BLOCK_HEADS[i], BLOCK_DIMS[i])


def cache_write_tile(H: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D) of one pair: BLOCK_D = next_power_of_2(D), heads up to about 1024 elements a tile."""
    block_d = triton.next_power_of_2(D)
    return min(triton.next_power_of_2(H), max(1, MAX_TILE // block_d)), block_d


def cache_write_fwd_(dests, sources, slots) -> None:
    """Launch on checked lists of pairs with B >= 1 rows; 4 warps (1024-element tiles: 8 per thread)."""
    heads = tuple(dest.shape[2] for dest in dests)
    dims = tuple(dest.shape[3] for dest in dests)
    block_heads, block_dims = zip(*(cache_write_tile(h, d) for h, d in zip(heads, dims)))
    cache_write_kernel[(dests[0].shape[0], len(dests))](
        tuple(dests), tuple(sources), tuple(slots), tuple(dest.stride()[:3] for dest in dests),
        tuple(source.stride()[:2] for source in sources), HEADS=heads, DIMS=dims, BLOCK_HEADS=block_heads,
        BLOCK_DIMS=block_dims, PAIRS=len(dests), num_warps=4,
    )


def cache_write_(dests, sources, slots):
    """dests[i][b, slots[i][b]] = sources[i][b] in place, in one Triton launch; returns None. Spec in
    reference.cache_write_ (the slot values are not checked here: that would need a host sync).

    Args:
        dests: list or tuple of 1 to 6 caches [B, S_i, H_i, D_i] (float16, bfloat16 or float32), last dim
            contiguous, other strides arbitrary.
        sources: as many [B, H_i, D_i] of their dest's dtype, last dim contiguous, other strides arbitrary.
        slots: as many int64 or int32 tensors [B] on the caches' device, each in [0, S_i).
    """
    check_cache_write(dests, sources, slots)
    check_triton_device("cache_write_", dests[0], name="dests[0]")
    if dests[0].shape[0]:
        cache_write_fwd_(dests, sources, slots)
