"""NSA with packed variable-length batches (cu_seqlens): a packed call equals separate calls per sequence.

The packed inputs are one tensor [1, T, ...] of several sequences; the separate calls see each sequence alone,
[1, len_n, ...], with its compressed K/V pooled from that sequence alone. Lengths cover a sequence shorter than
l (no compressed block), one no multiple of any block size, and a one-token sequence. The Triton kernels
(interpreter mode on the CPU, outputs NaN-poisoned) are compared with the packed reference; errors and bounds
as in test_nsa.py.
"""

from __future__ import annotations

import pytest
import torch

from test_nsa import BOUND, check_grads, leaves, poisoned_allocations, rel_err

from nsa_eval.kernels import nsa
from nsa_eval.kernels.nsa import compression, parallel, reference, selected, selection
from nsa_eval.kernels.nsa.layout import NSALayout
from nsa_eval.kernels.nsa.utils import compressed_offsets, num_compressed_blocks

LENGTHS = [70, 20, 1, 45]  # 70: no multiple of l, d or l'; 20 < l; a one-token sequence
CASES = {
    "paper": NSALayout(block_len=32, block_stride=16, select_len=32, num_selected=3, window=24),
    "fla": NSALayout(block_len=16, block_stride=16, select_len=16, num_selected=3, window=0),
}


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_inputs(lengths, HQ, H, D, dtype, hp):
    """(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win) packed along T, compressed K/V mean-pooled per sequence."""
    T = sum(lengths)
    q, k, v = (torch.randn(1, T, h, D).to(dtype) for h in (HQ, H, H))
    k_cmp = nsa.mean_pool(k, hp.block_len, hp.block_stride, cu_seqlens=cu(lengths)) * 3
    v_cmp = nsa.mean_pool(v, hp.block_len, hp.block_stride, cu_seqlens=cu(lengths))
    gates = [torch.rand(1, T, HQ).to(dtype) for _ in range(3)]
    return [q, k, v, k_cmp, v_cmp, *gates]


def split(x, lengths, hp=None):
    """Per-sequence slices of a packed tensor: by tokens, or by compressed blocks when hp is given."""
    offsets = cu(lengths).tolist()
    if hp is not None:
        offsets = compressed_offsets(offsets, hp.block_len, hp.block_stride)
    return [x[:, a:b] for a, b in zip(offsets, offsets[1:])]


def test_mean_pool_pools_each_sequence_on_its_own():
    x = torch.randn(1, sum(LENGTHS), 2, 4)
    pooled = nsa.mean_pool(x, 32, 16, cu_seqlens=cu(LENGTHS))
    assert pooled.shape == (1, sum(num_compressed_blocks(n, 32, 16) for n in LENGTHS), 2, 4) == (1, 4, 2, 4)
    expected = torch.cat([nsa.mean_pool(s, 32, 16) for s in split(x, LENGTHS)], 1)
    assert torch.equal(pooled, expected)
    assert torch.allclose(pooled[0, 3], x[0, 91:123].mean(0))  # block 0 of the 45-token sequence (starts at 91)


@pytest.mark.parametrize("layout, HQ, H, dtype", [("paper", 4, 1, torch.float32), ("fla", 4, 2, torch.float16)])
def test_packed_nsa_equals_separate_calls(layout, HQ, H, dtype):
    """Forward, returned block indices and every gradient of one packed call equal those of per-sequence calls."""
    torch.manual_seed(0)
    hp = CASES[layout]
    inputs = packed_inputs(LENGTHS, HQ, H, 16, dtype, hp)
    packed_leaves = [x.clone().requires_grad_() for x in inputs]
    separate_leaves = [x.clone().requires_grad_() for x in inputs]
    o, idx = nsa.nsa_attention(*packed_leaves, layout=hp, cu_seqlens=cu(LENGTHS), return_block_indices=True)
    do = torch.randn(o.shape).to(dtype)
    (o.float() * do.float()).sum().backward()
    kinds = [None, None, None, hp, hp, None, None, None]
    per_sequence = [split(x, LENGTHS, kind) for x, kind in zip(separate_leaves, kinds)]
    outputs = [nsa.nsa_attention(*args, layout=hp, return_block_indices=True) for args in zip(*per_sequence)]
    ref = torch.cat([out for out, _ in outputs], 1)
    (ref.float() * do.float()).sum().backward()
    assert torch.equal(idx, torch.cat([i for _, i in outputs], 1))
    assert idx.max() < -(-max(LENGTHS) // hp.select_len)  # indices count from each sequence's start
    assert rel_err(o, ref) < BOUND[dtype]
    names = ["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win"]
    for name, a, b in zip(names, packed_leaves, separate_leaves):
        if name == "g_win" and not hp.window:
            continue
        assert b.grad is not None and b.grad.any(), name
        assert rel_err(a.grad, b.grad) < BOUND[dtype], name


def test_packed_branches_equal_separate_calls():
    torch.manual_seed(1)
    hp = CASES["paper"]
    q, k, v, k_cmp, v_cmp = packed_inputs(LENGTHS, 4, 2, 16, torch.float32, hp)[:5]
    c = cu(LENGTHS)
    o, lse = nsa.compressed_attention(q, k_cmp, v_cmp, layout=hp, cu_seqlens=c)
    idx = nsa.select_blocks(q, k_cmp, lse, layout=hp, cu_seqlens=c)
    o_slc = nsa.selected_attention(q, k, v, idx, layout=hp, cu_seqlens=c)
    for sq, sk, sv, skc, svc, so, slse, sidx, so_slc in zip(
            split(q, LENGTHS), split(k, LENGTHS), split(v, LENGTHS), split(k_cmp, LENGTHS, hp), split(v_cmp, LENGTHS, hp),
            split(o, LENGTHS), split(lse, LENGTHS), split(idx, LENGTHS), split(o_slc, LENGTHS)):
        ro, rlse = nsa.compressed_attention(sq, skc, svc, layout=hp)
        assert torch.equal(so, ro) and torch.equal(slse, rlse)
        assert torch.equal(sidx, nsa.select_blocks(sq, skc, rlse, layout=hp))
        assert torch.equal(so_slc, nsa.selected_attention(sq, sk, sv, sidx, layout=hp))
    assert (lse[0, 70:90] == float("-inf")).all() and (o[0, 70:90] == 0).all()  # 20 < l: no block at all


@pytest.mark.parametrize("layout, HQ, H, dtype", [("paper", 4, 2, torch.float32), ("fla", 16, 1, torch.float16)])
@pytest.mark.slow
def test_triton_packed_nsa_equals_reference(layout, HQ, H, dtype):
    """The whole packed NSA on the Triton kernels: forward, block indices and every gradient."""
    torch.manual_seed(2)
    hp = CASES[layout]
    triton_leaves, ref_leaves = leaves(*packed_inputs(LENGTHS, HQ, H, 16, dtype, hp))
    with poisoned_allocations():
        o, idx = parallel.nsa_attention(*triton_leaves, layout=hp, cu_seqlens=cu(LENGTHS), return_block_indices=True)
        do = torch.randn(o.shape).to(dtype)
        (o.float() * do.float()).sum().backward()
    ro, ridx = reference.nsa_attention(*ref_leaves, layout=hp, cu_seqlens=cu(LENGTHS), return_block_indices=True)
    (ro * do.float()).sum().backward()
    assert torch.equal(idx, ridx)
    assert rel_err(o, ro) < BOUND[dtype]
    check_grads(triton_leaves, ref_leaves, BOUND[dtype], ["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win"])


@pytest.mark.slow
def test_triton_packed_branches_equal_reference():
    """Each branch kernel on its own, with a selected block that holds the end of a sequence."""
    torch.manual_seed(3)
    hp = CASES["paper"]
    c = cu(LENGTHS)
    q, k, v, k_cmp, v_cmp = packed_inputs(LENGTHS, 8, 2, 32, torch.float32, hp)[:5]
    (tq, tkc, tvc), (rq, rkc, rvc) = leaves(q, k_cmp, v_cmp)
    with poisoned_allocations():
        o, lse = compression.compressed_attention(tq, tkc, tvc, layout=hp, cu_seqlens=c)
        do = torch.randn(o.shape)
        (o * do).sum().backward()
    ro, rlse = reference.compressed_attention(rq, rkc, rvc, layout=hp, cu_seqlens=c)
    (ro * do).sum().backward()
    assert rel_err(o, ro) < BOUND[torch.float32] and torch.equal(lse.isinf(), rlse.isinf())
    assert (lse - rlse).nan_to_num(0.0, 0.0, 0.0).abs().max() < 1e-4
    check_grads([tq, tkc, tvc], [rq, rkc, rvc], BOUND[torch.float32], ["q", "k_cmp", "v_cmp"])
    with poisoned_allocations():
        idx = selection.select_blocks(q, k_cmp, rlse, layout=hp, cu_seqlens=c)
    assert torch.equal(idx, reference.select_blocks(q, k_cmp, rlse, layout=hp, cu_seqlens=c))
    (tq, tk, tv), (rq, rk, rv) = leaves(q, k, v)
    with poisoned_allocations():
        o = selected.selected_attention(tq, tk, tv, idx, layout=hp, cu_seqlens=c)
        do = torch.randn(o.shape)
        (o * do).sum().backward()
    ro = reference.selected_attention(rq, rk, rv, idx, layout=hp, cu_seqlens=c)
    (ro * do).sum().backward()
    assert rel_err(o, ro) < BOUND[torch.float32]
    check_grads([tq, tk, tv], [rq, rk, rv], BOUND[torch.float32], ["q", "k", "v"])


BAD_CU_SEQLENS = [
    (torch.tensor([0, 70, 136], dtype=torch.int64), "cu_seqlens must be a 1-D int32"),
    (torch.tensor([1, 70, 136], dtype=torch.int32), "cu_seqlens must rise from 0 to T=136"),
    (torch.tensor([0, 70, 130], dtype=torch.int32), "cu_seqlens must rise from 0 to T=136"),
    (torch.tensor([0, 90, 70, 136], dtype=torch.int32), "cu_seqlens must rise from 0 to T=136"),
]


@pytest.mark.parametrize("bad, message", BAD_CU_SEQLENS, ids=["int64", "start", "end", "decreasing"])
def test_bad_cu_seqlens_raise(bad, message):
    hp = CASES["paper"]
    q, k, v, k_cmp, v_cmp, *gates = packed_inputs(LENGTHS, 4, 2, 16, torch.float32, hp)
    lse = torch.zeros(q.shape[:3])
    idx = torch.zeros(1, q.shape[1], 2, 3, dtype=torch.int32)
    branches = [  # (reference, Triton, arguments)
        (reference.nsa_attention, parallel.nsa_attention, (q, k, v, k_cmp, v_cmp, *gates)),
        (reference.compressed_attention, compression.compressed_attention, (q, k_cmp, v_cmp)),
        (reference.select_blocks, selection.select_blocks, (q, k_cmp, lse)),
        (reference.selected_attention, selected.selected_attention, (q, k, v, idx)),
    ]
    calls = [lambda c: nsa.mean_pool(k, 32, 16, cu_seqlens=c)]
    calls += [lambda c, f=f, a=args: f(*a, cu_seqlens=c) for *impls, args in branches for f in impls]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call(bad)


def test_cu_seqlens_with_batch_or_wrong_block_count_raise():
    hp = CASES["paper"]
    q, k, v, k_cmp, v_cmp, *gates = packed_inputs(LENGTHS, 4, 2, 16, torch.float32, hp)
    c = cu(LENGTHS)
    two = [torch.cat([x, x]) for x in (q, k, v, k_cmp, v_cmp, *gates)]
    # blocks pooled over the whole packed tensor cross from one sequence into the next: 7 blocks, not 4
    crossing = nsa.mean_pool(k, 32, 16)
    for impl in (reference.nsa_attention, parallel.nsa_attention):
        with pytest.raises(ValueError, match="cu_seqlens needs packed inputs with B == 1, got B=2"):
            impl(*two, layout=hp, cu_seqlens=c)
        with pytest.raises(ValueError, match="k_cmp has 7 blocks but the packed sequences make 4"):
            impl(q, k, v, crossing, nsa.mean_pool(v, 32, 16), *gates, layout=hp, cu_seqlens=c)
    for impl in (reference.compressed_attention, compression.compressed_attention):
        with pytest.raises(ValueError, match="k_cmp has 7 blocks"):
            impl(q, crossing, crossing, cu_seqlens=c)
