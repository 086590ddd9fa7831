"""Native Sparse Attention (arXiv:2502.11089, section 3) in plain PyTorch: dense masks, float32 math.

The oracle for the Triton kernels and the CPU path; the Triton files (compression.py, selection.py,
selected.py, parallel.py, decode.py) have the same public signatures and follow these docstrings.

Layouts (B batch, T queries, S keys, HQ query heads, H KV heads, G = HQ // H query heads per KV head):
    q [B, T, HQ, Dk]; k [B, S, H, Dk]; v [B, S, H, Dv] (the raw keys/values, shared by selection and window);
    k_cmp [B, Tc, H, Dk], v_cmp [B, Tc, H, Dv]: compressed block i summarises tokens
        [i*block_stride, i*block_stride + block_len) (the model's phi makes them: an MLP, or `mean_pool`);
    gates g_cmp, g_slc, g_win [B, T, HQ]; block_indices [B, T, H, n] int32 (-1 = unused slot); lse float32.

Packed variable-length batches (cu_seqlens, as in full attention): B == 1, T == total tokens, cu_seqlens int32
[N+1] rising from 0 to T; sequence n is rows cu_seqlens[n]:cu_seqlens[n+1] and its masks start at its own
position 0. The compressed K/V are packed per sequence in the same order: sequence n owns the next
num_compressed_blocks(len_n) = floor((len_n - l)/d) + 1 blocks (0 when len_n < l), its block 0 first, no block
crossing into the next sequence; k_cmp/v_cmp then hold exactly that sum of blocks (utils.compressed_offsets
gives the block offsets, `mean_pool(..., cu_seqlens=)` makes them). Block indices are per sequence (block j =
that sequence's tokens [j*l', (j+1)*l')). Every sequence gives the same result as a call on it alone.

Hyperparameters: one `layout: NSALayout` argument (layout.py; default PAPER_LAYOUT, the paper's): block_len l=32,
block_stride d=16, select_len l'=64, num_selected n=16, window w=512 (tokens, n in blocks). flash-linear-attention's
layout (FLA_LAYOUT) is l = d = l' (e.g. 64) with mean pooling and no window (window=0).

Queries offset into the keys (a prompt chunk over a cache, T < S): the T queries are the LAST T of the S tokens,
query row i at position t = i + S - T (bottom-right alignment, as full attention and flash-attn); S comes from k
(or `seq_len` where only compressed blocks are passed) and must be >= T. Not with cu_seqlens (S == T there).

Masks, query at position t:
    compressed: block i visible iff t >= i*d + l - 1; a query with no complete block gets output 0, lse -inf;
    selected:   key s visible iff s // l' is one of the query's n selected blocks and s <= t;
    window:     key s visible iff t - w < s <= t.
"""

from __future__ import annotations

import torch

from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT, NSALayout, check_layout
from nsa_eval.kernels.nsa.utils import (
    by_sequence,
    check_block_indices,
    check_compressed_args,
    check_decode,
    check_lse,
    check_nsa,
    check_prefill_length,
    check_qkv,
    check_varlen,
    default_scale,
    index_bits,
    query_positions,
    visible_compressed_blocks,
)
from nsa_eval.kernels.utils import check_cache_lengths


def _scores(q, k, scale):
    """q [B, Tq, HQ, Dk], k [B, S, H, Dk] -> scaled float32 scores [B, Tq, H, G, S]."""
    B, Tq, HQ, Dk = q.shape
    H = k.shape[2]
    qg = q.float().reshape(B, Tq, H, HQ // H, Dk)
    return torch.einsum("bthgd,bshd->bthgs", qg, k.float()) * scale


def _masked_attention(q, k, v, visible, scale):
    """Softmax attention where visible [B, Tq, H or 1, S] (bool) says which keys each query row sees.

    Returns o [B, Tq, HQ, Dv] float32 (0 for a row that sees nothing) and lse [B, Tq, HQ] float32 (-inf there).
    """
    B, Tq, HQ, _ = q.shape
    s = _scores(q, k, scale).masked_fill(~visible[:, :, :, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bthgs,bshd->bthgd", p, v.float()).reshape(B, Tq, HQ, v.shape[-1])
    lse = (m + torch.log(denom)).reshape(B, Tq, HQ)
    return o, lse


# ---------------------------------------------------------------------------------------------- branches
def _compressed(q, k_cmp, v_cmp, positions, layout: NSALayout, scale):
    n_visible = visible_compressed_blocks(positions, layout.block_len, layout.block_stride)  # [B, Tq]
    i = torch.arange(k_cmp.shape[1], device=q.device)
    visible = (i < n_visible[..., None])[:, :, None, :]
    return _masked_attention(q, k_cmp, v_cmp, visible, scale)


def compressed_attention(q, k_cmp, v_cmp, *, layout: NSALayout = PAPER_LAYOUT, scale=None, seq_len=None,
                         cu_seqlens=None):
    """Attention of every query over the compressed blocks it may see (eq. 7 of the paper).

    Args:
        q: [B, T, HQ, Dk] queries at positions S-T..S-1 of a sequence of S = seq_len tokens (default T: 0..T-1).
        k_cmp, v_cmp: [B, Tc, H, Dk] / [B, Tc, H, Dv], Tc >= num_compressed_blocks(S) (extra blocks are never
            visible). Block i is visible to query t iff t >= i*block_stride + block_len - 1.
        layout: the NSA hyperparameters; this branch reads block_len l and block_stride d.
        scale: softmax scale, default 1/sqrt(Dk).
        seq_len: S >= T, tokens of the sequence the queries end (a chunk after S - T cached tokens); None: T.
        cu_seqlens: None, or int32 [N+1] packed sequences (B == 1); k_cmp/v_cmp then packed per sequence with
            exactly sum_n num_compressed_blocks(len_n) blocks (module docstring); t counts from each sequence's 0.
    Returns:
        o [B, T, HQ, Dv] in q's dtype (0 for t < block_len - 1), lse [B, T, HQ] float32 (natural log; -inf there).
    """
    op = "compressed_attention"
    seq_len = check_compressed_args(op, q, k_cmp, v_cmp, layout, scale, seq_len, cu_seqlens is not None, triton=False)
    if cu_seqlens is not None:
        offsets, blocks = check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride,
                                       {"k_cmp": k_cmp, "v_cmp": v_cmp})
        return by_sequence(lambda *x: compressed_attention(*x, layout=layout, scale=scale), [q, k_cmp, v_cmp], "tcc",
                           offsets, blocks)
    o, lse = _compressed(q, k_cmp, v_cmp, query_positions(q, seq_len), layout, default_scale(q, scale))
    return o.to(q.dtype), lse


def compressed_to_selection_weights(num_cmp, num_slc, layout: NSALayout, device=None):
    """Weights W [num_cmp, num_slc] of eq. 9: p_slc[j] = sum_i W[i, j] * p_cmp[i] (l, d, l' from the layout).

    W[i, j] = (tokens shared by compressed block i = [i*d, i*d + l) and selection block j = [j*l', (j+1)*l')) / d,
    i.e. eq. 9 read as p_slc[j] = sum_{m=0}^{l'/d-1} sum_{n=0}^{l/d-1} p_cmp[(l'/d)*j + m - n]: each of the l'/d
    stride-d pieces of selection block j collects the probability of every compressed block that covers it.
    (As printed, eq. 9's index (l'/d)*j - m - n would count blocks 4j-4..4j, which end before block j begins.)

    Worked example, l=32, d=16, l'=64 (l'/d = 4, l/d = 2): selection block j covers tokens [64j, 64j+64) and gets
        1 * p_cmp[4j-1]  (tokens [64j-16, 64j+16): 16 shared)
      + 2 * p_cmp[4j]    ([64j,    64j+32): 32 shared)
      + 2 * p_cmp[4j+1]  ([64j+16, 64j+48))
      + 2 * p_cmp[4j+2]  ([64j+32, 64j+64))
      + 1 * p_cmp[4j+3]  ([64j+48, 64j+80): 16 shared)
    so block 0 gets 2*p[0] + 2*p[1] + 2*p[2] + p[3]. With l = d = l' (flash-linear-attention) W is the identity.
    """
    start = torch.arange(num_cmp, device=device)[:, None] * layout.block_stride
    j0 = torch.arange(num_slc, device=device)[None, :] * layout.select_len
    shared = (torch.minimum(start + layout.block_len, j0 + layout.select_len) - torch.maximum(start, j0)).clamp_min(0)
    return shared.float() / layout.block_stride


def block_importance(q, k_cmp, lse, positions, num_keys, layout: NSALayout, scale, leading_blocks=1,
                     local_tokens=None):
    """Importance of each selection block for each query and KV head, float32 [B, Tq, H, NJ], NJ = cdiv(S, l').

    Eq. 8 p_cmp = exp(q k_cmp^T * scale - lse) over the visible compressed blocks, summed over the G query heads
    of each KV head (eq. 10), mapped by `compressed_to_selection_weights` (eq. 9); then the forced blocks get +inf
    and blocks after the query's own -1. Forced: the first `leading_blocks` blocks and the blocks holding the query's
    last `local_tokens` tokens (None: l' + 1, i.e. positions // l' and positions // l' - 1: NSA's 0 and 2 local).
    q [B, Tq, HQ, Dk]; k_cmp [B, Tc, H, Dk]; lse [B, Tq, HQ]; positions [B, Tq] of the queries; S = num_keys.
    """
    B, Tq, HQ, _ = q.shape
    H = k_cmp.shape[2]
    select_len = layout.select_len
    n_visible = visible_compressed_blocks(positions, layout.block_len, layout.block_stride)  # [B, Tq]
    s = _scores(q, k_cmp, scale)  # [B, Tq, H, G, Tc]
    visible = (torch.arange(k_cmp.shape[1], device=q.device) < n_visible[..., None])[:, :, None, None, :]
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).reshape(B, Tq, H, HQ // H, 1)
    p_cmp = torch.where(visible, torch.exp(s - lse_safe), torch.zeros_like(s))  # eq. 8
    num_slc = -(-num_keys // select_len)
    weights = compressed_to_selection_weights(k_cmp.shape[1], num_slc, layout, q.device)
    importance = p_cmp.sum(3) @ weights  # eq. 10 (sum over the group's heads), then eq. 9 -> [B, Tq, H, NJ]
    j = torch.arange(num_slc, device=q.device)
    current = (positions // select_len)[:, :, None, None]  # [B, Tq, 1, 1]
    local = select_len + 1 if local_tokens is None else local_tokens
    first_local = ((positions - local + 1).clamp_min(0) // select_len)[:, :, None, None]
    forced = (j < leading_blocks) | ((j >= first_local) & (j <= current))
    importance = torch.where(forced, torch.full_like(importance, float("inf")), importance)
    return torch.where(j <= current, importance, torch.full_like(importance, -1.0))  # future blocks


def _select(q, k_cmp, lse, positions, num_keys, layout: NSALayout, scale, leading_blocks=1, local_tokens=None):
    """Top-n selection blocks per query and KV head -> int32 [B, Tq, H, n], most important first, -1 padded."""
    importance = block_importance(q, k_cmp, lse, positions, num_keys, layout, scale, leading_blocks, local_tokens)
    num_slc, num_selected = importance.shape[-1], layout.num_selected
    mask = (1 << index_bits(num_slc)) - 1
    j = torch.arange(num_slc, device=q.device, dtype=torch.int32)
    keys = (importance.clamp_min(0).view(torch.int32) & ~mask) | (mask - j)  # see utils.index_bits
    keys = torch.where(importance >= 0, keys, torch.full_like(keys, -1))
    if num_slc < num_selected:
        keys = torch.nn.functional.pad(keys, (0, num_selected - num_slc), value=-1)
    top = torch.sort(keys, dim=-1, descending=True).values[..., :num_selected]
    return torch.where(top >= 0, mask - (top & mask), torch.full_like(top, -1)).to(torch.int32)


def select_blocks(q, k_cmp, lse, *, layout: NSALayout = PAPER_LAYOUT, scale=None, seq_len=None, cu_seqlens=None):
    """The n selection blocks of length l' each query attends to (eq. 8-10 and top-n, eq. 11).

    Importance of selection block j for query t and KV head h: the compressed branch's probabilities
    p_cmp = exp(q k_cmp^T * scale - lse) (eq. 8) summed over the G query heads of h (eq. 10) and mapped onto
    selection blocks by `compressed_to_selection_weights` (eq. 9). Blocks after t's own block are never chosen;
    block 0 and the two local blocks (t // l' and t // l' - 1) are always chosen; the rest by importance. Ranking
    compares importances at 31 - b bits of their float32 pattern (b = utils.index_bits(NJ) low bits carry the
    block index: 10 bits up to 1024 blocks, a relative resolution of 2^-13); ties at that resolution go to the
    lower block index.

    Args:
        q: [B, T, HQ, Dk]; k_cmp: [B, Tc, H, Dk]; lse: [B, T, HQ] float32 from `compressed_attention`;
        layout: the NSA hyperparameters; selection reads l, d, l' and n (the window plays no part);
        seq_len: S >= T: the queries are positions S-T..S-1 (module docstring); None: T (positions 0..T-1);
        cu_seqlens: None, or int32 [N+1] packed sequences (B == 1), k_cmp packed per sequence (module docstring).
    Returns:
        block_indices [B, T, H, n] int32, most important first (forced blocks first, ascending), -1 where fewer
        than n blocks exist (t // l' + 1 < n); with cu_seqlens, blocks and t count from each sequence's start.
    """
    op = "select_blocks"
    seq_len = check_compressed_args(op, q, k_cmp, k_cmp, layout, scale, seq_len, cu_seqlens is not None, triton=False)
    check_lse(op, lse, q)
    if cu_seqlens is not None:
        offsets, blocks = check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride, {"k_cmp": k_cmp})
        return by_sequence(lambda *x: select_blocks(*x, layout=layout, scale=scale), [q, k_cmp, lse], "tct", offsets,
                           blocks)
    return _select(q, k_cmp, lse, query_positions(q, seq_len), seq_len, layout, default_scale(q, scale))


def _selected(q, k, v, block_indices, positions, select_len, scale):
    num_slc = -(-k.shape[1] // select_len)
    slots = torch.where(block_indices >= 0, block_indices, num_slc).long()  # unused slots -> a dummy column
    chosen = torch.zeros(*block_indices.shape[:3], num_slc + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, slots, True)
    s = torch.arange(k.shape[1], device=q.device)
    visible = chosen[..., s // select_len] & (s <= positions[:, :, None, None])  # [B, Tq, H, S]
    return _masked_attention(q, k, v, visible, scale)


def selected_attention(q, k, v, block_indices, *, layout: NSALayout = PAPER_LAYOUT, scale=None, cu_seqlens=None):
    """Attention of every query over the tokens of its selected blocks (eq. 11-12), tokens after t masked.

    Args:
        q: [B, T, HQ, Dk]; k: [B, S, H, Dk]; v: [B, S, H, Dv], S >= T: query row i stands at position i + S - T;
        block_indices: [B, T, H, n] int32 selection-block indices (block j = tokens [j*l', (j+1)*l')), -1 unused;
        layout: the NSA hyperparameters; this branch reads select_len l' (n is block_indices' last dim);
        cu_seqlens: None, or int32 [N+1] packed sequences (B == 1); block indices and t per sequence.
    Returns:
        o [B, T, HQ, Dv] in q's dtype.
    """
    op = "selected_attention"
    check_layout(op, layout)
    check_qkv(op, q, k, v, triton=False)
    check_block_indices(op, block_indices, q, k.shape[2])
    if cu_seqlens is not None:
        offsets, blocks = check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride, num_keys=k.shape[1])
        return by_sequence(lambda *x: selected_attention(*x, layout=layout, scale=scale), [q, k, v, block_indices],
                           "tttt", offsets, blocks)
    check_prefill_length(op, q, k)
    o, _ = _selected(q, k, v, block_indices, query_positions(q, k.shape[1]), layout.select_len,
                     default_scale(q, scale))
    return o.to(q.dtype)


def _window(q, k, v, positions, window, scale):
    s = torch.arange(k.shape[1], device=q.device)
    t = positions[:, :, None, None]
    return _masked_attention(q, k, v, (s <= t) & (s > t - window), scale)


# ------------------------------------------------------------------------------------------------ whole
def _gated_sum(outputs_and_gates):
    return sum(g.float().unsqueeze(-1) * o for o, g in outputs_and_gates)


def gated_sum(o_1, g_1, o_2, g_2, o_3=None, g_3=None):
    """Eq. 5's sum of branch outputs: o_i [..., Dv] (one shape and dtype), gates g_i [...] -> sum_i g_i * o_i
    [..., Dv] in o_1's dtype, float32 math."""
    pairs = [(o_1, g_1), (o_2, g_2)] + ([(o_3, g_3)] if o_3 is not None else [])
    return _gated_sum(pairs).to(o_1.dtype)


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win=None, *, layout: NSALayout = PAPER_LAYOUT, scale=None,
                  block_indices=None, return_block_indices=False, cu_seqlens=None):
    """Native Sparse Attention (eq. 5): o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

    Args:
        q: [B, T, HQ, Dk]; k, v: [B, S, H, Dk] / [B, S, H, Dv] raw keys/values (selection and window branches),
            S >= T: query row i stands at position i + S - T (a prompt chunk after S - T cached tokens);
        k_cmp, v_cmp: [B, Tc, H, Dk] / [B, Tc, H, Dv] compressed blocks of the S tokens (see module docstring);
        g_cmp, g_slc, g_win: [B, T, HQ] gates (g_win may be None when layout.window is 0);
        layout: the NSA hyperparameters (l, d, l', n, w; NSALayout); window w > 0 adds the sliding-window branch
            over the last w tokens, 0 leaves it out;
        block_indices: [B, T, H, n] int32 to use instead of selecting (layout.num_selected is then ignored);
        cu_seqlens: None, or int32 [N+1] offsets of N sequences packed along T (B == 1, S == T), each attending
            only to itself from its own position 0. k_cmp/v_cmp are then [1, Tc, H, D] packed per sequence:
            sequence n's floor((len_n - l)/d) + 1 blocks (0 if len_n < l) follow sequence n-1's, so Tc is their
            sum (`mean_pool(k, l, d, cu_seqlens=cu_seqlens)` gives this layout); block indices (given or
            returned) count selection blocks from each sequence's own start.
    Returns:
        o [B, T, HQ, Dv] in q's dtype; with return_block_indices, (o, block_indices). Gradients reach q, k, v,
        k_cmp, v_cmp and the gates; the block selection carries none.
    """
    op = "nsa_attention"
    check_nsa(op, q, k, v, k_cmp, v_cmp, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}, layout, scale,
              triton=False, varlen=cu_seqlens is not None)
    if cu_seqlens is not None:
        offsets, blocks = check_varlen(op, cu_seqlens, q, layout.block_len, layout.block_stride,
                                       {"k_cmp": k_cmp, "v_cmp": v_cmp}, num_keys=k.shape[1])
        if block_indices is not None:
            check_block_indices(op, block_indices, q, k.shape[2])

        def one_sequence(*x):
            return nsa_attention(*x[:8], layout=layout, scale=scale, block_indices=x[8],
                                 return_block_indices=return_block_indices)

        return by_sequence(one_sequence, [q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_indices], "tttcctttt",
                           offsets, blocks)
    scale = default_scale(q, scale)
    positions = query_positions(q, k.shape[1])
    o_cmp, lse = _compressed(q, k_cmp, v_cmp, positions, layout, scale)
    if block_indices is None:
        block_indices = _select(q.detach(), k_cmp.detach(), lse.detach(), positions, k.shape[1], layout, scale)
    else:
        check_block_indices(op, block_indices, q, k.shape[2])
    o_slc, _ = _selected(q, k, v, block_indices, positions, layout.select_len, scale)
    branches = [(o_cmp, g_cmp), (o_slc, g_slc)]
    if layout.window:
        branches.append((_window(q, k, v, positions, layout.window, scale)[0], g_win))
    o = _gated_sum(branches).to(q.dtype)
    return (o, block_indices) if return_block_indices else o


def nsa_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win=None, *,
               layout: NSALayout = PAPER_LAYOUT, scale=None, k_window=None, v_window=None, leading_blocks=1,
               local_tokens=None, return_block_indices=False):
    """One NSA decode step: the new token's output from an NSA cache; equals the last row of `nsa_attention`.

    Args:
        q: [B, HQ, Dk] the new token's queries (at position cache_seqlens[b] - 1 of sequence b);
        k_cache, v_cache: [B, S_max, H, Dk] / [B, S_max, H, Dv] raw keys/values, the new token's included;
        k_cmp_cache, v_cmp_cache: [B, Tc_max, H, Dk] / [B, Tc_max, H, Dv] compressed blocks, one appended every
            block_stride tokens once block_len tokens exist (the first num_compressed_blocks(cache_seqlens[b])
            rows are read);
        cache_seqlens: [B] int32 tokens in the cache per sequence, the new one included (>= 1);
        g_cmp, g_slc, g_win: [B, HQ] gates (g_win may be None when layout.window is 0);
        layout: the NSA hyperparameters (l, d, l', n, w; NSALayout);
        k_window, v_window: None (the window branch reads the last `window` keys of k_cache/v_cache), or the window
            branch's own keys/values (the paper's independent K/V): rings [B, window, H, Dk] / [B, window, H, Dv]
            holding token p in slot p % window, so slots [0, min(cache_seqlens[b], window)) are row b's last tokens;
        leading_blocks, local_tokens: the selection always keeps the first `leading_blocks` selection blocks and the
            blocks holding the new token's last `local_tokens` tokens (None: select_len + 1, the token's block and
            the one before: NSA's rule). Training-free sparse attention sets them (its leading and local tokens).
        return_block_indices: also return the selected blocks.
    Returns:
        o [B, HQ, Dv] in q's dtype; with return_block_indices, (o, block_indices [B, 1, H, n] int32: the selection
        blocks of each KV head, most important first, -1 padded, as select_blocks' last row).
    """
    op = "nsa_decode"
    check_decode(op, q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens,
                 {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}, layout, scale, triton=False, k_window=k_window,
                 v_window=v_window, leading_blocks=leading_blocks, local_tokens=local_tokens)
    check_cache_lengths(op, cache_seqlens, k_cache)
    scale = default_scale(q, scale)
    q1 = q[:, None]
    positions = (cache_seqlens.long() - 1)[:, None]  # [B, 1]
    o_cmp, lse = _compressed(q1, k_cmp_cache, v_cmp_cache, positions, layout, scale)
    block_indices = _select(q1, k_cmp_cache, lse, positions, k_cache.shape[1], layout, scale, leading_blocks,
                            local_tokens)
    o_slc, _ = _selected(q1, k_cache, v_cache, block_indices, positions, layout.select_len, scale)
    window = layout.window
    branches = [(o_cmp[:, 0], g_cmp), (o_slc[:, 0], g_slc)]
    if window and k_window is None:
        branches.append((_window(q1, k_cache, v_cache, positions, window, scale)[0][:, 0], g_win))
    elif window:  # attention does not depend on the keys' order: the ring's filled slots are the window
        filled = torch.arange(window, device=q.device)[None, :] < cache_seqlens.long()[:, None]
        branches.append((_masked_attention(q1, k_window, v_window, filled[:, None, None, :], scale)[0][:, 0], g_win))
    out = _gated_sum(branches).to(q.dtype)
    return (out, block_indices) if return_block_indices else out
