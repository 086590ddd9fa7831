"""Full attention in plain PyTorch: dense masks, float32 (or float64) math. The oracle and the CPU path.

Same public signatures as the Triton versions in parallel.py and decode.py; the docstrings of
`attention` and `attention_decode` below are the spec both follow.
"""

from __future__ import annotations

import math

import torch

from nsa_eval.kernels.attention.checks import check_attention_args, check_decode_args


def visible_keys(T: int, S: int, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """Bool mask [T, S]: query i sees key j (causal aligned bottom-right, window = last w keys)."""
    i = torch.arange(T, device=device)[:, None] + (S - T)  # the key position query i stands at
    j = torch.arange(S, device=device)[None, :]
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def _dense(q, k, v, causal, window, scale):
    """One batch of equal lengths. q [B, T, HQ, Dk], k [B, S, H, Dk], v [B, S, H, Dv] (math dtype)
    -> o [B, T, HQ, Dv], lse [B, T, HQ]."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    mask = visible_keys(q.shape[1], k.shape[1], causal, window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, HQ, T]
    probs = torch.exp(scores - lse[..., None])
    o = torch.einsum("bhts,bshd->bthd", probs, v)
    return o, lse.transpose(1, 2)


def attention(q, k, v, *, causal=True, window=None, cu_seqlens=None, scale=None, return_lse=False):
    """Scaled dot-product attention with GQA, causal/sliding-window masks and packed variable lengths.

    Args:
        q: [B, T, HQ, Dk] queries.
        k: [B, S, H, Dk] keys, HQ % H == 0: query head h uses KV head h // (HQ // H).
        v: [B, S, H, Dv] values.
        causal: mask aligned bottom-right as flash-attn: query i sees keys j <= i + S - T
            (needs T <= S, so that every query sees a key).
        window: None, or w: query i sees only keys i + S - T - w < j <= i + S - T (the last w keys up to
            and including its own position); needs causal=True.
        cu_seqlens: None, or int32 [N+1] offsets of N sequences packed along T with B == 1 and T == S;
            sequence n is rows cu_seqlens[n]:cu_seqlens[n+1] of q, k and v, and attends only to itself.
        scale: softmax scale, default 1 / sqrt(Dk).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        o [B, T, HQ, Dv] in q's dtype; with return_lse, (o, lse) with lse [B, T, HQ] float32,
        natural log (lse carries no gradient).
    """
    check_attention_args(q, k, v, causal, window, cu_seqlens, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    if cu_seqlens is None:
        o, lse = _dense(qf, kf, vf, causal, window, scale)
    else:
        offsets = cu_seqlens.tolist()
        parts = [
            _dense(qf[:, a:b], kf[:, a:b], vf[:, a:b], causal, window, scale)
            for a, b in zip(offsets, offsets[1:])
            if b > a
        ]
        o = torch.cat([p[0] for p in parts], dim=1)
        lse = torch.cat([p[1] for p in parts], dim=1)
    o = o.to(q.dtype)
    return (o, lse.detach().float()) if return_lse else o


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, return_lse=False):
    """One decoding step: each sequence's new query attends over its KV cache.

    Args:
        q: [B, HQ, Dk], the query of the newest token of each of B sequences.
        k_cache: [B, S_max, H, Dk], HQ % H == 0 (query head h uses KV head h // (HQ // H)).
        v_cache: [B, S_max, H, Dv].
        cache_seqlens: int32 [B], valid cached tokens of each sequence, in [1, S_max]; the new token's
            K/V is already written at position cache_seqlens[b] - 1, so the query sees keys
            j < cache_seqlens[b].
        window: None, or w: the query sees only the last w of those keys.
        scale: softmax scale, default 1 / sqrt(Dk).
        return_lse: also return the log-sum-exp [B, HQ] (float32, natural log).

    Returns:
        o [B, HQ, Dv] in q's dtype (and lse with return_lse).
    """
    check_decode_args(q, k_cache, v_cache, cache_seqlens, window, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k_cache.shape[2]
    k = k_cache.to(math_dtype).repeat_interleave(group, dim=2)
    v = v_cache.to(math_dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(math_dtype), k) * scale
    j = torch.arange(k_cache.shape[1], device=q.device)[None, :]
    lengths = cache_seqlens.long()[:, None]
    mask = j < lengths
    if window is not None:
        mask &= j >= lengths - window
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.einsum("bhs,bshd->bhd", torch.exp(scores - lse[..., None]), v).to(q.dtype)
    return (o, lse.float()) if return_lse else o
