"""nsa_eval.kernels: attention kernels (Triton on CUDA tensors, plain PyTorch reference on CPU tensors)."""

from nsa_eval.kernels.attention import attention, attention_decode
from nsa_eval.kernels.nsa import (
    compressed_attention,
    mean_pool,
    nsa_attention,
    nsa_decode,
    select_blocks,
    selected_attention,
)

__all__ = [
    "attention",
    "attention_decode",
    "compressed_attention",
    "mean_pool",
    "nsa_attention",
    "nsa_decode",
    "select_blocks",
    "selected_attention",
]
