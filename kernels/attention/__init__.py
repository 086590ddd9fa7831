"""Full attention: causal / sliding window, GQA, variable length; forward, backward and a decode step.

`attention` and `attention_decode` run the Triton kernels (parallel.py, decode.py) on CUDA tensors and
the PyTorch reference (reference.py) on other devices. To run the Triton path on the CPU in interpreter
mode (TRITON_INTERPRET=1), call `nsa_eval.kernels.attention.parallel.attention` or
`nsa_eval.kernels.attention.decode.attention_decode` directly: same signatures.
"""

from nsa_eval.kernels.attention import decode, parallel, reference


def attention(q, k, v, *, causal=True, window=None, cu_seqlens=None, scale=None, return_lse=False):
    """Full attention; spec in nsa_eval.kernels.attention.parallel.attention. Triton on CUDA tensors,
    the reference elsewhere."""
    impl = parallel.attention if getattr(q, "is_cuda", False) else reference.attention
    return impl(q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens, scale=scale, return_lse=return_lse)


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, return_lse=False):
    """One decode step; spec in nsa_eval.kernels.attention.decode.attention_decode. Triton on CUDA
    tensors, the reference elsewhere."""
    impl = decode.attention_decode if getattr(q, "is_cuda", False) else reference.attention_decode
    return impl(q, k_cache, v_cache, cache_seqlens, window=window, scale=scale, return_lse=return_lse)


__all__ = ["attention", "attention_decode"]
