"""Native Sparse Attention (arXiv:2502.11089): compressed, selected and sliding-window branches, gated.

The public functions run the Triton kernels on CUDA tensors and the PyTorch reference on CPU tensors
(`nsa_eval.kernels.utils.by_device`).
To run the Triton path elsewhere (interpreter mode, TRITON_INTERPRET=1), call the module's own function:
compression.compressed_attention, selection.select_blocks, selected.selected_attention,
parallel.nsa_attention, parallel.gated_sum, decode.nsa_decode. The reference's docstrings are the spec of both paths.
Packed variable-length batches: `cu_seqlens` on nsa_attention, compressed_attention, select_blocks,
selected_attention and mean_pool, on both paths (layout of the packed compressed K/V: reference's module docstring).
Queries offset into the keys (a prompt slice over a cache): the T queries are the last T of S >= T tokens, query i
at position i + S - T (bottom-right, as full attention); S from k, or `seq_len=` for compressed_attention and
select_blocks. Triton: forward only for T < S (a gradient request raises ValueError).
The hyperparameters (l, d, l', n, w) travel as one `layout: NSALayout` (layout.py: PAPER_LAYOUT, FLA_LAYOUT).
"""

from nsa_eval.kernels.nsa import compression, decode, parallel, reference, selected, selection
from nsa_eval.kernels.nsa.layout import FLA_LAYOUT, PAPER_LAYOUT, NSALayout
from nsa_eval.kernels.nsa.utils import mean_pool, num_compressed_blocks
from nsa_eval.kernels.utils import by_device

compressed_attention = by_device(compression.compressed_attention, reference.compressed_attention)
select_blocks = by_device(selection.select_blocks, reference.select_blocks)
selected_attention = by_device(selected.selected_attention, reference.selected_attention)
nsa_attention = by_device(parallel.nsa_attention, reference.nsa_attention)
nsa_decode = by_device(decode.nsa_decode, reference.nsa_decode)
gated_sum = by_device(parallel.gated_sum, reference.gated_sum)

__all__ = [
    "FLA_LAYOUT",
    "NSALayout",
    "PAPER_LAYOUT",
    "compressed_attention",
    "gated_sum",
    "mean_pool",
    "nsa_attention",
    "nsa_decode",
    "num_compressed_blocks",
    "select_blocks",
    "selected_attention",
]
