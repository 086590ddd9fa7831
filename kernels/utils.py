"""What every op of nsa_eval.kernels shares (as flash-linear-attention's `fla/ops/utils`).

- Dispatch: `by_device` is the one way a public function picks its path: the Triton kernel on CUDA tensors, the
  PyTorch reference (whose docstring is the spec of both) on every other device. Each op's `__init__.py` builds its
  public functions with it; to run the Triton path on the CPU in interpreter mode (TRITON_INTERPRET=1), call the op
  module's own function, which has the same signature.
- Argument checks at the public boundary, for the reference and the Triton paths alike: every failure is a
  ValueError `"<op>: <message>"` whose message names the argument and says what would fix it (`fail`,
  `check_tensor`, `check_same` with `dtypes_for`, `check_scale`, `check_head_dims`, `check_cu_seqlens`,
  `check_cache_lengths`). An op's own checks stay in its folder and build on these.
- The Triton launchers' host side: `check_triton_device`, `interpreting`, `new_output` (every buffer a kernel
  writes; the tests swap in NaN-filled ones), `block_table` (the programs over packed sequences), `LOG2E`,
  `dot_precision` (every tl.dot's input_precision: exact float32 for float32 inputs, not TF32).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import torch
import triton

LOG2E = 1.4426950408889634  # scores run in base 2 (exp2): scale * LOG2E folds the change of base into one factor

REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------


def dtypes_for(triton: bool) -> tuple[torch.dtype, ...]:
    """The input dtypes a path takes: the Triton kernels' three, or the reference's (float64 too)."""
    return TRITON_DTYPES if triton else REFERENCE_DTYPES


def fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def check_tensor(op: str, name: str, x, ndim: int, layout: str) -> None:
    """x is a torch.Tensor with `ndim` dims (`layout` names them in the message)."""
    if not isinstance(x, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        fail(op, f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def check_same(op: str, tensors: dict[str, torch.Tensor], dtypes: tuple[torch.dtype, ...]) -> None:
    """The first tensor has one of `dtypes`; the others have its dtype and device."""
    (first_name, first), *rest = tensors.items()
    if first.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(op, f"{first_name} has dtype {first.dtype}; use one of {names}")
    for name, x in rest:
        if x.dtype != first.dtype:
            fail(op, f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}; cast them to one dtype")
        if x.device != first.device:
            fail(op, f"{name} is on {x.device} but {first_name} is on {first.device}; move them to one device")


def check_scale(op: str, scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        fail(op, f"scale must be None or a positive number, got {scale!r}")


def check_head_dims(op: str, dk: int, dv: int) -> None:
    if dk > TRITON_MAX_HEAD_DIM or dv > TRITON_MAX_HEAD_DIM:
        fail(op, f"head dims Dk={dk}, Dv={dv}: the Triton kernels take at most {TRITON_MAX_HEAD_DIM}")


def check_cu_seqlens(op: str, cu_seqlens, q, S: int) -> list[int]:
    """cu_seqlens int32 [N+1] on q's device, rising from 0 to T without decreasing, with B == 1 and S == T keys.
    Returns the offsets as a host list."""
    B, T = q.shape[:2]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
        fail(op, "cu_seqlens must be a 1-D int32 tensor [N+1] of sequence offsets")
    if cu_seqlens.device != q.device:
        fail(op, f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if B != 1:
        fail(op, f"cu_seqlens needs packed inputs with B == 1, got B={B}")
    if S != T:
        fail(op, f"cu_seqlens needs q and k packed the same way (T == S), got T={T}, S={S}")
    if cu_seqlens.numel() < 2:
        fail(op, "cu_seqlens needs at least 2 entries [0, ..., T]")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
        fail(op, f"cu_seqlens must rise from 0 to T={T} without decreasing, got {offsets[:4]}...{offsets[-1:]}")
    return offsets


def check_cache_lengths(op: str, cache_seqlens: torch.Tensor, k_cache: torch.Tensor) -> None:
    """A decode step's cache_seqlens values lie in [1, S_max] (a device-to-host copy: the reference paths only)."""
    lengths = cache_seqlens.tolist()
    if min(lengths) < 1 or max(lengths) > k_cache.shape[1]:
        fail(op, f"cache_seqlens must lie in [1, S_max={k_cache.shape[1]}], got {lengths}")


# ----------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """A kernel's PRECISION constexpr, passed as every tl.dot's input_precision: "ieee" (exact float32 products) for
    float32 inputs, "tf32" otherwise (which 16-bit inputs ignore)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_triton_device(op: str, x: torch.Tensor, name: str = "q") -> None:
    """The Triton path needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"{op}: {name} is on {x.device}; the Triton path needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
        )


def new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to write (tests swap in NaN-filled ones to catch gaps). Call it as
    `utils.new_output` (the module's attribute), so that the tests' swap reaches every launcher."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_table(lengths: list[int], block: int, device, heavy_last: bool) -> torch.Tensor:
    """int32 [num_blocks, 2]: (sequence, block index) per program over packed sequences of `lengths` rows, `block`
    rows a program; with heavy_last the late (costlier under a causal mask) blocks come first."""
    rows = [(n, i) for n, length in enumerate(lengths) for i in range(triton.cdiv(length, block))]
    rows.sort(key=lambda row: -row[1] if heavy_last else row[1])
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 2)
