"""The generation engine's token sampler: batched, graph-safe and reproducible per request.

`sample_tokens` runs on the logits' device (a CUDA graph with the decode step included): fixed shapes, no host
synchronisation, no Python loop over rows. Its randomness is counter-based, with no generator state: a 32-bit
integer hash of (row seed, row step, token id) gives one uniform per vocabulary entry, and Gumbel-max over the
temperature-scaled, nucleus-filtered logits picks the token. So a row's token depends only on its own logits,
temperature, top_p, seed and step, never on the other rows of the batch or their order, and CPU tensors give the
same tokens as CUDA ones (the hash is exact integer math on both; the float32 tail can differ by an ulp between
devices, which changes a token only at a near tie of two Gumbel scores or of the nucleus boundary).

The hash is done in int64 tensors holding 32-bit values: every product is kept below 2**63 (see `_mul32`), so
there is no signed overflow on any device.
"""

from __future__ import annotations

import operator

import torch

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def row_seed(request_seed: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of a request (an int in [0, 2**62)), a fixed mix of both.

    Both arguments are Python ints (taken modulo 2**64); the result goes in `sample_tokens`' `seeds` [B] int64.
    """
    z = _splitmix64(operator.index(request_seed) & _M64)
    z = _splitmix64(z ^ (operator.index(sample_index) & _M64))
    return z >> 2


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] (any float dtype; math in float32), temperature [B] float32 (<= 0: greedy argmax), top_p [B]
    float32 in (0, 1] (nucleus: the smallest set of most likely tokens whose probability reaches top_p; 1 keeps all),
    seeds [B] int64, steps [B] int64 (tokens this row has generated so far) -> token ids [B] int64.

    All tensors on the logits' device. Greedy rows return exactly `logits.argmax(-1)` (first index on ties). The
    nucleus rule is the CPU sampler's (`hf._pick`): sort the probabilities descending and keep a token when the
    cumulative probability before it is < top_p, so the most likely token is always kept.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    vocab = logits.shape[1]
    greedy_ids = logits.argmax(-1)
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scores = logits.float() / temp[:, None]  # [B, V] temperature-scaled logits (log-probabilities up to a constant)

    # nucleus: which tokens the CPU sampler's rule keeps, scattered back from sorted order to vocabulary order
    probs = torch.softmax(scores, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs < top_p.float()[:, None]) | (top_p >= 1)[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))

    # Gumbel-max with one counter-based uniform per (row, token)
    gumbel = -torch.log(-torch.log(_uniforms(seeds, steps, vocab)))
    sampled_ids = (scores + gumbel).argmax(-1)
    return torch.where(greedy, greedy_ids, sampled_ids)


def _uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds [B] int64, steps [B] int64 -> [B, vocab] float32 uniforms in [2**-24, 1 - 2**-24] (never 0 or 1)."""
    seeds, steps = seeds.long(), steps.long()
    key = _mix32((seeds & _M32) ^ 0x243F6A88)  # the row's 32-bit key from all 64 bits of its seed and step
    key = _mix32(key ^ ((seeds >> 32) & _M32))
    key = _mix32(key ^ (steps & _M32))
    key = _mix32(key ^ ((steps >> 32) & _M32))
    # token ids times an odd constant (a bijection mod 2**32) spread over all 32 bits, so that two rows' keys
    # never make their token ranges overlap as blocks (key ^ id would, for keys sharing their high bits)
    token_ids = _mul32(torch.arange(vocab, device=seeds.device, dtype=torch.int64), 0x9E3779B1)
    bits = _mix32(key[:, None] ^ token_ids[None, :])  # [B, V] in [0, 2**32)
    # 23 bits -> odd integer < 2**24 (exact in float32) -> (2k + 1) / 2**24
    return ((bits >> 9) * 2 + 1).float() * (2.0**-24)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (Wellons' lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a constant c < 2**32, every intermediate below 2**63."""
    if c < 2**31:
        return (x * c) & _M32
    # c = 2**31 + r: x * 2**31 mod 2**32 only needs x's lowest bit
    return (x * (c - 2**31) + ((x & 1) << 31)) & _M32


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)
