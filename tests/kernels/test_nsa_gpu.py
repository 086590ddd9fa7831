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
