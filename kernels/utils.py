"""What every op of nsa_eval.kernels shares (as flash-linear-attention's `fla/ops/utils`).

`by_device` is the one way a public function picks its path: the Triton kernel on CUDA tensors, the PyTorch
reference (whose docstring is the spec of both) on every other device. Each op's `__init__.py` builds its public
functions with it; to run the Triton path on the CPU in interpreter mode (TRITON_INTERPRET=1), call the op module's
own function, which has the same signature.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


def on_cuda(x: Any) -> bool:
    """Whether a public function's first argument puts it on the Triton path: a CUDA tensor, or a non-empty list or
    tuple whose first tensor is one (`cache_write_`'s list of caches)."""
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and getattr(x[0], "is_cuda", False)
    return getattr(x, "is_cuda", False)


def by_device(triton_fn: Callable, reference_fn: Callable) -> Callable:
    """The public function: `triton_fn` when its first argument is on CUDA (`on_cuda`), `reference_fn` otherwise;
    the reference's name, signature and docstring."""
    first = next(iter(inspect.signature(reference_fn).parameters))

    @functools.wraps(reference_fn)
    def run(*args, **kwargs):
        x = args[0] if args else kwargs.get(first)
        return (triton_fn if on_cuda(x) else reference_fn)(*args, **kwargs)

    return run
