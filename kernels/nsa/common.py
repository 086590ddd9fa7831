"""What the NSA kernels, their tests, the benchmarks and scripts share: the two layouts of the hyperparameters.

- PAPER_LAYOUT: the NSA paper's (arXiv:2502.11089, section 4.1): compressed blocks of l = 32 with stride d = 16,
  selection blocks of l' = 64, n = 16 selected, a window of w = 512; the public functions' defaults.
- FLA_LAYOUT: flash-linear-attention's NSA (l = d = l' = 64, 16 blocks, no window; it mean-pools K/V itself).

Keyword arguments of nsa_attention, nsa_decode and friends: `nsa_attention(..., **PAPER_LAYOUT)`.
"""

PAPER_LAYOUT = dict(block_len=32, block_stride=16, select_len=64, num_selected=16, window=512)
FLA_LAYOUT = dict(block_len=64, block_stride=64, select_len=64, num_selected=16, window=0)
