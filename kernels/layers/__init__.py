"""A transformer's pointwise parts for inference (forward only): residual add + RMSNorm, in-place RoPE, SwiGLU's
silu(gate) * up.

Each public function runs its Triton kernel (norm.py, rotary.py, swiglu.py) on CUDA tensors and the PyTorch
reference (reference.py, whose docstrings are the spec) elsewhere. To run the Triton path on the CPU in
interpreter mode (TRITON_INTERPRET=1), call the module's own function: same signature. Inputs that require
grad while grad is enabled are refused (run under torch.no_grad()).
"""

from nsa_eval.kernels.layers import norm, reference, rotary, swiglu


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


__all__ = ["add_rms_norm", "rotary_", "silu_mul"]
