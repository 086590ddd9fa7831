"""Selection fidelity: does a model's block selection (NSA, or training-free sparse attention) pick the blocks that
dense attention over the same queries and keys would weigh? (`nsa-eval inspect`, nsa_eval/fidelity.py.)

Definitions, per layer, KV head h and query position t (tokens 0..t visible, causal):
- dense attention: softmax(q_t k_s^T * scale) over s <= t, with the layer's own q and k (after RoPE; scale
  1/sqrt(head_dim), the model's) for each query head of h, the G = HQ / H heads' probabilities summed per key (as
  NSA's eq. 10 sums the group's importance): dense mass m(s), which sums to G over s <= t. For NSA this is what full
  attention over the same projections would weigh (the selection branch's keys, where K/V are not shared); for
  training-free sparse attention it is the checkpoint's own full attention.
- block mass M(j) = sum of m(s) over block j's tokens [j*l', (j+1)*l') (those <= t), l' the selection block
  (NSA's select_len; sparse: its block).
- the model's selection: the block indices its selection code returns for that query (NSA: the kernel table's
  `select_blocks`, Triton on CUDA, the PyTorch reference on the CPU; sparse: `runtime/sparse.py: sparse_attention_over_blocks`'s `observe`),
  taken from the model's own prefill through `Attention.observe`; the always-kept blocks (NSA's block 0 and two local
  blocks; sparse's leading and local tokens, as whole blocks) are among them, as they are in the n the model attends.
- n = min(the model's selected count, blocks visible at t = t // l' + 1): NSA's num_selected, sparse's budget //
  block. Dense top-n: the n visible blocks of highest M.
- recall = |selected ∩ dense top-n| / n, where a selected block counts when its M is at least the n-th largest M
  (a selected block tied with the n-th counts: no tie rule decides the number). 1.0 whenever the selection holds
  every visible block (the budget covers the context).
- mass share = the dense mass on the tokens the model attends, over the total (G): the selected blocks' tokens
  s <= t, plus NSA's window branch (t - w < s <= t). NSA's compressed branch sees every complete block only as one
  pooled key and is not counted. 1.0 when the selection covers the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nsa_eval.model_adapters.runtime.config import ModelConfig


@dataclass(frozen=True)
class Selection:
    """What a query attends token by token under an attention kind: blocks of `block` tokens, `num_selected` of
    them (the always-kept ones included), and NSA's window of the last `window` tokens (0: none)."""

    kind: str
    block: int
    num_selected: int
    window: int = 0

    @classmethod
    def of(cls, config: ModelConfig) -> "Selection":
        """The selection of a runtime model's config; ValueError for full attention, which selects nothing."""
        if config.attention == "nsa":
            return cls("nsa", config.select_len, config.num_selected, config.window)
        if config.attention == "sparse":
            return cls("sparse", config.sparse.block, config.sparse.num_blocks, 0)
        raise ValueError(f"attention {config.attention!r} has no block selection to inspect; give an NSA checkpoint or "
                         "--attention sparse")


def selection_fidelity(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor,
                       selection: Selection, scale: float | None = None,
                       max_scores: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall of dense attention's top-n blocks by the selection, and the dense mass share of what the model attends
    (module docstring), for P queries of one sequence.

    q [P, HQ, D]: the queries at `positions` [P] (long, each < S); k [S, H, D]: the keys of tokens 0..S-1; indices
    [P, H, n] int: the selected blocks of each query and KV head, -1 for unused slots. Returns (recall, mass share),
    float32 [P, H] each. Float32 math, in slices of queries that keep the score matrix under `max_scores` elements."""
    P, HQ, D = q.shape
    S, H = k.shape[0], k.shape[1]
    if HQ % H or indices.shape[:2] != (P, H) or positions.shape != (P,):
        raise ValueError(f"selection_fidelity: q {tuple(q.shape)}, k {tuple(k.shape)}, indices "
                         f"{tuple(indices.shape)} and positions {tuple(positions.shape)} do not fit together")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    step = max(1, max_scores // (HQ * max(S, 1)))
    parts = [_fidelity(q[a:a + step], k, indices[a:a + step], positions[a:a + step], selection, scale)
             for a in range(0, P, step)]
    return torch.cat([r for r, _ in parts]), torch.cat([m for _, m in parts])


def dense_mass(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention mass per KV head (module docstring): q [P, HQ, D] at positions [P], k [S, H, D] -> float32
    [P, H, S], each query head's softmax over s <= t summed over the KV head's G query heads (0 for s > t)."""
    P, HQ, D = q.shape
    S, H = k.shape[0], k.shape[1]
    future = torch.arange(S, device=q.device)[None, None, None, :] > positions.to(q.device)[:, None, None, None]
    scores = torch.einsum("phgd,shd->phgs", q.float().reshape(P, H, HQ // H, D), k.float()) * scale
    return torch.softmax(scores.masked_fill(future, float("-inf")), -1).sum(2)


def _fidelity(q, k, indices, positions, selection: Selection, scale: float):
    P, HQ = q.shape[:2]
    S, H = k.shape[0], k.shape[1]
    G, block = HQ // H, selection.block
    positions = positions.to(q.device).long()
    s = torch.arange(S, device=q.device)
    mass = dense_mass(q, k, positions, scale)  # [P, H, S]: sums to G (eq. 10)
    num_blocks = -(-S // block)
    block_mass = torch.nn.functional.pad(mass, (0, num_blocks * block - S)).view(P, H, num_blocks, block).sum(-1)
    j = torch.arange(num_blocks, device=q.device)
    visible = (j[None, :] <= (positions // block)[:, None])[:, None, :]  # [P, 1, NJ]
    slots = torch.where(indices >= 0, indices.long(), num_blocks)  # unused slots -> a dummy column
    chosen = torch.zeros(P, H, num_blocks + 1, dtype=torch.bool, device=q.device)
    chosen = chosen.scatter_(-1, slots.to(q.device), True)[..., :num_blocks] & visible
    n = torch.clamp(positions // block + 1, max=selection.num_selected)  # [P]
    ranked = block_mass.masked_fill(~visible, -1.0).sort(-1, descending=True).values
    nth = ranked.gather(-1, (n - 1)[:, None, None].expand(P, H, 1))  # the n-th largest visible block mass
    hits = (chosen & (block_mass >= nth)).sum(-1).clamp(max=n[:, None])
    recall = hits.float() / n[:, None].float()
    attended = chosen[..., s // block] & (s[None, None, :] <= positions[:, None, None])  # [P, H, S]
    if selection.window:
        attended = attended | ((s[None, :] > positions[:, None] - selection.window)
                               & (s[None, :] <= positions[:, None]))[:, None, :]
    share = (mass * attended).sum(-1) / G
    return recall, share


@torch.no_grad()
def inspect_prompt(model, ids: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt ids [T] (long) through the runtime model's own prefill (its slices, its kernels: Triton on CUDA, the
    reference on the CPU), recording at every layer the selection fidelity of the queries at `positions` (each in
    [0, T)) -> (recall, mass share), float32 [layers, P, H] on the CPU, positions in the order given.

    model: a runtime Transformer with attention 'nsa' or 'sparse'. Each layer's q, its selection keys and the block
    indices its selection chose come from `Attention.observe` during the prefill: nothing of the model is
    re-implemented here but the dense softmax it is compared with."""
    selection = Selection.of(model.config)
    T = int(ids.shape[0])
    if not positions or min(positions) < 0 or max(positions) >= T:
        raise ValueError(f"query positions must lie in [0, {T}), got {positions}")
    wanted = torch.tensor(positions, dtype=torch.long)
    layers = [layer.attn for layer in model.layers]
    shape = (len(layers), len(positions), model.config.num_key_value_heads)
    recall, share = torch.full(shape, math.nan), torch.full(shape, math.nan)

    def observer(layer: int):
        def observe(q, k, indices):  # one prefill slice: q [1, Tq, HQ, D] at S - Tq..S-1, k [1, S, H, D]
            S, Tq = k.shape[1], q.shape[1]
            inside = (wanted >= S - Tq) & (wanted < S)
            if not bool(inside.any()):
                return
            at = wanted[inside].to(q.device)
            rows = at - (S - Tq)
            r, m = selection_fidelity(q[0, rows], k[0], indices[0, rows], at, selection)
            recall[layer, inside], share[layer, inside] = r.cpu(), m.cpu()
        return observe

    try:
        for number, attention in enumerate(layers):
            attention.observe = observer(number)
        cache = model.new_cache(1, T + 1)
        model.prefill(ids.to(model.device), cache, 0)
    finally:
        for attention in layers:
            attention.observe = None
    if bool(recall.isnan().any()):
        raise AssertionError("a layer's prefill did not report every query position")
    return recall, share


def query_positions(length: int, count: int) -> list[int]:
    """`count` query positions spread evenly over a prompt of `length` tokens, the last token's (length - 1) among
    them: floor((i + 1) * length / count) - 1 for i < count, each once (every position when count >= length)."""
    if count >= length:
        return list(range(length))
    return sorted({(i + 1) * length // count - 1 for i in range(count)})
