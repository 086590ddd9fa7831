"""Argument checks shared by the reference and the Triton paths (the public boundary of the attention op).

Every failure is a ValueError whose message names the argument and says what would fix it.
"""

from __future__ import annotations

import torch

REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_tensor(op: str, name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        _fail(op, f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def _check_same(op: str, tensors: dict[str, torch.Tensor], dtypes: tuple[torch.dtype, ...]) -> None:
    (first_name, first), *rest = tensors.items()
    if first.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(op, f"{first_name} has dtype {first.dtype}; use one of {names}")
    for name, x in rest:
        if x.dtype != first.dtype:
            _fail(op, f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}; cast them to one dtype")
        if x.device != first.device:
            _fail(op, f"{name} is on {x.device} but {first_name} is on {first.device}; move them to one device")


def _check_window(op: str, window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        _fail(op, f"window must be None or a positive int (number of keys a query sees), got {window!r}")


def _check_scale(op: str, scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        _fail(op, f"scale must be None or a positive number, got {scale!r}")


def _check_head_dims(op: str, dk: int, dv: int) -> None:
    if dk > TRITON_MAX_HEAD_DIM or dv > TRITON_MAX_HEAD_DIM:
        _fail(op, f"head dims Dk={dk}, Dv={dv}: the Triton kernels take at most {TRITON_MAX_HEAD_DIM}")


def check_attention_args(q, k, v, causal, window, cu_seqlens, scale, *, triton: bool = False) -> None:
    """Validate `attention` arguments (see reference.attention for the layouts); raise ValueError."""
    op = "attention"
    _check_tensor(op, "q", q, 4, "[B, T, HQ, Dk]")
    _check_tensor(op, "k", k, 4, "[B, S, H, Dk]")
    _check_tensor(op, "v", v, 4, "[B, S, H, Dv]")
    _check_same(op, {"q": q, "k": k, "v": v}, TRITON_DTYPES if triton else REFERENCE_DTYPES)
    B, T, HQ, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        _fail(op, f"batch sizes differ: q has B={B}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        _fail(op, f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [B, S, H]")
    S, H = k.shape[1], k.shape[2]
    if k.shape[3] != Dk:
        _fail(op, f"k head dim {k.shape[3]} differs from q head dim {Dk}")
    if T < 1 or S < 1 or HQ < 1 or H < 1 or Dk < 1 or v.shape[3] < 1:
        _fail(op, f"empty dimension in q {tuple(q.shape)}, k {tuple(k.shape)} or v {tuple(v.shape)}")
    if HQ % H != 0:
        _fail(op, f"q has HQ={HQ} heads, not a multiple of the H={H} KV heads of k and v")
    if not isinstance(causal, bool):
        _fail(op, f"causal must be True or False, got {causal!r}")
    _check_window(op, window)
    if window is not None and not causal:
        _fail(op, "window needs causal=True (a window is the last w keys up to and including the query)")
    _check_scale(op, scale)
    if triton:
        _check_head_dims(op, Dk, v.shape[3])
    if cu_seqlens is None:
        if causal and T > S:
            _fail(op, f"causal with T={T} queries > S={S} keys leaves queries without keys; pass T <= S")
        return
    check_cu_seqlens(op, cu_seqlens, q, S)


def check_cu_seqlens(op: str, cu_seqlens, q, S: int) -> list[int]:
    """cu_seqlens int32 [N+1] on q's device, rising from 0 to T without decreasing, with B == 1 and S == T keys.
    Returns the offsets as a host list."""
    B, T = q.shape[:2]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
        _fail(op, "cu_seqlens must be a 1-D int32 tensor [N+1] of sequence offsets")
    if cu_seqlens.device != q.device:
        _fail(op, f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if B != 1:
        _fail(op, f"cu_seqlens needs packed inputs with B == 1, got B={B}")
    if S != T:
        _fail(op, f"cu_seqlens needs q and k packed the same way (T == S), got T={T}, S={S}")
    if cu_seqlens.numel() < 2:
        _fail(op, "cu_seqlens needs at least 2 entries [0, ..., T]")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
        _fail(op, f"cu_seqlens must rise from 0 to T={T} without decreasing, got {offsets[:4]}...{offsets[-1:]}")
    return offsets


def check_decode_args(q, k_cache, v_cache, cache_seqlens, window, scale, *, triton: bool = False) -> None:
    """Validate `attention_decode` arguments (see reference.attention_decode); raise ValueError.

    The values of cache_seqlens are checked only on the reference path (the Triton path would need a
    device-to-host copy per step).
    """
    op = "attention_decode"
    _check_tensor(op, "q", q, 3, "[B, HQ, Dk]")
    _check_tensor(op, "k_cache", k_cache, 4, "[B, S_max, H, Dk]")
    _check_tensor(op, "v_cache", v_cache, 4, "[B, S_max, H, Dv]")
    _check_same(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, TRITON_DTYPES if triton else REFERENCE_DTYPES)
    B, HQ, Dk = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        _fail(op, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree on [B, S_max, H]")
    if k_cache.shape[0] != B:
        _fail(op, f"q has B={B} sequences but k_cache has {k_cache.shape[0]}")
    if k_cache.shape[3] != Dk:
        _fail(op, f"k_cache head dim {k_cache.shape[3]} differs from q head dim {Dk}")
    H = k_cache.shape[2]
    if B < 1 or HQ < 1 or H < 1 or k_cache.shape[1] < 1:
        _fail(op, f"empty dimension in q {tuple(q.shape)} or k_cache {tuple(k_cache.shape)}")
    if HQ % H != 0:
        _fail(op, f"q has HQ={HQ} heads, not a multiple of the H={H} KV heads of the caches")
    if (
        not isinstance(cache_seqlens, torch.Tensor)
        or cache_seqlens.dtype != torch.int32
        or tuple(cache_seqlens.shape) != (B,)
    ):
        _fail(op, f"cache_seqlens must be an int32 tensor [B]=[{B}] of valid cached tokens per sequence")
    if cache_seqlens.device != q.device:
        _fail(op, f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    _check_window(op, window)
    _check_scale(op, scale)
    if triton:
        _check_head_dims(op, Dk, v_cache.shape[3])
    else:
        lengths = cache_seqlens.tolist()
        if min(lengths) < 1 or max(lengths) > k_cache.shape[1]:
            _fail(op, f"cache_seqlens must lie in [1, S_max={k_cache.shape[1]}], got {lengths}")
