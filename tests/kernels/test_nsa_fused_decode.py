"""The two-launch NSA decode step (kernels/nsa/fused_decode.py) against the five-launch path (decode.py) and the
PyTorch reference, in the interpreter (float32 / float16: tl.dot on bfloat16 is wrong there; bfloat16 and the
programs running concurrently are tests/kernels/test_nsa_gpu.py's).

Every case checks the output values and the selected blocks (return_block_indices): the same blocks as the
five-launch path exactly (the same scores, log-sum-exp and ranking keys), and blocks of the same importance as the
reference's (exact but for near-ties between float32 sums). Allocations are poisoned (test_nsa.py), so a counter
launch 1 forgets to zero, or an output element no program writes, fails.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from test_nsa import BOUND, NSA_CASES, poisoned_allocations, randn, rel_err, window_ring

from nsa_eval.kernels.nsa import decode, fused_decode, reference
from nsa_eval.kernels.nsa.layout import NSALayout
from nsa_eval.kernels.nsa.utils import default_scale, mean_pool


def decode_inputs(hp: NSALayout, B, S, HQ, H, D, dtype, seed):
    """q [B, HQ, D], caches k, v [B, S, H, D] and their compressed blocks (mean pooling, keys sharpened x3 so that
    the selection has clear winners), gates [B, HQ] uniform in [0, 1)."""
    torch.manual_seed(seed)
    k, v = randn(B, S, H, D, dtype=dtype), randn(B, S, H, D, dtype=dtype)
    k_cmp = mean_pool(k, hp.block_len, hp.block_stride) * 3
    v_cmp = mean_pool(v, hp.block_len, hp.block_stride)
    q = randn(B, HQ, D, dtype=dtype)
    gates = [torch.rand(B, HQ).to(dtype) for _ in range(3)]
    return q, k, v, k_cmp, v_cmp, gates


def chosen_importance(idx, q, k_cmp, lengths, num_keys, hp, leading_blocks=1, local_tokens=None):
    """The reference's importance (eq. 8-10, forced blocks +inf) of the blocks idx [B, 1, H, n] holds, sorted: equal
    for two selections that differ only where importances tie."""
    q1, positions = q.float()[:, None], (lengths.long() - 1)[:, None]
    scale = default_scale(q, None)
    _, lse = reference._compressed(q1, k_cmp.float(), k_cmp.float(), positions, hp, scale)
    importance = reference.block_importance(q1, k_cmp.float(), lse, positions, num_keys, hp, scale, leading_blocks,
                                            local_tokens)
    importance = torch.nn.functional.pad(importance, (0, 1), value=-1.0)  # the column of empty slots
    return importance.gather(-1, idx.long().where(idx >= 0, importance.shape[-1] - 1)).sort(-1).values


def check_step(args, hp, dtype, **kwargs):
    """fused_decode.nsa_decode(*args) against decode.nsa_decode and reference.nsa_decode (float32 upcasts): values
    and selected blocks. Returns the fused (out, block_indices)."""
    q, k, v, k_cmp, v_cmp, lengths, *gates = args
    with poisoned_allocations():
        out, idx = fused_decode.nsa_decode(*args, layout=hp, return_block_indices=True, **kwargs)
        five, five_idx = decode.nsa_decode(*args, layout=hp, return_block_indices=True, **kwargs)
    up = [x if x is None or not x.is_floating_point() else x.float() for x in args]
    up_kwargs = {name: x.float() if isinstance(x, torch.Tensor) else x for name, x in kwargs.items()}
    ref, ref_idx = reference.nsa_decode(*up, layout=hp, return_block_indices=True, **up_kwargs)
    B, H = q.shape[0], k.shape[2]
    assert out.dtype == q.dtype and out.shape == five.shape
    assert idx.dtype == torch.int32 and idx.shape == ref_idx.shape == (B, 1, H, hp.num_selected)
    assert torch.equal(idx, five_idx), (idx, five_idx)
    rules = {name: kwargs[name] for name in ("leading_blocks", "local_tokens") if name in kwargs}
    assert torch.allclose(chosen_importance(idx, q, k_cmp, lengths, k.shape[1], hp, **rules),
                          chosen_importance(ref_idx, q, k_cmp, lengths, k.shape[1], hp, **rules), rtol=1e-5, atol=1e-6)
    assert rel_err(out, ref) < BOUND[dtype]
    assert rel_err(out, five) < BOUND[dtype]
    return out, idx


# every cache state a decode step meets: 1 token, shorter than one compressed block (l - 1), exactly one block (l),
# a compressed-block boundary (l + d), a selection-block boundary (3 l') and one past it, mid-block, the full cache
PAPER_LENGTHS = [1, 31, 32, 48, 96, 97, 197, 300]
FLA_LENGTHS = [1, 15, 16, 32, 33, 150, 257, 300]


@pytest.mark.parametrize(
    "layout, lengths, HQ, H, D, dtype",
    [
        ("paper", PAPER_LENGTHS, 8, 2, 32, torch.float32),  # GQA 4, window 48 over the raw keys
        ("fla", FLA_LENGTHS, 16, 1, 32, torch.float16),  # GQA 16, no window, l = d = l'
        ("paper", [300, 64, 1, 129], 4, 4, 16, torch.float16),  # GQA 1
    ],
    ids=["paper-gqa4", "fla-gqa16", "paper-gqa1"],
)
def test_fused_decode_equals_five_launches_and_reference(layout, lengths, HQ, H, D, dtype):
    """A batch of caches of different lengths in one step: every cache state at once, rows of other lengths
    around each (the kernels must read only each row's own tokens)."""
    hp = NSA_CASES[layout]
    q, k, v, k_cmp, v_cmp, gates = decode_inputs(hp, len(lengths), 300, HQ, H, D, dtype, seed=21)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    _, idx = check_step((q, k, v, k_cmp, v_cmp, lengths, *gates[:2], gates[2] if hp.window else None), hp, dtype)
    for b in (lengths == 1).nonzero().flatten().tolist():  # 1 token: block 0 alone
        assert idx[b, 0].tolist() == [[0] + [-1] * (hp.num_selected - 1)] * H


def test_many_ranking_parts_with_several_chunks_each(monkeypatch):
    """Small blocks over 600 tokens: 75 selection blocks in 5 chunks of NP = n, ranked in 3 parts of 2 chunks (TILES
    forces it), so the lists of a non-power-of-2 count of parts merge into a top n that uses every slot. In the
    second layout (l = 16 > d = 8) compressed blocks span two selection blocks: one planted at the end of chunk 0
    (inside part 0) and one at the end of chunk 1 (the last of part 0) must lift both blocks they touch, the second
    of which is ranked by the next chunk, or part."""
    monkeypatch.setitem(fused_decode.TILES, "programs", 1)
    monkeypatch.setitem(fused_decode.TILES, "chunks_per_part", 2)
    for hp in (NSALayout(8, 8, 8, num_selected=16, window=0), NSALayout(16, 8, 16, num_selected=8, window=24)):
        shape = fused_decode.launch_shape(2, 1, 600, hp)
        assert shape["np"] == hp.num_selected and shape["chunks_per_part"] == 2 and shape["parts"] == 3
        q, k, v, k_cmp, v_cmp, gates = decode_inputs(hp, 2, 600, 4, 1, 16, torch.float32, seed=22)
        lengths = torch.tensor([600, 455], dtype=torch.int32)
        planted = hp.block_len > hp.block_stride
        if planted:  # compressed blocks 15 and 31 = tokens [120, 136) and [248, 264): selection blocks 7, 8; 15, 16
            for i in (15, 31):
                k_cmp[0, i, 0] = q[0].sum(0)
        _, idx = check_step((q, k, v, k_cmp, v_cmp, lengths, *gates[:2], gates[2] if hp.window else None), hp,
                            torch.float32)
        if planted:
            assert {7, 8, 15, 16} <= set(idx[0, 0, 0].tolist())


@triton.jit
def _top_keys_kernel(keys, scratch, out, N: tl.constexpr, NP: tl.constexpr):
    top = fused_decode.top_keys(tl.load(keys + tl.arange(0, N)), scratch, NP)
    tl.store(out + tl.arange(0, NP)[None, :], top)


@pytest.mark.parametrize("valid", [64, 16, 5, 0])
def test_top_keys_is_a_descending_top_n(valid):
    """top_keys (the merge of the ranking parts' lists) against torch.sort: unique keys over the whole int32 range,
    0, a run of consecutive keys across the n-th place (forced blocks: +inf's pattern 0x7F800000 | (mask - j)), -1
    for empty slots, fewer valid keys than slots."""
    torch.manual_seed(valid)
    keys = torch.cat([torch.tensor([0]), 0x7F800000 + torch.arange(21), torch.randperm(1 << 20)[:42] * 2047])
    keys = keys.to(torch.int32)[torch.randperm(64)]
    keys[valid:] = -1
    keys = keys[torch.randperm(64)]
    scratch, out = torch.full((16,), 7, dtype=torch.int32), torch.empty(16, dtype=torch.int32)
    _top_keys_kernel[(1,)](keys, scratch, out, 64, 16)
    assert out.tolist() == torch.sort(keys, descending=True).values[:16].tolist()


def test_window_ring_strided_views_and_the_sparse_rule(monkeypatch):
    """The paper's own window K/V as a ring, q a column slice of a wider projection output and the gates views of one
    [B, HQ, 3] tensor (as the model passes them), keys in tiles of 16 (a selection block of 32 in two); then the
    training-free sparse rule's arguments (leading blocks, local tokens, no window, the compressed gate 0)."""
    monkeypatch.setitem(fused_decode.TILES, "keys", 16)
    hp = replace(NSA_CASES["paper"], window=40)
    B, S, HQ, H, D, w = 3, 200, 8, 2, 32, hp.window
    _, k, v, k_cmp, v_cmp, _ = decode_inputs(hp, B, S, HQ, H, D, torch.float32, seed=23)
    lengths = torch.tensor([200, 90, 23], dtype=torch.int32)  # full ring, full ring, ring filled to 23
    k_win, v_win = randn(B, S, H, D, dtype=torch.float32), randn(B, S, H, D, dtype=torch.float32)
    ring_k, ring_v = window_ring(k_win, v_win, lengths, w)
    projection = randn(B, HQ * D + 24, dtype=torch.float32)
    q = projection[:, :HQ * D].view(B, HQ, D)
    g_cmp, g_slc, g_win = torch.rand(B, HQ, 3).unbind(-1)
    check_step((q, k, v, k_cmp, v_cmp, lengths, g_cmp, g_slc, g_win), hp, torch.float32, k_window=ring_k,
               v_window=ring_v)

    sparse = NSALayout(16, 16, 16, num_selected=4, window=0)
    k_cmp16 = mean_pool(k, 16, 16) * 3
    zeros, ones = torch.zeros(B, HQ), torch.ones(B, HQ)
    _, idx = check_step((q, k, v, k_cmp16, mean_pool(v, 16, 16), lengths, zeros, ones, None), sparse, torch.float32,
                        leading_blocks=2, local_tokens=20)
    # the sparse rule's forced blocks: the first 2 and those holding the last 20 tokens (199: blocks 11 and 12)
    assert set(idx[0, 0, 0].tolist()) >= {0, 1, 11, 12}


def test_bad_input_is_refused_as_by_the_five_launch_path():
    q, k, k_cmp = torch.randn(1, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 1, 2, 16)
    gates = [torch.rand(1, 4)] * 3
    for impl in (fused_decode.nsa_decode, decode.nsa_decode):
        with pytest.raises(ValueError, match="cache_seqlens"):
            impl(q, k, k, k_cmp, k_cmp, torch.tensor([40]), *gates)
        with pytest.raises(ValueError, match="layout must be an NSALayout"):
            impl(q, k, k, k_cmp, k_cmp, torch.tensor([40], dtype=torch.int32), *gates, layout={"block_len": 32})
