"""A transformer's pointwise parts for inference (forward only): residual add + RMSNorm, in-place RoPE, SwiGLU's
silu(gate) * up, and the decode step's KV-cache write (every cache of a layer in one launch).

Each public function runs its Triton kernel (norm.py, rotary.py, swiglu.py, cache_write.py) on CUDA tensors and
the PyTorch reference (reference.py, whose docstrings are the spec) elsewhere (`nsa_eval.kernels.utils.by_device`;
`cache_write_` goes by its first cache). To run the Triton path on the CPU in interpreter mode (TRITON_INTERPRET=1),
call the module's own function: same signature. Inputs that require grad while grad is enabled are refused (run
under torch.no_grad()).
"""

from nsa_eval.kernels.layers import cache_write, norm, reference, rotary, swiglu
from nsa_eval.kernels.utils import by_device

add_rms_norm = by_device(norm.add_rms_norm, reference.add_rms_norm)
rotary_ = by_device(rotary.rotary_, reference.rotary_)
silu_mul = by_device(swiglu.silu_mul, reference.silu_mul)
cache_write_ = by_device(cache_write.cache_write_, reference.cache_write_)

__all__ = ["add_rms_norm", "cache_write_", "rotary_", "silu_mul"]
