"""A transformer's pointwise parts for inference (forward only): residual add + RMSNorm, in-place RoPE, SwiGLU's
silu(gate) * up, and the decode step's KV-cache write (every cache of a layer in one launch).

Each public function runs its Triton kernel (norm.py, rotary.py, swiglu.py, cache_write.py) on CUDA tensors and
the PyTorch reference (reference.py, whose docstrings are the spec) elsewhere. To run the Triton path on the CPU
in interpreter mode (TRITON_INTERPRET=1), call the module's own function: same signature. Inputs that require
grad while grad is enabled are refused (run under torch.no_grad()).
"""

from nsa_eval.kernels.layers import cache_write, norm, reference, rotary, swiglu


def add_rms_norm(x, weight, eps, residual=None):
    """(normed, summed) = RMSNorm(x + residual), x + residual; spec in reference.add_rms_norm. Triton on CUDA
    tensors, the reference elsewhere."""
    impl = norm.add_rms_norm if getattr(x, "is_cuda", False) else reference.add_rms_norm
    return impl(x, weight, eps, residual)


def rotary_(x, cos, sin):
    """Rotate-half RoPE in place on x [B, T, R, D]; spec in reference.rotary_. Triton on CUDA tensors, the
    reference elsewhere."""
    impl = rotary.rotary_ if getattr(x, "is_cuda", False) else reference.rotary_
    return impl(x, cos, sin)


def silu_mul(gate_up):
    """silu(gate) * up from gate_up [..., 2*I]; spec in reference.silu_mul. Triton on CUDA tensors, the reference
    elsewhere."""
    impl = swiglu.silu_mul if getattr(gate_up, "is_cuda", False) else reference.silu_mul
    return impl(gate_up)


def cache_write_(dests, sources, slots):
    """dests[i][b, slots[i][b]] = sources[i][b] in place for 1 to 6 (cache, new token) pairs; spec in
    reference.cache_write_. Triton (one launch, CUDA-graph safe, slot values unchecked) on CUDA tensors, the reference
    elsewhere."""
    on_cuda = isinstance(dests, (list, tuple)) and len(dests) > 0 and getattr(dests[0], "is_cuda", False)
    impl = cache_write.cache_write_ if on_cuda else reference.cache_write_
    impl(dests, sources, slots)


__all__ = ["add_rms_norm", "cache_write_", "rotary_", "silu_mul"]
