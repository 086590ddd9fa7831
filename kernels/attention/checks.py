"""Argument checks of the attention op, shared by its reference and Triton paths (the op's public boundary).

Every failure is a ValueError whose message names the argument and says what would fix it; the checks every op
shares (tensors, dtypes, scale, head dims, cu_seqlens) are in kernels/utils.py.
"""

from __future__ import annotations

import torch

from nsa_eval.kernels.utils import (check_cache_lengths, check_cu_seqlens, check_head_dims, check_same, check_scale,
                                    check_tensor, dtypes_for, fail)


def _check_window(op: str, window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        fail(op, f"window must be None or a positive int (number of keys a query sees), got {window!r}")


def check_attention_args(q, k, v, causal, window, cu_seqlens, scale, *, triton: bool = False) -> None:
    """Validate `attention` arguments (see reference.attention for the layouts); raise ValueError."""
    op = "attention"
    check_tensor(op, "q", q, 4, "[B, T, HQ, Dk]")
    check_tensor(op, "k", k, 4, "[B, S, H, Dk]")
    check_tensor(op, "v", v, 4, "[B, S, H, Dv]")
    check_same(op, {"q": q, "k": k, "v": v}, dtypes_for(triton))
    B, T, HQ, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        fail(op, f"batch sizes differ: q has B={B}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        fail(op, f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, S, H]")
    S, H = k.shape[1], k.shape[2]
    if k.shape[3] != Dk:
        fail(op, f"k head dim {k.shape[3]} differs from q head dim {Dk}")
    if T < 1 or S < 1 or HQ < 1 or H < 1 or Dk < 1 or v.shape[3] < 1:
        fail(op, f"empty dimension in q {tuple(q.shape)}, k {tuple(k.shape)} or v {tuple(v.shape)}")
    if HQ % H != 0:
        fail(op, f"q has HQ={HQ} heads, not a multiple of the H={H} KV heads of k and v")
    if not isinstance(causal, bool):
        fail(op, f"causal must be True or False, got {causal!r}")
    _check_window(op, window)
    if window is not None and not causal:
        fail(op, "window needs causal=True (a window is the last w keys up to and including the query)")
    check_scale(op, scale)
    if triton:
        check_head_dims(op, Dk, v.shape[3])
    if cu_seqlens is None:
        if causal and T > S:
            fail(op, f"causal with T={T} queries > S={S} keys leaves queries without keys; pass T <= S")
        return
    check_cu_seqlens(op, cu_seqlens, q, S)


def check_decode_args(q, k_cache, v_cache, cache_seqlens, window, scale, *, triton: bool = False) -> None:
    """Validate `attention_decode` arguments (see reference.attention_decode); raise ValueError.

    The values of cache_seqlens are checked only on the reference path (the Triton path would need a
    device-to-host copy per step).
    """
    op = "attention_decode"
    check_tensor(op, "q", q, 3, "[B, HQ, Dk]")
    check_tensor(op, "k_cache", k_cache, 4, "[B, S_max, H, Dk]")
    check_tensor(op, "v_cache", v_cache, 4, "[B, S_max, H, Dv]")
    check_same(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, dtypes_for(triton))
    B, HQ, Dk = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        fail(op, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on [B, S_max, H]")
    if k_cache.shape[0] != B:
        fail(op, f"q has B={B} sequences but k_cache has {k_cache.shape[0]}")
    if k_cache.shape[3] != Dk:
        fail(op, f"k_cache head dim {k_cache.shape[3]} differs from q head dim {Dk}")
    H = k_cache.shape[2]
    if B < 1 or HQ < 1 or H < 1 or k_cache.shape[1] < 1:
        fail(op, f"empty dimension in q {tuple(q.shape)} or k_cache {tuple(k_cache.shape)}")
    if HQ % H != 0:
        fail(op, f"q has HQ={HQ} heads, not a multiple of the H={H} KV heads of the caches")
    if (
        not isinstance(cache_seqlens, torch.Tensor)
        or cache_seqlens.dtype != torch.int32
        or tuple(cache_seqlens.shape) != (B,)
    ):
        fail(op, f"cache_seqlens must be an int32 tensor [B]=[{B}] of valid cached tokens per sequence")
    if cache_seqlens.device != q.device:
        fail(op, f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    _check_window(op, window)
    check_scale(op, scale)
    if triton:
        check_head_dims(op, Dk, v_cache.shape[3])
    else:
        check_cache_lengths(op, cache_seqlens, k_cache)
