"""NSA Triton kernels on a GPU in bfloat16 (what the interpreter cannot check), against the float32 reference.

Skipped without CUDA. Bounds: bf16 inputs and bf16 probabilities in the P @ V products give errors of a few
1e-3; 2e-2 leaves room for the longest sums. Outputs and gradients are compared on the kernel's own block
selection (bf16 rounding of equal-looking importances may flip near-ties); the selection itself is compared
by the importance of the chosen sets.
"""

import pytest
import torch

from nsa_eval.kernels.nsa import mean_pool, nsa_attention, nsa_decode
from nsa_eval.kernels.nsa import reference
from nsa_eval.kernels.nsa.layout import FLA_LAYOUT, PAPER_LAYOUT
from nsa_eval.kernels.nsa.utils import num_compressed_blocks
from kernel_checks import rel_err

pytestmark = pytest.mark.gpu  # bf16 Triton kernels; skipped where torch sees no CUDA device (tests/conftest.py)

BOUND = 2e-2


def make_inputs(B, T, HQ, H, Dk, Dv, hp, seed=0):
    torch.manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, T, HQ, Dk, device=dev, dtype=bf)
    k = torch.randn(B, T, H, Dk, device=dev, dtype=bf)
    v = torch.randn(B, T, H, Dv, device=dev, dtype=bf)
    k_cmp = (mean_pool(k, hp.block_len, hp.block_stride).float() * 4).to(bf)  # sharper than plain means
    v_cmp = mean_pool(v, hp.block_len, hp.block_stride)
    gates = [torch.rand(B, T, HQ, device=dev, dtype=bf) for _ in range(3)]
    return [q, k, v, k_cmp, v_cmp, *gates[:2], gates[2] if hp.window else None]  # g_win only with a window


@pytest.mark.parametrize(
    "hp, B, T, HQ, H, Dk, Dv",
    [
        (PAPER_LAYOUT, 2, 1500, 32, 2, 128, 128),  # GQA 16, T no multiple of any block
        (PAPER_LAYOUT, 1, 1100, 8, 2, 192, 128),  # the paper's Dk=192, Dv=128, GQA 4
        (FLA_LAYOUT, 1, 1000, 16, 1, 64, 64),  # fla layout, head dim 64
    ],
)
def test_nsa_attention_bf16(hp, B, T, HQ, H, Dk, Dv):
    inputs = [x if x is None else x.requires_grad_() for x in make_inputs(B, T, HQ, H, Dk, Dv, hp)]
    leaves = [x for x in inputs if x is not None]
    o, idx = nsa_attention(*inputs, layout=hp, return_block_indices=True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    inputs32 = [x if x is None else x.detach().float().requires_grad_() for x in inputs]
    o_ref = reference.nsa_attention(*inputs32, layout=hp, block_indices=idx)
    grads_ref = torch.autograd.grad(o_ref, [x for x in inputs32 if x is not None], do.float())
    assert rel_err(o, o_ref) < BOUND
    for name, g, r in zip(["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win"], grads, grads_ref):
        if r.any():
            assert rel_err(g, r) < BOUND, name
    # the selection: the same importance as the reference's choice (exact but for near-ties)
    q, _, _, k_cmp, v_cmp = inputs32[:5]
    _, lse = reference.compressed_attention(q, k_cmp, v_cmp, layout=hp)
    positions = torch.arange(T, device="cuda").expand(B, -1)
    imp = reference.block_importance(q, k_cmp, lse, positions, T, hp, Dk ** -0.5)
    imp = torch.nn.functional.pad(imp, (0, 1), value=-1.0)
    ref_idx = reference.select_blocks(q, k_cmp, lse, layout=hp)

    def chosen(i):
        return imp.gather(-1, i.long().where(i >= 0, imp.shape[-1] - 1)).sort(-1).values

    assert (idx == ref_idx).float().mean() > 0.99
    assert torch.allclose(chosen(idx), chosen(ref_idx), rtol=1e-3, atol=1e-5)  # bf16 scores: near-ties may flip


@pytest.mark.parametrize("hp", [PAPER_LAYOUT, FLA_LAYOUT], ids=["paper", "fla"])
def test_nsa_decode_bf16_equals_prefill_last_row(hp):
    B, S, HQ, H, D = 3, 2500, 32, 2, 128
    lengths = [2500, 1234, 70]
    q, k, v, k_cmp, v_cmp, *gates = make_inputs(B, S, HQ, H, D, D, hp, seed=1)
    rows = torch.arange(B, device="cuda"), torch.tensor(lengths, device="cuda") - 1
    out = nsa_decode(q[rows], k, v, k_cmp, v_cmp, torch.tensor(lengths, dtype=torch.int32, device="cuda"),
                     *[None if g is None else g[rows] for g in gates], layout=hp)
    for b, L in enumerate(lengths):
        n_cmp = num_compressed_blocks(L, hp.block_len, hp.block_stride)
        prefill = reference.nsa_attention(*[x[b:b + 1, :L].float() for x in (q, k, v)],
                                          k_cmp[b:b + 1, :n_cmp].float(), v_cmp[b:b + 1, :n_cmp].float(),
                                          *[None if g is None else g[b:b + 1, :L].float() for g in gates], layout=hp)
        assert rel_err(out[b], prefill[0, -1]) < BOUND, b


# ---- the two-launch decode step (kernels/nsa/fused_decode.py) against the five-launch path and the reference ----


def _reference_step(idx, q, k, v, k_cmp, v_cmp, lengths, gates, hp, k_window=None, v_window=None):
    """The float32 reference decode step (reference.nsa_decode's branches) on the given selection idx [B, 1, H, n]."""
    q1, positions = q.float()[:, None], (lengths.long() - 1)[:, None]
    scale = q.shape[-1] ** -0.5
    o_cmp, _ = reference._compressed(q1, k_cmp.float(), v_cmp.float(), positions, hp, scale)
    o_slc, _ = reference._selected(q1, k.float(), v.float(), idx, positions, hp.select_len, scale)
    branches = [(o_cmp[:, 0], gates[0]), (o_slc[:, 0], gates[1])]
    if hp.window and k_window is None:
        branches.append((reference._window(q1, k.float(), v.float(), positions, hp.window, scale)[0][:, 0], gates[2]))
    elif hp.window:
        filled = torch.arange(hp.window, device=q.device)[None, :] < lengths.long()[:, None]
        o_win = reference._masked_attention(q1, k_window.float(), v_window.float(), filled[:, None, None, :], scale)[0]
        branches.append((o_win[:, 0], gates[2]))
    return reference._gated_sum(branches)


def _chosen_importance(idx, q, k_cmp, lengths, num_keys, hp):
    q1, positions = q.float()[:, None], (lengths.long() - 1)[:, None]
    scale = q.shape[-1] ** -0.5
    _, lse = reference._compressed(q1, k_cmp.float(), k_cmp.float(), positions, hp, scale)
    imp = reference.block_importance(q1, k_cmp.float(), lse, positions, num_keys, hp, scale)
    imp = torch.nn.functional.pad(imp, (0, 1), value=-1.0)
    return imp.gather(-1, idx.long().where(idx >= 0, imp.shape[-1] - 1)).sort(-1).values


LONG = 65536
FUSED_CASES = [  # (layout, lengths, HQ, H, Dk, Dv, a window ring, against the five-launch path too)
    (PAPER_LAYOUT, [LONG], 64, 4, 128, 128, False, True),  # the paper's Figure 6 shape at 64k, batch 1
    # batch 16 at 64k: every cache state (1 token, < l, = l, block boundaries of l' and w, long, full)
    (PAPER_LAYOUT, [LONG, 1, 31, 32, 48, 63, 64, 65, 511, 512, 513, 4096, 30001, LONG - 1, 12345, LONG - 17],
     64, 4, 128, 128, False, True),
    (FLA_LAYOUT, [8192, 5000], 16, 1, 64, 64, False, False),  # fla layout, GQA 16, no window
    (PAPER_LAYOUT, [5000, 700, 100], 16, 2, 192, 128, True, False),  # the paper's Dk=192, Dv=128; the window's ring
    # 64 rows: many more programs than the GPU holds at once, so selected splits wait on ranking parts still to run
    (PAPER_LAYOUT, [4096 - 37 * i for i in range(64)], 32, 4, 128, 128, False, False),
]


@pytest.mark.parametrize("hp, lengths, HQ, H, Dk, Dv, ring, five_too", FUSED_CASES,
                         ids=["64k-b1", "64k-b16", "fla-b2", "dk192-ring", "b64"])
def test_fused_decode_bf16_against_five_launches_and_reference(hp, lengths, HQ, H, Dk, Dv, ring, five_too):
    """Values and selected blocks of fused_decode.nsa_decode against the float32 reference (its output against the
    reference on its own selection, the selection of the same importance as the reference's: bf16 scores may flip
    near-ties) and, at 64k, against decode.nsa_decode (the same checks, and the outputs of rows whose selections
    agree against each other). The other shapes leave the five-launch path to its own tests (compile time)."""
    from nsa_eval.kernels.nsa import decode, fused_decode

    B, S = len(lengths), max(lengths)
    q, k, v, k_cmp, v_cmp, *gates = make_inputs(B, S, 1, H, Dk, Dv, hp, seed=3)
    torch.manual_seed(4)
    q = torch.randn(B, HQ, Dk, device="cuda", dtype=torch.bfloat16)
    gates = [torch.rand(B, HQ, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    gates[2] = gates[2] if hp.window else None
    lengths = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    rings = {}
    if ring:
        w = hp.window
        slot = torch.arange(S, device="cuda") % w
        ring_k = torch.zeros(B, w, H, Dk, device="cuda", dtype=torch.bfloat16)
        ring_v = torch.zeros(B, w, H, Dv, device="cuda", dtype=torch.bfloat16)
        k_win, v_win = torch.randn_like(k), torch.randn_like(v)
        for b, L in enumerate(lengths.tolist()):
            ring_k[b, slot[max(0, L - w):L]] = k_win[b, max(0, L - w):L]
            ring_v[b, slot[max(0, L - w):L]] = v_win[b, max(0, L - w):L]
        rings = {"k_window": ring_k, "v_window": ring_v}
    args = (q, k, v, k_cmp, v_cmp, lengths, *gates)
    fused, idx = fused_decode.nsa_decode(*args, layout=hp, return_block_indices=True, **rings)
    _, ref_idx = reference.nsa_decode(*[x.float() if x is not None and x.is_floating_point() else x for x in args],
                                      layout=hp, return_block_indices=True,
                                      **{name: x.float() for name, x in rings.items()})
    assert idx.shape == (B, 1, H, hp.num_selected) and fused.shape == (B, HQ, Dv) and fused.dtype == torch.bfloat16
    chosen = _chosen_importance(idx, q, k_cmp, lengths, S, hp)
    assert torch.allclose(chosen, _chosen_importance(ref_idx, q, k_cmp, lengths, S, hp), rtol=1e-3, atol=1e-5)
    assert rel_err(fused, _reference_step(idx, *args[:6], gates, hp, **rings)) < BOUND
    if five_too:
        five, five_idx = decode.nsa_decode(*args, layout=hp, return_block_indices=True, **rings)
        assert torch.allclose(chosen, _chosen_importance(five_idx, q, k_cmp, lengths, S, hp), rtol=1e-3, atol=1e-5)
        assert rel_err(five, _reference_step(five_idx, *args[:6], gates, hp, **rings)) < BOUND
        same = (idx.sort(-1).values == five_idx.sort(-1).values).flatten(1).all(1)  # rows b of one selection
        assert same.float().mean() >= 0.5, same  # the same scores and keys: near-ties aside, every row
        assert rel_err(fused[same], five[same]) < BOUND
    one_token = lengths == 1
    assert (idx[one_token, 0, :, 0] == 0).all() and (idx[one_token, 0, :, 1:] == -1).all()


def test_fused_decode_replays_from_a_cuda_graph():
    """The two launches captured in a CUDA graph (as the engine's decode step) replay bitwise like eager calls, step
    after step with new queries and lengths (the counters are zeroed by launch 1 each time: nothing carries over)."""
    from nsa_eval.kernels.nsa import fused_decode

    hp = PAPER_LAYOUT
    B, S, HQ, H, D = 16, LONG, 64, 4, 128  # the 64k-b16 case's shapes: kernels compiled once
    _, k, v, k_cmp, v_cmp, *_ = make_inputs(B, S, 1, H, D, D, hp, seed=5)
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
    gates = [torch.rand(B, HQ, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    lengths = torch.randint(1, S + 1, (B,), dtype=torch.int32, device="cuda")

    def step():
        return fused_decode.nsa_decode(q, k, v, k_cmp, v_cmp, lengths, *gates, layout=hp, return_block_indices=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, idx = step()
    generator = torch.Generator(device="cuda").manual_seed(6)
    for trial in range(20):
        q.copy_(torch.randn(q.shape, generator=generator, device="cuda"))
        lengths.copy_(torch.randint(1, S + 1, (B,), generator=generator, device="cuda", dtype=torch.int32))
        graph.replay()
        eager_out, eager_idx = step()
        assert torch.equal(idx, eager_idx) and torch.equal(out, eager_out), trial
