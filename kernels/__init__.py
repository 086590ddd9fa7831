"""nsa_eval.kernels: attention kernels (Triton on CUDA tensors, plain PyTorch reference on CPU tensors)."""

from nsa_eval.kernels.attention import attention, attention_decode

__all__ = ["attention", "attention_decode"]
