"""NSA kernels with the queries offset into the keys: the last T of S tokens (a prompt chunk over a cache).

Query row i stands at position i + S - T (bottom-right alignment). The reference with T < S must equal the last T
rows of its own T == S call; the Triton kernels (interpreter mode on the CPU, forward only) must equal the reference.
"""

from __future__ import annotations

import pytest
import torch
from test_nsa import BOUND, nsa_inputs, poisoned_allocations, rel_err

from nsa_eval.kernels.nsa import compression, parallel, reference, selected, selection


def _inputs(layout, dtype, B=2, S=150, HQ=4, H=2, D=32):
    torch.manual_seed(11)
    return nsa_inputs(layout, B, S, HQ, H, D, dtype)


CASES = [("paper", torch.float32, 37), ("fla", torch.float16, 1)]  # a chunk crossing kernel tiles; one decode row


@pytest.mark.parametrize("layout, T", [("paper", 37), ("fla", 1), ("paper", 150)])
def test_reference_chunk_equals_last_rows_of_whole(layout, T):
    hp, q, k, v, k_cmp, v_cmp, gates = _inputs(layout, torch.float32)
    whole, whole_idx = reference.nsa_attention(q, k, v, k_cmp, v_cmp, *gates, layout=hp, return_block_indices=True)
    chunk, idx = reference.nsa_attention(q[:, -T:], k, v, k_cmp, v_cmp, *[g[:, -T:] for g in gates], layout=hp,
                                         return_block_indices=True)
    assert torch.equal(idx, whole_idx[:, -T:])
    torch.testing.assert_close(chunk, whole[:, -T:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout, dtype, T", CASES)
@pytest.mark.slow
def test_triton_chunk_equals_reference(layout, dtype, T):
    hp, q, k, v, k_cmp, v_cmp, gates = _inputs(layout, dtype)
    S = k.shape[1]
    qc, gc = q[:, -T:], [g[:, -T:] for g in gates]
    f32 = (lambda *xs: [x.float() for x in xs])
    ro, ridx = reference.nsa_attention(*f32(qc, k, v, k_cmp, v_cmp, *gc), layout=hp, return_block_indices=True)
    with torch.no_grad(), poisoned_allocations():
        o, idx = parallel.nsa_attention(qc, k, v, k_cmp, v_cmp, *gc, layout=hp, return_block_indices=True)
    assert torch.equal(idx, ridx)
    assert rel_err(o, ro) < BOUND[dtype]

    # the branches one by one, as callers that assemble their own NSA use them
    r_cmp, r_lse = reference.compressed_attention(*f32(qc, k_cmp, v_cmp), layout=hp, seq_len=S)
    with torch.no_grad(), poisoned_allocations():
        o_cmp, lse = compression.compressed_attention(qc, k_cmp, v_cmp, layout=hp, seq_len=S)
        sel = selection.select_blocks(qc, k_cmp, lse, layout=hp, seq_len=S)
        o_slc = selected.selected_attention(qc, k, v, ridx, layout=hp)
    assert rel_err(o_cmp, r_cmp) < BOUND[dtype]
    seen = torch.isfinite(r_lse)
    assert torch.equal(seen, torch.isfinite(lse)) and rel_err(lse[seen], r_lse[seen]) < BOUND[dtype]
    assert torch.equal(sel, ridx)
    r_slc = reference.selected_attention(*f32(qc, k, v), ridx, layout=hp)
    assert rel_err(o_slc, r_slc) < BOUND[dtype]


def test_bad_offsets_name_the_argument():
    hp, q, k, v, k_cmp, v_cmp, gates = _inputs("paper", torch.float32, B=1, S=64)
    for impl in (reference.nsa_attention, parallel.nsa_attention):
        with pytest.raises(ValueError, match="k has S=40 tokens but q has T=64"):
            impl(q, k[:, :40], v[:, :40], k_cmp, v_cmp, *gates, layout=hp)
    for impl in (reference.compressed_attention, compression.compressed_attention):
        with pytest.raises(ValueError, match="seq_len must be an int >= T=64"):
            impl(q, k_cmp, v_cmp, layout=hp, seq_len=50)
        with pytest.raises(ValueError, match="seq_len=80 with cu_seqlens"):
            impl(q, k_cmp, v_cmp, layout=hp, seq_len=80, cu_seqlens=torch.tensor([0, 64], dtype=torch.int32))
    for impl in (reference.select_blocks, selection.select_blocks):
        with pytest.raises(ValueError, match="seq_len must be an int >= T=64"):
            impl(q, k_cmp, torch.zeros(1, 64, 4), layout=hp, seq_len=63)


def test_triton_backward_with_offset_is_refused():
    hp, q, k, v, k_cmp, v_cmp, gates = _inputs("paper", torch.float32, B=1, S=64)
    qc = q[:, -16:].clone().requires_grad_()
    with pytest.raises(ValueError, match="backward with queries offset by 48"):
        parallel.nsa_attention(qc, k, v, k_cmp, v_cmp, *[g[:, -16:] for g in gates], layout=hp)
    with pytest.raises(ValueError, match="backward with queries offset by 48"):
        compression.compressed_attention(qc, k_cmp, v_cmp, layout=hp, seq_len=64)
    with pytest.raises(ValueError, match="backward with queries offset by 48"):
        selected.selected_attention(qc, k, v, torch.zeros(1, 16, 2, 1, dtype=torch.int32), layout=hp)
