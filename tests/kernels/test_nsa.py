"""NSA Triton kernels (interpreter mode on the CPU) against the PyTorch reference (nsa_eval.kernels.nsa).

Every Triton call runs with its output allocations poisoned (NaN, or a sentinel for integers), so an element
a kernel forgets to write fails the comparison. Error = ||out - ref|| / ||ref|| against the float32 reference
on the same (upcast) inputs; bounds: 1e-5 for float32 inputs, 3e-3 for float16 (the kernels round
probabilities to the input dtype before the P @ V product, as flash attention does).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from nsa_eval.kernels.nsa import compression, decode, parallel, reference, selected, selection
from nsa_eval.kernels.nsa.layout import NSALayout
from nsa_eval.kernels.nsa.utils import mean_pool, num_compressed_blocks
from kernel_checks import rel_err

BOUND = {torch.float32: 1e-5, torch.float16: 3e-3}


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like return NaN (floats) or -12345 (ints) instead of whatever memory held."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(x):
        return x.fill_(float("nan") if x.is_floating_point() else -12345)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
        mp.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
        yield


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def leaves(*tensors):
    """(copies in the test dtype, float32 copies) that require grad."""
    return ([t.clone().requires_grad_() for t in tensors], [t.detach().float().requires_grad_() for t in tensors])


def check_grads(triton_leaves, ref_leaves, bound, names):
    for name, a, b in zip(names, triton_leaves, ref_leaves):
        if b.grad is None or not b.grad.any():
            assert a.grad is None or not a.grad.any(), name
            continue
        assert rel_err(a.grad, b.grad) < bound, f"d{name}: {rel_err(a.grad, b.grad):.2e}"


# -------------------------------------------------------------------------------------------- eq. 9
def test_eq9_mapping_worked_example():
    """l=32, d=16, l'=64: selection block j gets 1*p[4j-1] + 2*p[4j] + 2*p[4j+1] + 2*p[4j+2] + 1*p[4j+3]."""
    w = reference.compressed_to_selection_weights(12, 3, NSALayout(32, 16, 64))
    assert w[:, 0].tolist() == [2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert w[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0]
    assert w[:, 2].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 1]
    assert torch.equal(reference.compressed_to_selection_weights(5, 5, NSALayout(64, 64, 64)), torch.eye(5))


def test_selection_follows_eq9_mapping():
    """Importance computed by hand from p_cmp with the documented weights picks the kernel's block."""
    torch.manual_seed(0)
    T, l, d, ls = 256, 32, 16, 64
    layout = NSALayout(l, d, ls, num_selected=4)
    q = randn(1, T, 2, 16, dtype=torch.float32)
    k_cmp = randn(1, num_compressed_blocks(T, l, d), 1, 16, dtype=torch.float32)
    k_cmp[0, 5] = q[0, -1, 0] * 4  # a compressed block the last query attends to strongly: tokens [80, 112)
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, layout=layout)
    p = torch.softmax(torch.einsum("hd,ihd->hi", q[0, -1], k_cmp[0].expand(-1, 2, -1)) / 4, -1).sum(0)  # [Tc]
    by_hand = [2 * p[0] + 2 * p[1] + 2 * p[2] + p[3], p[3] + 2 * (p[4] + p[5] + p[6]) + p[7]]
    assert by_hand[1] > by_hand[0]
    with poisoned_allocations():
        idx = selection.select_blocks(q, k_cmp, lse, layout=layout)
    # the last query (block 3) must take 0, 2, 3 (forced) and then block 1, which holds compressed block 5
    assert idx[0, -1, 0].tolist() == [0, 2, 3, 1]
    assert idx[0, -1, 0].tolist() == reference.select_blocks(q, k_cmp, lse, layout=layout)[0, -1, 0].tolist()


def test_mean_pool():
    x = torch.arange(2 * 70 * 1 * 3, dtype=torch.float32).reshape(2, 70, 1, 3)
    pooled = mean_pool(x, 32, 16)
    assert pooled.shape == (2, num_compressed_blocks(70, 32, 16), 1, 3) == (2, 3, 1, 3)
    assert torch.allclose(pooled[1, 2], x[1, 32:64].mean(0))
    assert mean_pool(x[:, :20], 32, 16).shape == (2, 0, 1, 3)
    assert torch.allclose(mean_pool(x, 16)[0, 3], x[0, 48:64].mean(0))


# ------------------------------------------------------------------------------------ compressed
@pytest.mark.parametrize(
    "B, T, HQ, H, Dk, Dv, l, d, dtype",
    [
        (2, 77, 4, 1, 32, 32, 32, 16, torch.float32),  # GQA 4, T no multiple of any block
        pytest.param(1, 150, 16, 1, 64, 64, 32, 16, torch.float16, marks=pytest.mark.slow),  # GQA 16, head dim 64
        (2, 100, 2, 2, 16, 16, 16, 16, torch.float16),  # GQA 1, fla layout (l = d)
        (1, 20, 4, 2, 32, 32, 32, 16, torch.float32),  # T < l: no complete block, zero output
        (1, 90, 2, 1, 192, 128, 32, 16, torch.float16),  # the paper's Dk=192, Dv=128
        (1, 70, 2, 1, 128, 128, 32, 8, torch.float16),  # head dim 128, d = l/4
    ],
)
def test_compressed_attention(B, T, HQ, H, Dk, Dv, l, d, dtype):
    torch.manual_seed(1)
    q = randn(B, T, HQ, Dk, dtype=dtype)
    k_cmp = randn(B, num_compressed_blocks(T, l, d), H, Dk, dtype=dtype)
    v_cmp = randn(B, num_compressed_blocks(T, l, d), H, Dv, dtype=dtype)
    (tq, tk, tv), (rq, rk, rv) = leaves(q, k_cmp, v_cmp)
    with poisoned_allocations():
        o, lse = compression.compressed_attention(tq, tk, tv, layout=NSALayout(l, d))
        do = randn(*o.shape, dtype=dtype)
        (o.float() * do.float()).sum().backward()
    ro, rlse = reference.compressed_attention(rq, rk, rv, layout=NSALayout(l, d))
    (ro * do.float()).sum().backward()
    empty = torch.arange(T) < l - 1
    assert (o[:, empty] == 0).all() and (lse[:, empty] == float("-inf")).all()
    if T >= l:
        assert rel_err(o, ro) < BOUND[dtype]
        assert (lse[:, ~empty] - rlse[:, ~empty]).abs().max() < 1e-4
    check_grads([tq, tk, tv], [rq, rk, rv], BOUND[dtype], ["q", "k_cmp", "v_cmp"])


# ------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    "B, T, HQ, H, D, l, d, ls, n, dtype",
    [
        (2, 300, 8, 2, 32, 32, 16, 64, 3, torch.float32),  # paper's l, d, l'; GQA 4
        (1, 500, 4, 4, 16, 32, 16, 32, 5, torch.float16),  # GQA 1, T no multiple of l'
        (1, 400, 16, 1, 64, 32, 32, 32, 5, torch.float16),  # GQA 16
        (1, 512, 2, 1, 32, 16, 16, 16, 16, torch.float32),  # fla layout, n = 16 over 32 blocks
        (1, 20, 4, 1, 16, 32, 16, 64, 16, torch.float32),  # T < l: block 0 only
    ],
)
@pytest.mark.slow
def test_select_blocks(B, T, HQ, H, D, l, d, ls, n, dtype):
    torch.manual_seed(2)
    q = randn(B, T, HQ, D, dtype=dtype)
    k_cmp = randn(B, num_compressed_blocks(T, l, d), H, D, dtype=dtype, scale=3.0)
    layout = NSALayout(l, d, ls, n)
    _, lse = reference.compressed_attention(q.float(), k_cmp.float(), k_cmp.float(), layout=layout)
    with poisoned_allocations():
        idx = selection.select_blocks(q, k_cmp, lse, layout=layout)
    ref = reference.select_blocks(q.float(), k_cmp.float(), lse, layout=layout)
    assert idx.dtype == torch.int32 and idx.shape == (B, T, H, n)
    assert (idx == ref).float().mean() > 0.99  # exact but for near-ties between float32 sums
    positions = torch.arange(T).expand(B, -1)
    importance = reference.block_importance(q.float(), k_cmp.float(), lse, positions, T, layout, q.shape[-1] ** -0.5)
    importance = torch.nn.functional.pad(importance, (0, 1), value=-1.0)  # column -1 for empty slots

    def chosen(i):
        return importance.gather(-1, i.long().where(i >= 0, importance.shape[-1] - 1)).sort(-1).values

    assert torch.allclose(chosen(idx), chosen(ref), rtol=1e-5, atol=1e-6)  # the same importance where ties differ


# ------------------------------------------------------------------------------------- selected
def random_block_indices(B, T, H, n, select_len):
    """Distinct blocks <= t // select_len per query, in random order, -1 for slots beyond the blocks that exist."""
    num_blocks = -(-T // select_len)
    score = torch.rand(B, T, H, num_blocks)
    future = torch.arange(num_blocks) > (torch.arange(T) // select_len)[:, None]  # [T, NJ]
    score = score.masked_fill(future[None, :, None, :], -1.0)
    top = score.topk(min(n, num_blocks), -1)
    idx = torch.where(top.values >= 0, top.indices, -1)
    return torch.nn.functional.pad(idx, (0, n - idx.shape[-1]), value=-1).to(torch.int32)


@pytest.mark.parametrize(
    "B, T, HQ, H, Dk, Dv, ls, n, dtype",
    [
        (2, 100, 4, 1, 32, 32, 16, 4, torch.float32),  # GQA 4, batch 2
        (1, 90, 2, 2, 64, 64, 32, 2, torch.float16),  # GQA 1, head dim 64
        (1, 70, 16, 1, 128, 128, 16, 3, torch.float16),  # GQA 16, head dim 128
        (1, 50, 2, 1, 192, 128, 64, 16, torch.float16),  # Dk=192, Dv=128; fewer blocks than slots
    ],
)
@pytest.mark.slow
def test_selected_attention(B, T, HQ, H, Dk, Dv, ls, n, dtype):
    torch.manual_seed(3)
    q, k, v = randn(B, T, HQ, Dk, dtype=dtype), randn(B, T, H, Dk, dtype=dtype), randn(B, T, H, Dv, dtype=dtype)
    idx = random_block_indices(B, T, H, n, ls)
    (tq, tk, tv), (rq, rk, rv) = leaves(q, k, v)
    with poisoned_allocations():
        o = selected.selected_attention(tq, tk, tv, idx, layout=NSALayout(ls, ls, ls, n))
        do = randn(*o.shape, dtype=dtype)
        (o.float() * do.float()).sum().backward()
    ro = reference.selected_attention(rq, rk, rv, idx, layout=NSALayout(ls, ls, ls, n))
    (ro * do.float()).sum().backward()
    assert rel_err(o, ro) < BOUND[dtype]
    check_grads([tq, tk, tv], [rq, rk, rv], BOUND[dtype], ["q", "k", "v"])


# ------------------------------------------------------------------------------------------ whole
NSA_CASES = {
    # l, d, l', n, w, phi: the paper's layout scaled down (overlapping blocks, window) and fla's (l = d = l')
    "paper": NSALayout(block_len=32, block_stride=16, select_len=32, num_selected=4, window=48),
    "fla": NSALayout(block_len=16, block_stride=16, select_len=16, num_selected=3, window=0),
}


def nsa_inputs(layout, B, T, HQ, H, D, dtype):
    """(hp, q, k, v, k_cmp, v_cmp, [g_cmp, g_slc, g_win]) for NSA's forward at `layout` (NSA_CASES), from torch's
    global generator: compressed K/V by mean pooling (K sharpened x3), gates uniform in [0, 1)."""
    hp = NSA_CASES[layout]
    q, k, v = randn(B, T, HQ, D, dtype=dtype), randn(B, T, H, D, dtype=dtype), randn(B, T, H, D, dtype=dtype)
    k_cmp = mean_pool(k, hp.block_len, hp.block_stride) * 3  # sharper compressed attention
    v_cmp = mean_pool(v, hp.block_len, hp.block_stride)
    gates = [torch.rand(B, T, HQ).to(dtype) for _ in range(3)]
    return hp, q, k, v, k_cmp, v_cmp, gates


@pytest.mark.parametrize(
    "layout, B, T, HQ, H, D, dtype",
    [
        ("paper", 2, 130, 4, 1, 32, torch.float32),  # GQA 4, batch 2
        ("fla", 1, 100, 16, 1, 64, torch.float16),  # GQA 16, mean pooling, no window
        ("paper", 1, 24, 2, 2, 16, torch.float16),  # GQA 1, T < l
    ],
)
@pytest.mark.slow
def test_nsa_attention(layout, B, T, HQ, H, D, dtype):
    torch.manual_seed(4)
    hp, q, k, v, k_cmp, v_cmp, gates = nsa_inputs(layout, B, T, HQ, H, D, dtype)
    names = ["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win"]
    tl_, rl_ = leaves(q, k, v, k_cmp, v_cmp, *gates)
    with poisoned_allocations():
        o, idx = parallel.nsa_attention(*tl_, layout=hp, return_block_indices=True)
        do = randn(*o.shape, dtype=dtype)
        (o.float() * do.float()).sum().backward()
    ro, ridx = reference.nsa_attention(*rl_, layout=hp, return_block_indices=True)
    (ro * do.float()).sum().backward()
    assert torch.equal(idx, ridx)
    assert rel_err(o, ro) < BOUND[dtype]
    check_grads(tl_, rl_, BOUND[dtype], names)


@pytest.mark.parametrize("layout, dtype", [("paper", torch.float32), ("fla", torch.float16)])
def test_decode_equals_last_prefill_row(layout, dtype):
    """A batch of two caches of different lengths: each step equals the last row of that sequence's prefill.
    300 tokens make more selection blocks than one chunk of the kernel holds: the ranking runs in parts."""
    torch.manual_seed(5)
    hp = NSA_CASES[layout]
    B, S, HQ, H, D = 2, 300, 8, 2, 32
    lengths = [300, 197]
    k, v = randn(B, S, H, D, dtype=dtype), randn(B, S, H, D, dtype=dtype)
    k_cmp = mean_pool(k, hp.block_len, hp.block_stride) * 3
    v_cmp = mean_pool(v, hp.block_len, hp.block_stride)
    q = randn(B, S, HQ, D, dtype=dtype)
    gates = [torch.rand(B, S, HQ).to(dtype) for _ in range(3)]
    rows = torch.arange(B), torch.tensor(lengths) - 1
    with poisoned_allocations():
        out = decode.nsa_decode(q[rows], k, v, k_cmp, v_cmp, torch.tensor(lengths, dtype=torch.int32),
                                *[g[rows] for g in gates], layout=hp)
    for b, L in enumerate(lengths):
        n_cmp = num_compressed_blocks(L, hp.block_len, hp.block_stride)
        prefill = reference.nsa_attention(*[x[b:b + 1, :L].float() for x in (q, k, v)], k_cmp[b:b + 1, :n_cmp].float(),
                                          v_cmp[b:b + 1, :n_cmp].float(), *[g[b:b + 1, :L].float() for g in gates], layout=hp)
        assert rel_err(out[b], prefill[0, -1]) < BOUND[dtype]


def window_ring(k_win, v_win, lengths, w):
    """The window cache as a ring of w slots: position p of sequence b at slot p % w, for its last w positions (k_win,
    v_win [B, S, H, D], lengths [B]) -> ring_k, ring_v [B, w, H, D] (slots never written: zeros)."""
    B, _, H, D = k_win.shape
    ring_k, ring_v = torch.zeros(B, w, H, D, dtype=k_win.dtype), torch.zeros(B, w, H, D, dtype=v_win.dtype)
    for b, L in enumerate(lengths.tolist()):
        for p in range(max(0, L - w), L):
            ring_k[b, p % w], ring_v[b, p % w] = k_win[b, p], v_win[b, p]
    return ring_k, ring_v


def test_decode_with_a_window_ring_and_strided_views():
    """The paper's independent window K/V as a ring (token p in slot p % w): the step equals compressed + selected
    from the cache plus the window branch over the window keys' last w tokens; q a column slice of a wider
    projection output and the gates views of one [B, HQ, 3] tensor, as the model passes them."""
    torch.manual_seed(6)
    hp = replace(NSA_CASES["paper"], window=40)
    B, S, HQ, H, D, w = 3, 200, 8, 2, 32, hp.window
    lengths = torch.tensor([200, 90, 23], dtype=torch.int32)  # full ring, full ring, ring filled to 23
    k, v, k_win, v_win = (randn(B, S, H, D, dtype=torch.float32) for _ in range(4))
    k_cmp = mean_pool(k, hp.block_len, hp.block_stride) * 3
    v_cmp = mean_pool(v, hp.block_len, hp.block_stride)
    ring_k, ring_v = window_ring(k_win, v_win, lengths, w)
    projection = randn(B, HQ * D + 24, dtype=torch.float32)
    q = projection[:, :HQ * D].view(B, HQ, D)
    g_cmp, g_slc, g_win = torch.rand(B, HQ, 3).unbind(-1)
    with poisoned_allocations():
        out = decode.nsa_decode(q, k, v, k_cmp, v_cmp, lengths, g_cmp, g_slc, g_win, layout=hp, k_window=ring_k,
                                v_window=ring_v)
    ref = reference.nsa_decode(q, k, v, k_cmp, v_cmp, lengths, g_cmp, g_slc, g_win, layout=hp, k_window=ring_k,
                               v_window=ring_v)
    from nsa_eval.kernels.attention import reference as full_reference

    expected = reference.nsa_decode(q, k, v, k_cmp, v_cmp, lengths, g_cmp, g_slc, None,
                                    layout=replace(hp, window=0)) + g_win[..., None] * \
        full_reference.attention_decode(q, k_win, v_win, lengths, window=w)
    assert rel_err(ref, expected) < 1e-6
    assert rel_err(out, ref) < BOUND[torch.float32]
    for impl in (decode.nsa_decode, reference.nsa_decode):
        with pytest.raises(ValueError, match="k_window and v_window together"):
            impl(q, k, v, k_cmp, v_cmp, lengths, g_cmp, g_slc, g_win, layout=hp, k_window=ring_k)
        with pytest.raises(ValueError, match="window ring must be"):
            impl(q, k, v, k_cmp, v_cmp, lengths, g_cmp, g_slc, g_win, layout=hp, k_window=ring_k[:, :8],
                 v_window=ring_v[:, :8])


def test_gated_sum_equals_the_reference():
    o = [randn(2, 5, 4, 24, dtype=torch.float16) for _ in range(3)]
    g = torch.rand(2, 5, 4, 3).to(torch.float16).unbind(-1)  # strided views, as the model's gates
    for n in (2, 3):
        pairs = [x for pair in zip(o[:n], g[:n]) for x in pair]
        with poisoned_allocations():
            out = parallel.gated_sum(*pairs)
        assert out.dtype == torch.float16 and rel_err(out, reference.gated_sum(*pairs)) < BOUND[torch.float16]


# -------------------------------------------------------------------------------------- bad input
def _inputs(**change):
    B, T, HQ, H, D = 1, 40, 4, 2, 16
    args = dict(q=torch.randn(B, T, HQ, D), k=torch.randn(B, T, H, D), v=torch.randn(B, T, H, D),
                k_cmp=torch.randn(B, 1, H, D), v_cmp=torch.randn(B, 1, H, D), g_cmp=torch.rand(B, T, HQ),
                g_slc=torch.rand(B, T, HQ), g_win=torch.rand(B, T, HQ))
    args.update(change)
    return args


BAD = [  # (changed inputs, changed hyperparameters, what the message must say)
    (dict(q=torch.randn(40, 4, 16)), {}, "q must be 4-D"),
    (dict(k=torch.randn(1, 40, 2, 16, dtype=torch.float16)), {}, "k has dtype"),
    (dict(q=torch.randn(1, 40, 3, 16), g_cmp=torch.rand(1, 40, 3), g_slc=torch.rand(1, 40, 3),
          g_win=torch.rand(1, 40, 3)), {}, "HQ=3 heads, not a multiple"),
    ({}, dict(block_len=32, block_stride=12), "block_stride=12 must divide block_len"),
    ({}, dict(select_len=40), "select_len=40 must be a multiple of block_stride"),
    ({}, dict(select_len=16), "select_len=16 must be >= block_len"),
    ({}, dict(num_selected=0), "num_selected must be"),
    ({}, dict(window=-1), "window must be an int >= 0"),
    (dict(k_cmp=torch.randn(1, 0, 2, 16), v_cmp=torch.randn(1, 0, 2, 16)), {}, "k_cmp has 0 blocks"),
    (dict(g_slc=torch.rand(1, 40, 2)), {}, "g_slc must be a tensor of shape"),
    (dict(g_win=None), {}, "g_win is required"),
]


@pytest.mark.parametrize("impl", [parallel.nsa_attention, reference.nsa_attention], ids=["triton", "reference"])
@pytest.mark.parametrize("change, hp, message", BAD, ids=[b[2].split()[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(impl, change, hp, message):
    args = _inputs(**change)
    with pytest.raises(ValueError, match=message):
        impl(*args.values(), layout=NSALayout(**{"num_selected": 2, "window": 16, **hp}))


def test_hyperparameters_come_as_one_layout():
    """Every public NSA function, Triton and reference, refuses a layout that is no NSALayout (the old keyword dict)."""
    a = _inputs()
    q, k, v, k_cmp, v_cmp = a["q"], a["k"], a["v"], a["k_cmp"], a["v_cmp"]
    gates = [a["g_cmp"], a["g_slc"], a["g_win"]]
    lengths = torch.tensor([40], dtype=torch.int32)
    calls = [
        (parallel.nsa_attention, reference.nsa_attention, (q, k, v, k_cmp, v_cmp, *gates)),
        (decode.nsa_decode, reference.nsa_decode, (q[:, -1], k, v, k_cmp, v_cmp, lengths, *[g[:, -1] for g in gates])),
        (compression.compressed_attention, reference.compressed_attention, (q, k_cmp, v_cmp)),
        (selection.select_blocks, reference.select_blocks, (q, k_cmp, torch.zeros(1, 40, 4))),
        (selected.selected_attention, reference.selected_attention,
         (q, k, v, torch.zeros(1, 40, 2, 2, dtype=torch.int32))),
    ]
    for triton_path, reference_path, args in calls:
        for fn in (triton_path, reference_path):
            with pytest.raises(ValueError, match="layout must be an NSALayout"):
                fn(*args, layout=dict(block_len=32, block_stride=16))


def test_bad_branch_inputs_name_the_argument():
    q, k_cmp = torch.randn(1, 40, 4, 16), torch.randn(1, 1, 2, 16)
    lse = torch.zeros(1, 40, 4)
    for impl in (selection.select_blocks, reference.select_blocks):
        with pytest.raises(ValueError, match="lse"):
            impl(q, k_cmp, lse.double())
    for impl in (selected.selected_attention, reference.selected_attention):
        with pytest.raises(ValueError, match="block_indices"):
            impl(q, torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), torch.zeros(1, 40, 2, 4, dtype=torch.int64))
    for impl in (decode.nsa_decode, reference.nsa_decode):
        with pytest.raises(ValueError, match="cache_seqlens"):
            impl(q[:, 0], torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), k_cmp, k_cmp, torch.tensor([40]),
                 *[torch.rand(1, 4)] * 3)
