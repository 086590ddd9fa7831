"""Full attention: causal / sliding window, GQA, variable length; forward, backward and a decode step.

`attention` and `attention_decode` run the Triton kernels (parallel.py, decode.py) on CUDA tensors and
the PyTorch reference (reference.py) on other devices (`nsa_eval.kernels.utils.by_device`). To run the Triton path
on the CPU in interpreter mode (TRITON_INTERPRET=1), call `nsa_eval.kernels.attention.parallel.attention` or
`nsa_eval.kernels.attention.decode.attention_decode` directly: same signatures.
"""

from nsa_eval.kernels.attention import decode, parallel, reference
from nsa_eval.kernels.utils import by_device

attention = by_device(parallel.attention, reference.attention)
attention_decode = by_device(decode.attention_decode, reference.attention_decode)

__all__ = ["attention", "attention_decode"]
