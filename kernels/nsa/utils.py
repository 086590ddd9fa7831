"""NSA helpers shared by the reference and the Triton paths: block arithmetic, mean pooling, argument checks.

Every check failure is a ValueError whose message names the argument and says what would fix it.
"""

from __future__ import annotations

import math

import torch

from nsa_eval.kernels.nsa.layout import NSALayout, check_blocks, check_layout, check_positive_int
from nsa_eval.kernels.utils import (check_cu_seqlens, check_head_dims, check_same, check_scale, check_tensor,
                                    dtypes_for, fail)


def num_compressed_blocks(seq_len: int, block_len: int, block_stride: int) -> int:
    """Complete compressed blocks in `seq_len` tokens: block i covers tokens [i*stride, i*stride + block_len)."""
    return 0 if seq_len < block_len else (seq_len - block_len) // block_stride + 1


def index_bits(num_blocks: int) -> int:
    """Low bits of a selection ranking key that hold the block index (enough for num_blocks blocks).

    Blocks are ranked by int32 keys: the float32 bits of the importance with these low bits replaced by
    (2^b - 1 - j); importances equal in the remaining 31 - b bits go to the lower block index j.
    """
    return max(1, (num_blocks - 1).bit_length())


def visible_compressed_blocks(positions: torch.Tensor, block_len: int, block_stride: int) -> torch.Tensor:
    """Compressed blocks a query at each position sees (block i when t >= i*stride + block_len - 1)."""
    return (positions + 1 - block_len + block_stride).clamp_min(0) // block_stride


def compressed_offsets(offsets: list[int], block_len: int, block_stride: int) -> list[int]:
    """Packed compressed blocks: token offsets cu_seqlens [N+1] -> block offsets [N+1] (cu_seqlens_cmp), where
    sequence n owns num_compressed_blocks(len_n) blocks, each within the sequence, numbered from its own 0."""
    blocks = [0]
    for a, b in zip(offsets, offsets[1:]):
        blocks.append(blocks[-1] + num_compressed_blocks(b - a, block_len, block_stride))
    return blocks


def check_varlen(op: str, cu_seqlens, q, block_len, block_stride, compressed=None, num_keys=None) -> tuple:
    """Packed inputs: cu_seqlens as in full attention (B == 1, int32 [N+1] from 0 to T, not decreasing) and each
    compressed tensor in `compressed` ({name: tensor}) holding exactly the blocks `compressed_offsets` counts.
    Returns (token offsets, compressed-block offsets) as host lists. block_len, block_stride: checked by the caller
    (an NSALayout's, or mean_pool's)."""
    offsets = check_cu_seqlens(op, cu_seqlens, q, q.shape[1] if num_keys is None else num_keys)
    blocks = compressed_offsets(offsets, block_len, block_stride)
    for name, x in (compressed or {}).items():
        if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] != blocks[-1]:
            fail(op, f"{name} has {x.shape[1]} blocks but the packed sequences make {blocks[-1]} (sequence n has "
                     f"floor((len_n - {block_len}) / {block_stride}) + 1 blocks, 0 when shorter than {block_len}); "
                     f"pack them per sequence, e.g. mean_pool(k, {block_len}, {block_stride}, cu_seqlens=cu_seqlens)")
    return offsets, blocks


def by_sequence(fn, args, kinds, offsets, blocks):
    """fn over each non-empty packed sequence, outputs concatenated along dim 1 (each output, for a tuple).

    args: positional arguments of fn; kinds: per argument "t" (sliced along dim 1 by the token offsets),
    "c" (by the compressed-block offsets) or None (passed as is); None arguments stay None.
    """
    parts = []
    for n in range(len(offsets) - 1):
        if offsets[n + 1] == offsets[n]:
            continue
        spans = {"t": slice(offsets[n], offsets[n + 1]), "c": slice(blocks[n], blocks[n + 1])}
        parts.append(fn(*[x if kind is None or x is None else x[:, spans[kind]] for x, kind in zip(args, kinds)]))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, 1) for p in zip(*parts))
    return torch.cat(parts, 1)


def mean_pool(x: torch.Tensor, block_len: int = 64, block_stride: int | None = None, *,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each complete block of tokens: x [B, T, H, D] -> [B, Tc, H, D], Tc = num_compressed_blocks.

    Block i averages tokens [i*block_stride, i*block_stride + block_len); block_stride defaults to block_len
    (flash-linear-attention's layout, non-overlapping blocks). A trailing partial block is left out: no query
    may see it before it is complete. Float32 accumulation, result in x's dtype.
    cu_seqlens: None, or int32 [N+1] offsets of sequences packed along T (B == 1): each sequence is pooled on its
    own (no block crosses into the next) and the result packs the blocks per sequence, [1, Tc, H, D] with
    Tc = sum_n num_compressed_blocks(len_n), in the layout `nsa_attention` takes with cu_seqlens.
    """
    block_stride = block_len if block_stride is None else block_stride
    check_tensor("mean_pool", "x", x, 4, "[B, T, H, D]")
    check_blocks("mean_pool", block_len, block_stride)
    if cu_seqlens is not None:
        offsets, blocks = check_varlen("mean_pool", cu_seqlens, x, block_len, block_stride)
        if blocks[-1] == 0:
            return x.new_zeros(1, 0, *x.shape[2:])
        return by_sequence(lambda seq: mean_pool(seq, block_len, block_stride), [x], ["t"], offsets, blocks)
    if x.shape[1] < block_len:
        return x.new_zeros(x.shape[0], 0, *x.shape[2:])
    windows = x.float().unfold(1, block_len, block_stride)  # [B, Tc, H, D, block_len]
    return windows.mean(-1).to(x.dtype)


def default_scale(q, scale):
    """The softmax scale: `scale`, or 1 / sqrt(Dk) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def check_qkv(op: str, q, k, v, triton: bool, names=("k", "v")) -> None:
    """q [B, T, HQ, Dk], k [B, S, H, Dk], v [B, S, H, Dv] with HQ a multiple of H (names: how k, v are called)."""
    kn, vn = names
    check_tensor(op, "q", q, 4, "[B, T, HQ, Dk]")
    check_tensor(op, kn, k, 4, "[B, S, H, Dk]")
    check_tensor(op, vn, v, 4, "[B, S, H, Dv]")
    check_same(op, {"q": q, kn: k, vn: v}, dtypes_for(triton))
    if k.shape[:3] != v.shape[:3]:
        fail(op, f"{kn} {tuple(k.shape)} and {vn} {tuple(v.shape)} must agree on [B, S, H]")
    if k.shape[0] != q.shape[0]:
        fail(op, f"q has B={q.shape[0]} but {kn} has B={k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        fail(op, f"{kn} head dim {k.shape[3]} differs from q head dim {q.shape[3]}")
    if min(q.shape) < 1 or min(k.shape) < 1 or v.shape[3] < 1:
        fail(op, f"empty dimension in q {tuple(q.shape)}, {kn} {tuple(k.shape)} or {vn} {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        fail(op, f"q has HQ={q.shape[2]} heads, not a multiple of the H={k.shape[2]} KV heads of {kn} and {vn}")
    if triton:
        check_head_dims(op, q.shape[3], v.shape[3])


def check_compressed(op: str, q, k_cmp, v_cmp, layout: NSALayout, scale, triton: bool, seq_len=None,
                     names=("k_cmp", "v_cmp")) -> None:
    """k_cmp [B, Tc, H, Dk], v_cmp [B, Tc, H, Dv] with at least the complete blocks of seq_len (default T) tokens
    (blocks of layout.block_len every layout.block_stride tokens)."""
    kn, vn = names
    block_len, block_stride = layout.block_len, layout.block_stride
    check_tensor(op, kn, k_cmp, 4, "[B, Tc, H, Dk]")
    check_tensor(op, vn, v_cmp, 4, "[B, Tc, H, Dv]")
    check_same(op, {"q": q, kn: k_cmp, vn: v_cmp}, dtypes_for(triton))
    if k_cmp.shape[:3] != v_cmp.shape[:3]:
        fail(op, f"{kn} {tuple(k_cmp.shape)} and {vn} {tuple(v_cmp.shape)} must agree on [B, Tc, H]")
    if k_cmp.shape[0] != q.shape[0] or k_cmp.shape[3] != q.shape[3]:
        fail(op, f"{kn} {tuple(k_cmp.shape)} must match q {tuple(q.shape)} on batch and head dim")
    if k_cmp.shape[2] < 1 or q.shape[2] % k_cmp.shape[2]:
        fail(op, f"q has HQ={q.shape[2]} heads, not a multiple of the H={k_cmp.shape[2]} heads of {kn}")
    seq_len = q.shape[1] if seq_len is None else seq_len
    needed = num_compressed_blocks(seq_len, block_len, block_stride)
    if k_cmp.shape[1] < needed:
        fail(op, f"{kn} has {k_cmp.shape[1]} blocks but {seq_len} tokens make {needed} complete blocks of "
                 f"length {block_len}, stride {block_stride}; pass them all (e.g. mean_pool(k, {block_len}, "
                 f"{block_stride}))")
    check_scale(op, scale)
    if triton:
        check_head_dims(op, q.shape[3], v_cmp.shape[3])


def check_compressed_args(op: str, q, k_cmp, v_cmp, layout: NSALayout, scale, seq_len, varlen: bool,
                          triton: bool) -> int:
    """compressed_attention's and select_blocks' checks on both paths: the layout (check_layout), seq_len
    (check_seq_len), then the compressed keys and values that many tokens make (check_compressed; with packed
    sequences, check_varlen counts them). Returns seq_len."""
    check_layout(op, layout)
    seq_len = check_seq_len(op, q, seq_len, varlen)
    check_compressed(op, q, k_cmp, v_cmp, layout, scale, triton=triton, seq_len=0 if varlen else seq_len)
    return seq_len


def check_lse(op: str, lse, q) -> None:
    """lse [B, T, HQ] float32, the compressed branch's log-sum-exp."""
    check_tensor(op, "lse", lse, 3, "[B, T, HQ] float32")
    if tuple(lse.shape) != tuple(q.shape[:3]) or lse.dtype != torch.float32:
        fail(op, f"lse must be float32 {tuple(q.shape[:3])} (the compressed branch's), got {lse.dtype} "
                 f"{tuple(lse.shape)}")


def check_block_indices(op: str, block_indices, q, num_kv_heads: int) -> None:
    """block_indices [B, T, H, n] int32: selection blocks per query and KV head, -1 for an unused slot."""
    check_tensor(op, "block_indices", block_indices, 4, "[B, T, H, n] int32")
    B, T = q.shape[:2]
    if block_indices.dtype != torch.int32 or tuple(block_indices.shape[:3]) != (B, T, num_kv_heads):
        fail(op, f"block_indices must be int32 [B, T, H, n] = [{B}, {T}, {num_kv_heads}, n], got "
                 f"{block_indices.dtype} {tuple(block_indices.shape)}")
    if block_indices.shape[3] < 1:
        fail(op, "block_indices needs at least one slot per query (n >= 1)")


def check_gates(op: str, gates: dict, q, shape: tuple, needed: dict) -> None:
    """Gates of `shape` ([B, T, HQ], or [B, HQ] at decode), floating point, on q's device; None where not needed."""
    for name, g in gates.items():
        if g is None:
            if needed[name]:
                fail(op, f"{name} is required (a {list(shape)} gate tensor)")
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(shape):
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            fail(op, f"{name} must be a tensor of shape {list(shape)}, got {got}")
        if not g.is_floating_point() or g.device != q.device:
            fail(op, f"{name} must be a floating-point tensor on {q.device}, got {g.dtype} on {g.device}")


def check_nsa(op, q, k, v, k_cmp, v_cmp, gates: dict, layout: NSALayout, scale, triton: bool,
              varlen: bool = False) -> None:
    """All arguments of `nsa_attention` (see reference.nsa_attention for the shapes); with varlen, all but the
    packing (cu_seqlens and the compressed block count: check_varlen)."""
    check_layout(op, layout)
    check_qkv(op, q, k, v, triton)
    _check_nsa_rest(op, q, k, v, k_cmp, v_cmp, gates, q.shape[:3], layout, scale, triton,
                    seq_len=0 if varlen else k.shape[1], names=("k_cmp", "v_cmp"))
    if not varlen:
        check_prefill_length(op, q, k)


def check_prefill_length(op, q, k) -> None:
    """Prefill: the T queries are the last T of the S keys (bottom-right alignment), so S >= T."""
    if k.shape[1] < q.shape[1]:
        fail(op, f"k has S={k.shape[1]} tokens but q has T={q.shape[1]}; the queries are the last T of the S keys, "
                 "so pass S >= T keys (the cached ones included)")


def check_seq_len(op: str, q, seq_len, varlen: bool) -> int:
    """seq_len: tokens of the sequence whose last T positions the queries are (None -> T). Returns it."""
    T = q.shape[1]
    if seq_len is None:
        return T
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < T:
        fail(op, f"seq_len must be an int >= T={T} (the queries are the last T of seq_len tokens), got {seq_len!r}")
    if varlen and seq_len != T:
        fail(op, f"seq_len={seq_len} with cu_seqlens: packed sequences start at position 0; leave seq_len out")
    return seq_len


def query_positions(q, seq_len: int) -> torch.Tensor:
    """Positions [B, T] of the queries: the last T of seq_len tokens (bottom-right alignment)."""
    B, T = q.shape[:2]
    return torch.arange(seq_len - T, seq_len, device=q.device).expand(B, T)


def check_offset_backward(op: str, offset: int, *tensors) -> None:
    """The Triton kernels' backward covers T == S only: refuse a graph through queries offset into the keys."""
    if offset and torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors):
        fail(op, f"backward with queries offset by {offset} (T < S) is not implemented on the Triton kernels; run "
                 "under torch.no_grad() or pass S == T")


def check_decode(op, q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, gates: dict, layout: NSALayout,
                 scale, triton: bool, k_window=None, v_window=None, leading_blocks=1, local_tokens=None) -> None:
    """All arguments of `nsa_decode` except the values of cache_seqlens (a device-to-host copy on CUDA)."""
    check_layout(op, layout)
    window = layout.window
    check_positive_int(op, "leading_blocks", leading_blocks, minimum=0)
    if local_tokens is not None:
        check_positive_int(op, "local_tokens", local_tokens)
    if (k_window is None) != (v_window is None):
        fail(op, "give k_window and v_window together (the window branch's own ring of keys and values), or neither")
    if k_window is not None:
        if not window:
            fail(op, "k_window/v_window need window > 0 (they hold the window branch's last `window` tokens)")
        B, H, dk, dv = q.shape[0], k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
        for name, ring, d in (("k_window", k_window, dk), ("v_window", v_window, dv)):
            check_tensor(op, name, ring, 4, f"[B, window, H, D] = [{B}, {window}, {H}, {d}]")
            if tuple(ring.shape) != (B, window, H, d):
                fail(op, f"{name} has shape {tuple(ring.shape)}; the window ring must be [B, window, H, D] = "
                         f"[{B}, {window}, {H}, {d}] (token p in slot p % window)")
            if ring.dtype != k_cache.dtype or ring.device != k_cache.device:
                fail(op, f"{name} must have k_cache's dtype and device ({k_cache.dtype} on {k_cache.device}), got "
                         f"{ring.dtype} on {ring.device}")
    check_tensor(op, "q", q, 3, "[B, HQ, Dk]")
    check_qkv(op, q[:, None], k_cache, v_cache, triton, names=("k_cache", "v_cache"))
    _check_nsa_rest(op, q[:, None], k_cache, v_cache, k_cmp_cache, v_cmp_cache, gates, q.shape[:2], layout, scale,
                    triton, seq_len=k_cache.shape[1], names=("k_cmp_cache", "v_cmp_cache"))
    B = q.shape[0]
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (B,):
        fail(op, f"cache_seqlens must be an int32 tensor [B]=[{B}] of cached tokens per sequence (new one included)")
    if cache_seqlens.device != q.device:
        fail(op, f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")


def _check_nsa_rest(op, q, k, v, k_cmp, v_cmp, gates, gate_shape, layout: NSALayout, scale, triton, seq_len, names):
    check_compressed(op, q, k_cmp, v_cmp, layout, scale, triton, seq_len, names)
    kn, vn = names
    if k_cmp.shape[2] != k.shape[2] or k_cmp.shape[3] != k.shape[3] or v_cmp.shape[3] != v.shape[3]:
        fail(op, f"{kn} {tuple(k_cmp.shape)} / {vn} {tuple(v_cmp.shape)} must match the raw keys "
                 f"{tuple(k.shape)} / values {tuple(v.shape)} on H and the head dims")
    check_gates(op, gates, q, tuple(gate_shape), {"g_cmp": True, "g_slc": True, "g_win": bool(layout.window)})
