"""The whole NSA prefill on the Triton kernels: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (eq. 5).

compressed attention (compression.py) -> block selection from its log-sum-exp (selection.py) -> selected
attention (selected.py) and the sliding-window branch (the full-attention kernel's window,
nsa_eval.kernels.attention); each branch is its own autograd Function, the gated sum is plain PyTorch, so
gradients reach q, k, v, k_cmp, v_cmp and the gates. Spec and shapes: reference.nsa_attention.
"""

from __future__ import annotations

import math

from nsa_eval.kernels.attention import attention
from nsa_eval.kernels.nsa.compression import CompressedAttention
from nsa_eval.kernels.nsa.selected import SelectedAttention
from nsa_eval.kernels.nsa.selection import select_fwd
from nsa_eval.kernels.nsa.utils import check_block_indices, check_nsa


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win=None, *, block_len=32, block_stride=16,
                  select_len=64, num_selected=16, window=512, scale=None, block_indices=None,
                  return_block_indices=False):
    """Triton NSA prefill, forward and backward; spec and shapes: reference.nsa_attention."""
    op = "nsa_attention"
    check_nsa(op, q, k, v, k_cmp, v_cmp, {"g_cmp": g_cmp, "g_slc": g_slc, "g_win": g_win}, block_len, block_stride,
              select_len, num_selected, window, scale, triton=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o_cmp, lse = CompressedAttention.apply(q, k_cmp, v_cmp, block_len, block_stride, scale)
    if block_indices is None:
        block_indices = select_fwd(q.detach().contiguous(), k_cmp.detach().contiguous(), lse, block_len,
                                   block_stride, select_len, num_selected, scale)
    else:
        check_block_indices(op, block_indices, q, k.shape[2])
    o_slc = SelectedAttention.apply(q, k, v, block_indices, select_len, scale)
    o = g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc
    if window:
        o = o + g_win.unsqueeze(-1) * attention(q, k, v, causal=True, window=window, scale=scale)
    o = o.to(q.dtype)
    return (o, block_indices) if return_block_indices else o
