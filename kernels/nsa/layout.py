"""The NSA hyperparameters as one value: `NSALayout`, checked once when it is made, and the two layouts in use.

- PAPER_LAYOUT = NSALayout(): the NSA paper's (arXiv:2502.11089, section 4.1): compressed blocks of l = 32 tokens
  with stride d = 16, selection blocks of l' = 64 tokens, n = 16 selected, a window of w = 512 tokens; the public
  functions' default.
- FLA_LAYOUT: flash-linear-attention's NSA (l = d = l' = 64, 16 blocks, no window; it mean-pools K/V itself).

Every public NSA function (nsa_attention, nsa_decode, compressed_attention, select_blocks, selected_attention; the
Triton kernels and their reference twins alike) takes `layout=`; the runtime's ModelConfig gives its own
(`ModelConfig.layout`). Changed copies: `dataclasses.replace(PAPER_LAYOUT, window=0)`, checked again.
"""

from __future__ import annotations

from dataclasses import dataclass

from nsa_eval.kernels.utils import fail


def check_positive_int(op: str, name: str, value, minimum: int = 1) -> None:
    """value is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(op, f"{name} must be an int >= {minimum}, got {value!r}")


def check_blocks(op: str, block_len, block_stride) -> None:
    """Compressed blocks of block_len tokens every block_stride tokens: positive ints, the stride divides the length
    (NSALayout's first rule; mean_pool's, which takes the two alone)."""
    check_positive_int(op, "block_len", block_len)
    check_positive_int(op, "block_stride", block_stride)
    if block_len % block_stride:
        fail(op, f"block_stride={block_stride} must divide block_len={block_len} (e.g. l=32, d=16)")


@dataclass(frozen=True)
class NSALayout:
    """The five hyperparameters of Native Sparse Attention (section 3 of the paper), all in tokens but n.

    Fields:
        block_len: l, tokens per compressed block; block i covers tokens [i*d, i*d + l) and is visible to the
            query at position t once t >= i*d + l - 1.
        block_stride: d, tokens between the starts of consecutive compressed blocks; divides l.
        select_len: l', tokens per selection block (block j = tokens [j*l', (j+1)*l')); a multiple of d, >= l.
        num_selected: n, selection blocks each query attends (a count of blocks, not tokens): the first block and
            the two local blocks included.
        window: w, tokens of the sliding-window branch (the query's last w positions, itself included); 0: no window
            branch.

    Made once and passed whole; a bad value raises ValueError("NSALayout: ...") here, so the kernels never see one.
    """

    block_len: int = 32
    block_stride: int = 16
    select_len: int = 64
    num_selected: int = 16
    window: int = 512

    def __post_init__(self) -> None:
        op = "NSALayout"
        check_blocks(op, self.block_len, self.block_stride)
        check_positive_int(op, "select_len", self.select_len)
        if self.select_len % self.block_stride:
            fail(op, f"select_len={self.select_len} must be a multiple of block_stride={self.block_stride} "
                     "(e.g. 64 and 16)")
        if self.select_len < self.block_len:
            fail(op, f"select_len={self.select_len} must be >= block_len={self.block_len}: a compressed block may "
                     "span at most two selection blocks")
        check_positive_int(op, "num_selected", self.num_selected)
        check_positive_int(op, "window", self.window, minimum=0)


def check_layout(op: str, layout) -> None:
    """The public NSA functions' `layout` argument is an NSALayout (whose values were checked when it was made)."""
    if not isinstance(layout, NSALayout):
        fail(op, f"layout must be an NSALayout (nsa_eval.kernels.nsa.layout; e.g. PAPER_LAYOUT), got "
                 f"{type(layout).__name__}")


PAPER_LAYOUT = NSALayout()
FLA_LAYOUT = NSALayout(block_len=64, block_stride=64, select_len=64, num_selected=16, window=0)
