"""A transformer's pointwise parts and the decode step's KV-cache write in plain PyTorch (the oracle and the CPU
path), and the argument checks that both paths share.

Inference only: every function refuses inputs that require grad while grad is enabled (run under
torch.no_grad() or torch.inference_mode()). Dtypes: float16, bfloat16 or float32 on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nsa_eval.kernels.utils import TRITON_DTYPES, check_same, check_tensor, fail


# ----------------------------------------------------------------------------------------------------
# checks (shared with the Triton files)
# ----------------------------------------------------------------------------------------------------


def check_inference(op: str, tensors: dict) -> None:
    """Refuse a graph: these kernels have no backward."""
    if torch.is_grad_enabled():
        for name, x in tensors.items():
            if isinstance(x, torch.Tensor) and x.requires_grad:
                fail(op, f"{name} requires grad, but these are inference kernels (forward only); run under "
                         "torch.no_grad()")


def _check_last_dim(op: str, name: str, x: torch.Tensor, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] < 1:
        fail(op, f"{name} must be {layout} with a non-empty last dim, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        fail(op, f"{name}'s last dim has stride {x.stride(-1)}; it must be contiguous (call .contiguous())")


def check_add_rms_norm(x, weight, eps, residual) -> None:
    op = "add_rms_norm"
    _check_last_dim(op, "x", x, "[..., D]")
    D = x.shape[-1]
    check_tensor(op, "weight", weight, 1, f"[D] = [{D}]")
    if weight.shape[0] != D:
        fail(op, f"weight has {weight.shape[0]} elements but x's last dim is D={D}")
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        _check_last_dim(op, "residual", residual, "[..., D]")
        if residual.shape != x.shape:
            fail(op, f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        tensors["residual"] = residual
    check_same(op, tensors, TRITON_DTYPES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        fail(op, f"eps must be a number >= 0 (e.g. 1e-6), got {eps!r}")
    check_inference(op, tensors)


def check_rotary(x, cos, sin) -> None:
    op = "rotary_"
    check_tensor(op, "x", x, 4, "[B, T, R, D]")
    B, T, R, D = x.shape
    if D % 2:
        fail(op, f"x has head dim D={D}; rotate-half RoPE needs an even D")
    if x.stride(-1) != 1:
        fail(op, f"x's last dim has stride {x.stride(-1)}; it must be contiguous (a column slice of a row-major "
                 "projection output is fine)")
    if x.dtype not in TRITON_DTYPES:
        fail(op, f"x has dtype {x.dtype}; use one of float16, bfloat16, float32")
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor):
            fail(op, f"{name} must be a torch.Tensor [B, T, 1, D/2] or [B, T, D/2], got {type(table).__name__}")
        if tuple(table.shape) not in ((B, T, 1, D // 2), (B, T, D // 2)):
            fail(op, f"{name} has shape {tuple(table.shape)}; x {tuple(x.shape)} needs [{B}, {T}, 1, {D // 2}] or "
                     f"[{B}, {T}, {D // 2}] (rope_tables)")
        if table.dtype != torch.float32:
            fail(op, f"{name} has dtype {table.dtype}; the RoPE tables must be float32")
        if table.device != x.device:
            fail(op, f"{name} is on {table.device} but x is on {x.device}; move them to one device")
        if table.stride(-1) != 1:
            fail(op, f"{name}'s last dim has stride {table.stride(-1)}; it must be contiguous")
    check_inference(op, {"x": x, "cos": cos, "sin": sin})


def check_silu_mul(gate_up) -> None:
    op = "silu_mul"
    _check_last_dim(op, "gate_up", gate_up, "[..., 2*I]")
    if gate_up.shape[-1] % 2:
        fail(op, f"gate_up's last dim {gate_up.shape[-1]} is odd; it must be 2*I (gate columns, then up columns)")
    check_same(op, {"gate_up": gate_up}, TRITON_DTYPES)
    check_inference(op, {"gate_up": gate_up})


MAX_CACHE_PAIRS = 6


def check_cache_write(dests, sources, slots) -> None:
    """Shapes, dtypes and devices of cache_write_'s (dest, source, slots) pairs; the slot values are not read."""
    op = "cache_write_"
    for name, group in (("dests", dests), ("sources", sources), ("slots", slots)):
        if not isinstance(group, (list, tuple)):
            fail(op, f"{name} must be a list or tuple of 1 to {MAX_CACHE_PAIRS} tensors, got {type(group).__name__}")
    if not len(dests) == len(sources) == len(slots):
        fail(op, f"got {len(dests)} dests, {len(sources)} sources and {len(slots)} slots; pass one source and one "
                 "slots tensor per dest")
    if not 1 <= len(dests) <= MAX_CACHE_PAIRS:
        fail(op, f"got {len(dests)} dests; one call writes 1 to {MAX_CACHE_PAIRS} (split the call)")
    for i, (dest, source, slot) in enumerate(zip(dests, sources, slots)):
        check_tensor(op, f"dests[{i}]", dest, 4, "[B, S, H, D]")
        _check_last_dim(op, f"dests[{i}]", dest, "[B, S, H, D]")
        check_tensor(op, f"sources[{i}]", source, 3, "[B, H, D]")
        _check_last_dim(op, f"sources[{i}]", source, "[B, H, D]")
        B, _, H, D = dest.shape
        if tuple(source.shape) != (B, H, D):
            fail(op, f"sources[{i}] has shape {tuple(source.shape)} but dests[{i}] {tuple(dest.shape)} needs "
                     f"[B, H, D] = [{B}, {H}, {D}]")
        check_same(op, {f"dests[{i}]": dest, f"sources[{i}]": source}, TRITON_DTYPES)
        if dest.device != dests[0].device:
            fail(op, f"dests[{i}] is on {dest.device} but dests[0] is on {dests[0].device}; one launch writes one "
                     "device")
        if B != dests[0].shape[0]:
            fail(op, f"dests[{i}] has B={B} rows but dests[0] has {dests[0].shape[0]}; every pair writes the same "
                     "B rows")
        if (not isinstance(slot, torch.Tensor) or slot.dtype not in (torch.int32, torch.int64)
                or tuple(slot.shape) != (B,)):
            got = f"{slot.dtype} {tuple(slot.shape)}" if isinstance(slot, torch.Tensor) else type(slot).__name__
            fail(op, f"slots[{i}] must be an int64 or int32 tensor [B] = [{B}] (row b's slot in dests[{i}]), "
                     f"got {got}")
        if slot.device != dest.device:
            fail(op, f"slots[{i}] is on {slot.device} but dests[{i}] is on {dest.device}; move it to the cache's "
                     "device")
    check_inference(op, {**{f"dests[{i}]": dest for i, dest in enumerate(dests)},
                         **{f"sources[{i}]": source for i, source in enumerate(sources)}})


# ----------------------------------------------------------------------------------------------------
# reference functions
# ----------------------------------------------------------------------------------------------------


def add_rms_norm(x, weight, eps, residual=None):
    """Residual add, then RMSNorm: -> (normed, summed).

    Args:
        x: [..., D] float16, bfloat16 or float32, last dim contiguous.
        weight: [D], x's dtype.
        eps: added to the mean square (float).
        residual: None or [..., D] like x.
    Returns:
        normed: [..., D] x's dtype, (s * rsqrt(mean(s^2) + eps)) in float32, rounded to x's dtype, times weight.
        summed: s = x itself when residual is None, else x + residual in x's dtype (a new tensor).
    """
    check_add_rms_norm(x, weight, eps, residual)
    summed = x if residual is None else x + residual
    s32 = summed.float()
    normed = (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return normed, summed


def rotary_(x, cos, sin):
    """Rotate-half RoPE in place: x1, x2 = halves of the last dim; x <- (x1 cos - x2 sin, x2 cos + x1 sin), float32
    math rounded to x's dtype. Returns x.

    Args:
        x: [B, T, R, D] float16, bfloat16 or float32 (R heads of even width D), last dim contiguous, other
            strides arbitrary (e.g. a column slice of a fused projection output).
        cos, sin: [B, T, 1, D/2] or [B, T, D/2] float32 (model_adapters/runtime/rope.py rope_tables).
    """
    check_rotary(x, cos, sin)
    if cos.ndim == 3:
        cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def silu_mul(gate_up):
    """SwiGLU's pointwise part: gate_up [..., 2*I] (gate columns, then up columns; float16, bfloat16 or float32,
    last dim contiguous) -> silu(gate) * up [..., I] contiguous, in gate_up's dtype (silu rounded to it, then the
    product)."""
    check_silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def cache_write_(dests, sources, slots):
    """Write each row's new token into its cache slot, in place: dests[i][b, slots[i][b]] = sources[i][b] for every
    pair i and row b. Returns None.

    Args:
        dests: list or tuple of 1 to 6 caches [B, S_i, H_i, D_i] (float16, bfloat16 or float32), last dim
            contiguous, other strides arbitrary (e.g. cache[..., :D] of a zero-padded wider cache: only the first
            D_i columns are written).
        sources: as many [B, H_i, D_i] tensors of their dest's dtype, last dim contiguous, other strides arbitrary
            (e.g. column slices of one fused projection output).
        slots: as many int64 or int32 tensors [B] on the caches' device, each in [0, S_i) (checked here: a host
            sync; the Triton path does not check); one tensor may serve several pairs.
    """
    check_cache_write(dests, sources, slots)
    for i, (dest, source, slot) in enumerate(zip(dests, sources, slots)):
        if slot.numel() and not (0 <= slot.min().item() and slot.max().item() < dest.shape[1]):
            fail("cache_write_", f"slots[{i}] holds values in [{slot.min().item()}, {slot.max().item()}]; each must "
                                 f"be in [0, S) = [0, {dest.shape[1]}) of dests[{i}]")
        dest[torch.arange(dest.shape[0], device=dest.device), slot.long()] = source
