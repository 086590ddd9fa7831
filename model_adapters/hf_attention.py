"""Our attention inside transformers models, through its AttentionInterface (`attn_implementation=...`).

- "nsa_eval_triton": causal attention (GQA, sliding window) on nsa_eval.kernels: Triton on CUDA tensors, the
  PyTorch reference elsewhere. `hf:` checkpoints use it on CUDA; on the CPU they keep transformers' sdpa.
- "nsa_eval_sparse": training-free NSA-style sparse attention for any full-attention checkpoint (the paper's
  Exact-Top / Quest-like baselines, `--attention sparse`). Per query and KV head: keys mean-pooled over blocks of
  `block` tokens; block importance = the compressed-attention probabilities of the query over those block means,
  summed over the KV head's query heads (NSA eq. 8-10 with l = d = l'); the leading `leading` tokens and the blocks
  covering the last `local` tokens are always kept, then the most important blocks up to `budget` tokens; one
  softmax over the kept tokens. Queries run on the NSA kernels (compressed attention for the scores, block
  selection, selected attention): Triton on CUDA tensors, the PyTorch reference elsewhere; queries after cached
  tokens (decode steps, prompt slices) are the last T of the S keys, which the kernels take as a query offset.

Both take transformers' padding mask as the 2D [B, S] key mask that its flash-attention path gets (or None), and run
padded rows one at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import nsa_eval.kernels.nsa
from nsa_eval.kernels.attention import attention, attention_decode
from nsa_eval.kernels.nsa import compressed_attention, mean_pool, select_blocks, selected_attention
from nsa_eval.model_adapters.runtime.config import SparseSettings

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
    if attention_kind not in ("full", "sparse"):
        raise ValueError(f"--attention must be 'full' or 'sparse', got {attention_kind!r}")
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


def sparse_attention_over_blocks(q, k, v, k_mean, settings: SparseSettings, ops: Any = None,
                                 scale: float | None = None) -> torch.Tensor:
    """sparse_attention with the keys' block means k_mean [B, S // block, H, D] given (the runtime keeps them in its
    cache). ops: the runtime's kernel table (runtime/ops.py), or None for nsa_eval.kernels.nsa (dispatch by device)."""
    indices = sparse_select_blocks(q, k_mean, k.shape[1], settings, ops, scale)
    fns = ops or nsa_eval.kernels.nsa
    return fns.selected_attention(q, k, v, indices, select_len=settings.block, scale=scale)


def sparse_select_blocks(q, k_mean, seq_len: int, settings: SparseSettings, ops: Any = None,
                         scale: float | None = None) -> torch.Tensor:
    """The blocks each query keeps (module docstring): q [B, T, HQ, D] at positions S-T..S-1 of S = seq_len tokens,
    k_mean [B, S // block, H, D] the keys' block means -> int32 [B, T, H, n] (sparse_select's layout). The scores'
    log-sum-exp comes from the compressed-attention kernel of `ops` (None: nsa_eval.kernels.nsa by device)."""
    block = settings.block
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    fns = ops or nsa_eval.kernels.nsa
    _, lse = fns.compressed_attention(q, k_mean, k_mean, block_len=block, block_stride=block, scale=scale,
                                      seq_len=seq_len)
    return sparse_select(q, k_mean, lse, seq_len, settings, scale)


def sparse_select(q, k_mean, lse, seq_len: int, settings: SparseSettings, scale: float,
                  max_scores: int = 1 << 27) -> torch.Tensor:
    """The blocks each query keeps: q [B, T, HQ, D] at positions S-T..S-1, k_mean [B, Tc, H, D] block means, lse
    [B, T, HQ] (float32, of the scores over the block means) -> int32 [B, T, H, n], most important first (the leading
    and local blocks first), -1 padded. The PyTorch reference's selection (kernels/nsa/reference.py `_select`, its
    ranking keys and tie rule) with the sparse rule's forced blocks, specialised to l = d = l' = block (eq. 9 is
    then the identity) and taking the top n instead of sorting every block; in slices of queries that keep the
    float32 scores under `max_scores` elements. (The selection kernel's top-n merge costs n^2 per chunk: with
    n = 40 the dense score matrix of T x S/block is the faster way, and still small.)"""
    from nsa_eval.kernels.nsa.utils import index_bits

    B, T, HQ, D = q.shape
    Tc, H = k_mean.shape[1], k_mean.shape[2]
    block, n = settings.block, settings.num_blocks
    num_blocks = -(-seq_len // block)
    mask = (1 << index_bits(num_blocks)) - 1
    j = torch.arange(num_blocks, device=q.device)
    keys_k = k_mean.float()
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    step = max(1, max_scores // (B * HQ * max(1, Tc)))
    parts = []
    for a in range(0, T, step):
        t = min(step, T - a)
        pos = torch.arange(seq_len - T + a, seq_len - T + a + t, device=q.device)[None, :, None, None]  # [1, t, 1, 1]
        scores = torch.einsum("bthgd,bchd->bthgc", q[:, a:a + t].float().view(B, t, H, HQ // H, D), keys_k) * scale
        visible = torch.arange(Tc, device=q.device) < (pos[..., None] + 1) // block  # complete blocks up to pos
        probs = torch.where(visible, torch.exp(scores - lse[:, a:a + t].view(B, t, H, HQ // H, 1)), 0.0)
        importance = torch.nn.functional.pad(probs.sum(3), (0, num_blocks - Tc))  # eq. 8, 10: [B, t, H, NJ]
        current = pos // block
        first_local = (pos - settings.local + 1).clamp_min(0) // block
        forced = (j < settings.leading_blocks) | ((j >= first_local) & (j <= current))
        importance = torch.where(forced, float("inf"), importance)
        importance = torch.where(j <= current, importance, -1.0)
        keys = (importance.clamp_min(0).view(torch.int32) & ~mask) | (mask - j.to(torch.int32))
        keys = torch.where(importance >= 0, keys, -1)
        top = keys.topk(min(n, num_blocks), dim=-1).values
        top = torch.nn.functional.pad(top, (0, n - top.shape[-1]), value=-1)
        parts.append(torch.where(top >= 0, mask - (top & mask), -1).to(torch.int32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
