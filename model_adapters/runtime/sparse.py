"""Training-free NSA-style sparse attention over a full-attention model's own keys (`--attention sparse`): the rule
that picks each query's blocks and the attention over them, for the native engine (runtime/attention.py) and for
transformers models (hf_attention.py).

Per KV head: keys mean-pooled over blocks of `block` tokens; a block's importance = the compressed-attention
probabilities over those block means, summed over the KV head's query heads (NSA eq. 8-10 with l = d = l'); the
leading `leading` tokens and the blocks covering the last `local` tokens are always kept, then the most important
blocks up to `budget` tokens; one softmax over the kept tokens. SparseSettings.selection says for whom blocks are
ranked:
- "query": for each query (sparse_select), attended by the NSA selected-attention kernel (Triton on CUDA, the
  PyTorch reference elsewhere).
- "tile": once for each tile of `block` consecutive query positions (tiles aligned to positions, so a prompt
  prefilled in slices of a multiple of `block` gets the same tiles), from the summed importance of its queries, with
  the leading blocks and the local blocks of the tile's first query forced (the same count as one query's), as NSA's
  kernels share a selection across a query tile (sparse_select_tiles). Every query then attends its tile's blocks up
  to its own position. On CUDA the tile's blocks go to the selected-attention kernel query by query; elsewhere
  tile_attention runs SDPA over each tile's gathered keys, which on the CPU is faster than full attention from
  about 4k tokens on (the per-query reference attends through a dense [T, S] mask).
Queries after cached tokens (decode steps, prompt slices) are the last T of the S keys.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

import nsa_eval.kernels.nsa
from nsa_eval.kernels.nsa.utils import compressed_offsets, index_bits
from nsa_eval.model_adapters.runtime.config import SparseSettings


def sparse_attention_over_blocks(q, k, v, k_mean, settings: SparseSettings, ops: Any = None,
                                 scale: float | None = None, observe: Callable | None = None,
                                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, T, HQ, D] at positions S-T..S-1, k [B, S, H, D], v [B, S, H, Dv], the keys' block means k_mean
    [B, S // block, H, D] (the runtime keeps them in its cache) -> [B, T, HQ, Dv]. ops: the runtime's kernel table
    (runtime/ops.py), or None for nsa_eval.kernels.nsa (dispatch by device). observe(q, k, indices): called with
    each query's blocks (nsa-eval inspect), per sequence. cu_seqlens: None, or int32 [N+1] whole sequences packed
    along T (B == 1, T == S; k_mean packed per sequence, len_n // block blocks each): the blocks are ranked sequence
    by sequence (the rule's own code, above) and attended in one selected-attention call over the pack (on the CPU
    with tile selection: SDPA over each sequence's tiles, sequence by sequence)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    fns = ops or nsa_eval.kernels.nsa
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        blocks = compressed_offsets(offsets, settings.block, settings.block)
        spans = [(a, b, blocks[n], blocks[n + 1]) for n, (a, b) in enumerate(zip(offsets, offsets[1:])) if b > a]
        if settings.selection == "tile" and q.device.type != "cuda":
            return torch.cat([sparse_attention_over_blocks(q[:, a:b], k[:, a:b], v[:, a:b], k_mean[:, ca:cb], settings,
                                                           ops, scale, observe) for a, b, ca, cb in spans], 1)
        indices = torch.cat([_query_blocks(q[:, a:b], k_mean[:, ca:cb], b - a, settings, fns, scale)
                             for a, b, ca, cb in spans], 1)
        if observe is not None:
            for a, b, _, _ in spans:
                observe(q[:, a:b], k[:, a:b], indices[:, a:b])
        return fns.selected_attention(q, k, v, indices, layout=settings.layout, scale=scale, cu_seqlens=cu_seqlens)
    S, T = k.shape[1], q.shape[1]
    tiles = sparse_select_tiles(q, k_mean, None, S, settings, scale) if settings.selection == "tile" and T > 1 else None
    if tiles is None:
        indices = sparse_select(q, k_mean, _lse(q, k_mean, S, settings, fns, scale), S, settings, scale)
    elif observe is not None or q.device.type == "cuda":
        indices = _per_query(tiles, S, T, settings.block)
    if observe is not None:
        observe(q, k, indices)
    if tiles is not None and q.device.type != "cuda":
        return tile_attention(q, k, v, tiles, settings.block, scale)
    return fns.selected_attention(q, k, v, indices, layout=settings.layout, scale=scale)


def _query_blocks(q, k_mean, seq_len: int, settings: SparseSettings, fns: Any, scale: float) -> torch.Tensor:
    """Each query's blocks [B, T, H, n] for queries S-T..S-1, as sparse_attention_over_blocks picks them: its tile's
    (tile selection, T > 1) or its own."""
    T = q.shape[1]
    if settings.selection == "tile" and T > 1:
        return _per_query(sparse_select_tiles(q, k_mean, None, seq_len, settings, scale), seq_len, T, settings.block)
    return sparse_select(q, k_mean, _lse(q, k_mean, seq_len, settings, fns, scale), seq_len, settings, scale)


def _lse(q, k_mean, seq_len: int, settings: SparseSettings, fns: Any, scale: float) -> torch.Tensor:
    _, lse = fns.compressed_attention(q, k_mean, k_mean, layout=settings.layout, scale=scale, seq_len=seq_len)
    return lse


def _per_query(tiles: torch.Tensor, seq_len: int, num_queries: int, block: int) -> torch.Tensor:
    """tiles [B, NT, H, n] -> [B, T, H, n]: each of the queries S-T..S-1 given its tile's blocks."""
    positions = torch.arange(seq_len - num_queries, seq_len, device=tiles.device)
    return tiles[:, positions // block - (seq_len - num_queries) // block]


def block_importance(q, k_mean, lse, seq_len: int, block: int, scale: float, start: int, count: int) -> torch.Tensor:
    """Importance of every block for queries start..start+count-1 of q [B, T, HQ, D] (positions S-T+start, ...):
    their compressed probabilities over the complete blocks so far, summed over each KV head's query heads (eq. 8,
    10) -> float32 [B, count, H, NJ] (NJ = blocks of S, zero for blocks not yet complete). lse [B, T, HQ]: the
    compressed attention's log-sum-exp, or None to compute it here."""
    B, T, HQ, D = q.shape
    Tc, H = k_mean.shape[1], k_mean.shape[2]
    num_blocks = -(-seq_len // block)
    first = seq_len - T + start
    pos = torch.arange(first, first + count, device=q.device)[None, :, None, None]  # [1, count, 1, 1]
    scores = torch.einsum("bthgd,bchd->bthgc", q[:, start:start + count].float().view(B, count, H, HQ // H, D),
                          k_mean.float()) * scale
    visible = torch.arange(Tc, device=q.device) < (pos[..., None] + 1) // block  # complete blocks up to pos
    if lse is None:  # the log-sum-exp over the visible blocks, here rather than from the compressed kernel
        lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1, keepdim=True)
    else:
        lse = lse[:, start:start + count].reshape(B, count, H, HQ // H, 1)
    probs = torch.where(visible, torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)
    return F.pad(probs.sum(3), (0, num_blocks - Tc))


def top_blocks(importance: torch.Tensor, first: torch.Tensor, last: torch.Tensor, settings: SparseSettings,
               num_blocks: int) -> torch.Tensor:
    """The n blocks kept for rows whose queries span positions first..last ([..., 1] each, broadcast against
    importance [..., NJ]): the leading blocks and the blocks from (first - local + 1) // block to last // block
    forced, then the most important of the blocks up to last // block -> int32 [..., n], forced first, -1 padded.
    Ranks as the PyTorch reference's selection (kernels/nsa/reference.py `_select`: its ranking keys and tie rule)."""
    block, n = settings.block, settings.num_blocks
    mask = (1 << index_bits(num_blocks)) - 1
    j = torch.arange(num_blocks, device=importance.device)
    current = last // block
    first_local = (first - settings.local + 1).clamp_min(0) // block
    forced = (j < settings.leading_blocks) | ((j >= first_local) & (j <= current))
    importance = torch.where(forced, float("inf"), importance)
    importance = torch.where(j <= current, importance, -1.0)
    keys = (importance.clamp_min(0).view(torch.int32) & ~mask) | (mask - j.to(torch.int32))
    keys = torch.where(importance >= 0, keys, -1)
    top = keys.topk(min(n, num_blocks), dim=-1).values
    top = F.pad(top, (0, n - top.shape[-1]), value=-1)
    return torch.where(top >= 0, mask - (top & mask), -1).to(torch.int32)


def sparse_select(q, k_mean, lse, seq_len: int, settings: SparseSettings, scale: float,
                  max_scores: int = 1 << 27) -> torch.Tensor:
    """The blocks each query keeps: q [B, T, HQ, D] at positions S-T..S-1, k_mean [B, Tc, H, D] block means, lse
    [B, T, HQ] (float32, of the scores over the block means) -> int32 [B, T, H, n], most important first (the leading
    and local blocks first), -1 padded. The reference's selection with the sparse rule's forced blocks, specialised
    to l = d = l' = block (eq. 9 is then the identity) and taking the top n instead of sorting every block; in slices
    of queries that keep the float32 scores under `max_scores` elements. (The selection kernel's top-n merge costs
    n^2 per chunk: with n = 40 the dense score matrix of T x S/block is the faster way, and still small.)"""
    B, T, HQ, _ = q.shape
    num_blocks = -(-seq_len // settings.block)
    step = max(1, max_scores // (B * HQ * max(1, k_mean.shape[1])))
    parts = []
    for a in range(0, T, step):
        t = min(step, T - a)
        importance = block_importance(q, k_mean, lse, seq_len, settings.block, scale, a, t)
        pos = torch.arange(seq_len - T + a, seq_len - T + a + t, device=q.device)[None, :, None, None]
        parts.append(top_blocks(importance, pos, pos, settings, num_blocks))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def sparse_select_tiles(q, k_mean, lse, seq_len: int, settings: SparseSettings, scale: float,
                        max_scores: int = 1 << 27) -> torch.Tensor:
    """The blocks each tile of `block` query positions keeps: q, k_mean, lse as sparse_select (lse None: computed
    from the scores) -> int32
    [B, NT, H, n]: tile i holds positions [(t0 + i) * block, (t0 + i + 1) * block) of the queries S-T..S-1, t0 =
    (S - T) // block (the first and last tiles may hold fewer queries). A tile ranks blocks by its queries' summed
    importance; forced: the leading blocks and the local blocks of its first query (the same count as one query's)."""
    B, T, HQ, _ = q.shape
    H, block = k_mean.shape[2], settings.block
    num_blocks = -(-seq_len // block)
    first_pos = seq_len - T
    t0 = first_pos // block
    num_tiles = (seq_len - 1) // block - t0 + 1
    tile_of = (torch.arange(first_pos, seq_len, device=q.device) // block - t0)  # [T]
    summed = torch.zeros(B, num_tiles, H, num_blocks, dtype=torch.float32, device=q.device)
    step = max(block, max_scores // (B * HQ * max(1, k_mean.shape[1])) // block * block)
    for a in range(0, T, step):
        t = min(step, T - a)
        summed.index_add_(1, tile_of[a:a + t], block_importance(q, k_mean, lse, seq_len, block, scale, a, t))
    tiles = torch.arange(t0, t0 + num_tiles, device=q.device)
    first = (tiles * block).clamp_min(first_pos)[None, :, None, None]
    last = ((tiles + 1) * block - 1).clamp_max(seq_len - 1)[None, :, None, None]
    return top_blocks(summed, first, last, settings, num_blocks)


def tile_attention(q, k, v, tiles: torch.Tensor, block: int, scale: float, max_scores: int = 1 << 26) -> torch.Tensor:
    """q [B, T, HQ, D] at positions S-T..S-1, k [B, S, H, D], v [B, S, H, Dv], tiles [B, NT, H, n] (sparse_select_tiles)
    -> [B, T, HQ, Dv]: each query attends the tokens of its tile's blocks up to its own position, by SDPA over each
    tile's gathered blocks (tiles in groups that keep the scores under `max_scores` elements). A tile's blocks are
    put in ascending order, so its own block, the only one a query may see part of, comes last: the causal mask is
    one [G * block, n * block] pattern for every tile whose n slots all hold a block (all but the first n or so)."""
    B, T, HQ, D = q.shape
    S, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    G, n = HQ // H, tiles.shape[-1]
    num_tiles = tiles.shape[1]
    first_pos = S - T
    start = first_pos // block * block  # position of the first tile's first row
    q_rows = F.pad(q, (0, 0, 0, 0, first_pos - start, start + num_tiles * block - S))  # whole tiles
    q_rows = q_rows.view(B, num_tiles, block, H, G, D).permute(0, 1, 3, 4, 2, 5).reshape(B, num_tiles, H, G * block, D)
    tiles = tiles.sort(-1).values.long()  # unused slots (-1) first, the tile's own block last
    num_blocks = -(-S // block)
    blocks_of = lambda x: F.pad(x, (0, 0, 0, 0, 0, num_blocks * block - S)).view(  # noqa: E731
        B, num_blocks, block, H, x.shape[-1]).permute(0, 3, 1, 2, 4)  # [B, H, NJ, block, dim]
    k_blocks, v_blocks = blocks_of(k), blocks_of(v)
    offsets = torch.arange(block, device=q.device)
    causal = torch.zeros(G * block, n * block, dtype=q.dtype, device=q.device)
    causal[:, (n - 1) * block:].masked_fill_(offsets[None, :] > offsets.repeat(G)[:, None], float("-inf"))
    used = (tiles >= 0).repeat_interleave(block, -1)  # [B, NT, H, n * block]
    partial = int((~used.all(-1).all(-1).all(0)).sum())  # the first tiles, with fewer than n blocks so far
    rows_b = torch.arange(B, device=q.device)[:, None, None, None]
    heads = torch.arange(H, device=q.device)[None, None, :, None]
    out = q.new_empty(B, num_tiles, H, G * block, Dv)
    group = max(1, max_scores // (B * HQ * block * n * block))
    for lo, hi in ((0, partial), (partial, num_tiles)):
        for a in range(lo, hi, group):
            b = min(a + group, hi)
            chosen = tiles[:, a:b].clamp_min(0)
            flat = lambda x: x.reshape(B * (b - a), H, -1, x.shape[-1])  # noqa: E731 - SDPA's fast CPU path: 4D
            mask = causal if a >= partial else causal.masked_fill(~used[:, a:b, :, None, :], float("-inf")).view(
                B * (b - a), H, G * block, n * block)
            out[:, a:b] = F.scaled_dot_product_attention(
                flat(q_rows[:, a:b]), flat(k_blocks[rows_b, heads, chosen]), flat(v_blocks[rows_b, heads, chosen]),
                attn_mask=mask, scale=scale).view(B, b - a, H, G * block, Dv)
    out = out.view(B, num_tiles, H, G, block, Dv).permute(0, 1, 4, 2, 3, 5).reshape(B, num_tiles * block, HQ, Dv)
    return out[:, first_pos - start:first_pos - start + T]
