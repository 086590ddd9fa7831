"""Our attention inside transformers models, through its AttentionInterface (`attn_implementation=...`).

- "nsa_eval_triton": causal attention (GQA, sliding window) on nsa_eval.kernels: Triton on CUDA tensors, the
  PyTorch reference elsewhere. `hf:` checkpoints use it on CUDA; on the CPU they keep transformers' sdpa.
- "nsa_eval_sparse": training-free NSA-style sparse attention for any full-attention checkpoint (the paper's
  Exact-Top / Quest-like baselines, `--attention sparse`): the rule of model_adapters/runtime/sparse.py (which the
  native engine runs too) over the layer's keys, their block means taken here.

Both take transformers' padding mask as the 2D [B, S] key mask that its flash-attention path gets (or None), and run
padded rows one at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from nsa_eval.kernels.attention import attention, attention_decode
from nsa_eval.kernels.nsa import mean_pool
from nsa_eval.model_adapters.runtime.config import SparseSettings
from nsa_eval.model_adapters.runtime.sparse import sparse_attention_over_blocks

TRITON_ATTENTION = "nsa_eval_triton"
SPARSE_ATTENTION = "nsa_eval_sparse"


# ------------------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------------------


def register() -> None:
    """Register both implementations (and transformers' 2D padding mask for them); safe to call again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(TRITON_ATTENTION, full_attention_forward)
    AttentionInterface.register(SPARSE_ATTENTION, sparse_attention_forward)
    AttentionMaskInterface.register(TRITON_ATTENTION, flash_attention_mask)
    AttentionMaskInterface.register(SPARSE_ATTENTION, flash_attention_mask)


def attn_implementation(attention_kind: str, device: torch.device) -> str | None:
    """The attn_implementation to load an `hf:` model with: ours on CUDA ('full'), transformers' default (sdpa) on
    the CPU, the sparse one anywhere ('sparse'). Registers ours first."""
    register()
    if attention_kind == "sparse":
        return SPARSE_ATTENTION
    return TRITON_ATTENTION if device.type == "cuda" else None


def enable_sparse(lm: Any, settings: SparseSettings) -> None:
    """Give an HFModel loaded with the sparse implementation its settings; its name says it is sparse."""
    lm.model.config.nsa_eval_sparse = settings
    lm.name = f"{lm.name}+sparse{settings.budget}"


# ------------------------------------------------------------------------------------------------------------
# the attention functions transformers calls
# ------------------------------------------------------------------------------------------------------------


def full_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, HQ, T, D], key/value [B, H, S, D] (the cache included, T <= S) -> ([B, T, HQ, D], None)."""
    _check_supported(module, kwargs)
    window = kwargs.get("sliding_window")

    def causal(q, k, v):
        if q.shape[1] == 1:  # a decode step: the split-K kernel over the whole cache
            lengths = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
            return attention_decode(q[:, 0], k, v, lengths, window=window, scale=scaling)[:, None]
        return attention(q, k, v, causal=True, window=window, scale=scaling)

    return _rows(causal, query, key, value, attention_mask), None


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """As full_attention_forward, each query seeing only its budget of tokens (module docstring)."""
    _check_supported(module, kwargs)
    if kwargs.get("sliding_window"):
        raise ValueError("--attention sparse does not apply to sliding-window layers; use --attention full")
    settings = getattr(module.config, "nsa_eval_sparse", None) or SparseSettings()
    return _rows(lambda q, k, v: sparse_attention(q, k, v, settings, scaling), query, key, value, attention_mask), None


def _check_supported(module, kwargs) -> None:
    if not getattr(module, "is_causal", True):
        raise ValueError("nsa_eval attention runs causal decoder layers only; load this model with its own attention")
    if kwargs.get("softcap") is not None:
        raise ValueError("nsa_eval attention has no logit soft-capping; load this model with attn_implementation eager")


def _rows(core, query, key, value, attention_mask):
    """core(q [b, T', HQ, D], k [b, S', H, D], v) over the unpadded part of each row -> [B, T, HQ, Dv] (zeros for
    padded queries). Queries are the last T of the S key positions (bottom-right causal alignment)."""
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if attention_mask is None:
        return core(q, k, v)
    if attention_mask.ndim != 2:
        raise ValueError(f"nsa_eval attention takes a 2D padding mask [B, S], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, -S:].bool()
    counts = mask.sum(-1)
    starts = (mask.int().cumsum(-1) == 0).sum(-1)
    if bool((counts == S).all()):
        return core(q, k, v)
    out = q.new_zeros(B, T, q.shape[2], v.shape[3])
    first_query = S - T  # key position of query 0
    for b, (start, count) in enumerate(zip(starts.tolist(), counts.tolist())):
        if not bool(mask[b, start:start + count].all()):
            raise ValueError(f"row {b} of the attention mask has a gap; pad on one side only")
        lo, hi = max(start, first_query), min(start + count, S)
        if lo < hi:
            out[b, lo - first_query:hi - first_query] = core(q[b:b + 1, lo - first_query:hi - first_query],
                                                             k[b:b + 1, start:hi], v[b:b + 1, start:hi])[0]
    return out


# ------------------------------------------------------------------------------------------------------------
# training-free sparse attention
# ------------------------------------------------------------------------------------------------------------


def sparse_attention(q, k, v, settings: SparseSettings, scale: float | None = None) -> torch.Tensor:
    """q [B, T, HQ, D] at key positions S-T..S-1, k [B, S, H, D], v [B, S, H, Dv] -> [B, T, HQ, Dv] (module
    docstring), on the NSA kernels (Triton on CUDA, the reference elsewhere) with the queries offset by S - T."""
    return sparse_attention_over_blocks(q, k, v, mean_pool(k, settings.block), settings, None, scale)
