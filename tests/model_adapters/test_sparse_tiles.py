"""Tile-shared selection of the training-free sparse attention (model_adapters/runtime/sparse.py, `--sparse-selection
tile`): the blocks a tile keeps against the rule written out query by query, the attention over them against dense
masked attention, and what a run records."""

import math

import pytest
import torch

from nsa_eval.kernels.nsa import reference
from nsa_eval.kernels.nsa.layout import NSALayout
from nsa_eval.kernels.nsa.utils import mean_pool
from nsa_eval.model_adapters.runtime.config import SparseSettings
from nsa_eval.model_adapters.runtime.sparse import (sparse_attention_over_blocks, sparse_select_tiles,
                                                    tile_attention)

B, HQ, H, D, BLOCK = 2, 4, 2, 16, 8


def inputs(S: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g)
    k, v = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    k_mean = mean_pool(k, BLOCK)
    _, lse = reference.compressed_attention(q, k_mean, k_mean, layout=NSALayout(BLOCK, BLOCK, BLOCK), seq_len=S,
                                            scale=D ** -0.5)
    return q, k, v, k_mean, lse


def oracle_tiles(q, k_mean, lse, S: int, settings: SparseSettings) -> list[list[list[set[int]]]]:
    """The kept blocks of each (row, tile, KV head), written out: each query's probability over the complete blocks
    (exp(score - lse)), summed over the tile's queries and the head's query heads; the leading blocks and the blocks
    from (tile's first query - local + 1) // block to the tile's own block forced; then the most important."""
    T = q.shape[1]
    first_pos = S - T
    tiles = {}
    for t in range(T):
        pos = first_pos + t
        tiles.setdefault(pos // BLOCK, []).append(t)
    out = []
    for b in range(B):
        rows = []
        for tile, queries in sorted(tiles.items()):
            heads = []
            for h in range(H):
                importance = torch.zeros(math.ceil(S / BLOCK))
                for t in queries:
                    pos = first_pos + t
                    complete = (pos + 1) // BLOCK
                    for g in range(HQ // H):
                        head = h * (HQ // H) + g
                        scores = (k_mean[b, :complete, h] @ q[b, t, head]) * D ** -0.5
                        importance[:complete] += torch.exp(scores - lse[b, t, head])
                first = first_pos + queries[0]
                forced = set(range(settings.leading_blocks)) | set(
                    range(max(0, first - settings.local + 1) // BLOCK, tile + 1))
                others = [j for j in sorted(range(tile + 1), key=lambda j: -importance[j].item()) if j not in forced]
                heads.append(forced | set(others[:settings.num_blocks - len(forced)]))
            rows.append(heads)
        out.append(rows)
    return out


@pytest.mark.parametrize("S,T", [(150, 150), (150, 37), (163, 61)])
def test_a_tile_keeps_the_blocks_of_its_queries_summed_importance(S, T):
    settings = SparseSettings(budget=64, leading=8, local=20, block=BLOCK, selection="tile")  # 8 of up to 21 blocks
    q, _, _, k_mean, lse = inputs(S, T)
    got = sparse_select_tiles(q, k_mean, lse, S, settings, D ** -0.5, max_scores=300)  # sliced over queries
    want = oracle_tiles(q, k_mean, lse, S, settings)
    assert [[[{j for j in head if j >= 0} for head in tile] for tile in row] for row in got.tolist()] == want


def dense_masked(q, k, v, tiles, S: int) -> torch.Tensor:
    """Each query over the tokens of its tile's blocks up to its own position, by an explicit [T, S] mask."""
    T = q.shape[1]
    out = torch.zeros(B, T, HQ, v.shape[-1])
    t0 = (S - T) // BLOCK
    for b in range(B):
        for t in range(T):
            pos = S - T + t
            for head in range(HQ):
                h = head // (HQ // H)
                blocks = {j for j in tiles[b, pos // BLOCK - t0, h].tolist() if j >= 0}
                keep = torch.tensor([s // BLOCK in blocks and s <= pos for s in range(S)])
                scores = (k[b, :, h] @ q[b, t, head]) * D ** -0.5
                out[b, t, head] = torch.softmax(scores.masked_fill(~keep, float("-inf")), 0) @ v[b, :, h]
    return out


@pytest.mark.parametrize("S,T", [(150, 150), (163, 61), (163, 1 + 8)])
def test_tile_attention_equals_dense_masked_attention(S, T):
    settings = SparseSettings(budget=64, leading=8, local=20, block=BLOCK, selection="tile")
    q, k, v, k_mean, lse = inputs(S, T, seed=1)
    tiles = sparse_select_tiles(q, k_mean, lse, S, settings, D ** -0.5)
    got = tile_attention(q, k, v, tiles, BLOCK, D ** -0.5, max_scores=5000)  # a few tiles at a time
    want = dense_masked(q, k, v, tiles, S)
    assert (got - want).norm() / want.norm() < 1e-5


def test_with_a_budget_over_the_context_tile_selection_is_full_attention():
    S = T = 150
    settings = SparseSettings(budget=160, leading=8, local=20, block=BLOCK, selection="tile")
    q, k, v, k_mean, _ = inputs(S, T, seed=2)
    got = sparse_attention_over_blocks(q, k, v, k_mean, settings)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(HQ // H, 2).transpose(1, 2), v.repeat_interleave(HQ // H, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert (got - want).norm() / want.norm() < 1e-5


def test_a_prompt_prefilled_in_slices_of_whole_tiles_attends_as_in_one_pass():
    S = 160
    settings = SparseSettings(budget=64, leading=8, local=20, block=BLOCK, selection="tile")
    q, k, v, k_mean, _ = inputs(S, S, seed=3)
    whole = sparse_attention_over_blocks(q, k, v, k_mean, settings)
    sliced = [sparse_attention_over_blocks(q[:, a:a + 48], k[:, :a + 48], v[:, :a + 48], k_mean[:, :(a + 48) // BLOCK],
                                           settings) for a in range(0, S, 48)]
    assert torch.allclose(torch.cat(sliced, 1), whole, atol=1e-6)


def test_tiles_differ_from_per_query_selection_but_decoding_does_not():
    """Tiles change what a prompt's queries see; a decode step (one query) ranks for itself either way."""
    S = 150
    tile = SparseSettings(budget=64, leading=8, local=20, block=BLOCK, selection="tile")
    query = SparseSettings(budget=64, leading=8, local=20, block=BLOCK)
    q, k, v, k_mean, _ = inputs(S, S, seed=4)
    assert not torch.allclose(sparse_attention_over_blocks(q, k, v, k_mean, tile),
                              sparse_attention_over_blocks(q, k, v, k_mean, query))
    step = q[:, -1:]
    assert torch.equal(sparse_attention_over_blocks(step, k, v, k_mean, tile),
                       sparse_attention_over_blocks(step, k, v, k_mean, query))


def test_runs_record_the_selection_only_when_it_is_not_the_default():
    """Runs made before --sparse-selection existed keep their config hash (and resume)."""
    assert "selection" not in SparseSettings(budget=1536).record()
    assert SparseSettings(budget=1536, selection="tile").record()["selection"] == "tile"
    with pytest.raises(ValueError, match="--sparse-selection 'tiles'"):
        SparseSettings(selection="tiles")
