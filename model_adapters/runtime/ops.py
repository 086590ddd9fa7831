"""What the runtime calls to compute: the kernels (Triton on CUDA tensors, the PyTorch reference elsewhere), one
GEMM for several Linear layers of the same input, and PyTorch SDPA as the full-attention baseline of benchmarks."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right


class RMSNorm(nn.Module):
    """The weight and eps of an RMSNorm; the model applies it with ops.add_rms_norm (fused with the residual add)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> weight * x / rms(x), float32 math rounded to x's dtype before the weight (as Llama/Qwen)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Kernels(NamedTuple):
    compressed_attention: Any
    select_blocks: Any
    selected_attention: Any
    nsa_decode: Any
    attention: Any
    attention_decode: Any
    gated_sum: Any
    add_rms_norm: Any
    rotary_: Any
    silu_mul: Any
    cache_write_: Any


KERNEL_CHOICES = ("triton", "triton-fused", "reference", "cpu")


def kernel_table(name: str) -> Kernels:
    """'triton', 'reference' (the same signatures; nsa_eval.kernels picks between them by device) or 'cpu': the
    reference with full attention through PyTorch's SDPA (the same results, without the reference's dense float32
    score matrices): what the runtime runs on the CPU. 'triton-fused': 'triton' with the NSA decode step in two
    launches (kernels/nsa/fused_decode.py) instead of five (kernels/nsa/decode.py), until GPU timings pick one."""
    if name == "cpu":
        return kernel_table("reference")._replace(attention=cpu_attention, attention_decode=cpu_attention_decode)
    if name == "triton-fused":
        from nsa_eval.kernels.nsa import fused_decode

        return kernel_table("triton")._replace(nsa_decode=fused_decode.nsa_decode)
    if name == "triton":
        from nsa_eval.kernels.attention import decode as attention_decode_mod, parallel
        from nsa_eval.kernels.layers import cache_write, norm, rotary, swiglu
        from nsa_eval.kernels.nsa import compression, decode, parallel as nsa_parallel, selected, selection

        return Kernels(compression.compressed_attention, selection.select_blocks, selected.selected_attention,
                       decode.nsa_decode, parallel.attention, attention_decode_mod.attention_decode,
                       nsa_parallel.gated_sum, norm.add_rms_norm, rotary.rotary_, swiglu.silu_mul,
                       cache_write.cache_write_)
    if name == "reference":
        from nsa_eval.kernels.attention import reference as full_ref
        from nsa_eval.kernels.layers import reference as layers_ref
        from nsa_eval.kernels.nsa import reference

        return Kernels(reference.compressed_attention, reference.select_blocks, reference.selected_attention,
                       reference.nsa_decode, full_ref.attention, full_ref.attention_decode, reference.gated_sum,
                       layers_ref.add_rms_norm, layers_ref.rotary_, layers_ref.silu_mul, layers_ref.cache_write_)
    raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNEL_CHOICES))}, got {name!r}")




def fused_linear(owner: nn.Module, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum of out_features, in_features] (and bias, zeros where a layer has none) for Linear layers of
    the same input, so they run as one GEMM whose output columns are theirs in order. Built on first use and again
    whenever a weight or bias is replaced (loading, .to()) or a bias changed in place; the layers' weights are then
    re-pointed at row slices of it, so the model holds each weight once and in-place changes reach both."""
    def key():  # (inference tensors keep no version counter, and cannot change outside inference mode)
        return tuple((x.data_ptr(), -1 if x.is_inference() else x._version) if x is not None else None
                     for linear in linears for x in (linear.weight, linear.bias))

    cached = owner.__dict__.get("_fused_linear")
    if cached is not None and cached[0] == key():
        return cached[1], cached[2]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, also when called under inference_mode
        weight = torch.cat([linear.weight for linear in linears])
        bias = None
        if any(linear.bias is not None for linear in linears):
            bias = torch.cat([linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features)
                              for linear in linears])
        offset = 0
        for linear in linears:
            rows = weight[offset:offset + linear.out_features]
            linear.weight = nn.Parameter(rows, requires_grad=linear.weight.requires_grad)
            offset += linear.out_features
    owner.__dict__["_fused_linear"] = (key(), weight, bias)
    return weight, bias




def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """PyTorch SDPA on one backend ('flash', 'cudnn', 'efficient', 'math') in our layout: q [B, T, HQ, Dk],
    k [B, S, H, Dk], v [B, S, H, Dv] -> [B, T, HQ, Dv]; causal, aligned bottom-right when T < S (query i at key
    position i + S - T: a prompt slice after cached tokens); a single query (decode) sees every key.
    GQA through enable_gqa, or the KV heads expanded where the backend refuses it: the first way that works is
    remembered per backend and kind of call (SDPA_WAYS), so the call is graph-safe after its first use. A backend
    that needs Dv == Dk gets V zero-padded by the caller (sdpa_value_width), in the cache itself."""
    T, S = q.shape[1], k.shape[1]
    causal = {"is_causal": T == S and T > 1}
    if 1 < T < S:
        causal = {"attn_mask": causal_lower_right(T, S)}

    def call(way: str):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = {"enable_gqa": True}
        if way == "expand":
            group = q.shape[2] // k.shape[2]
            kt, vt, gqa = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1), {}
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(qt, kt, vt, **causal, **gqa).transpose(1, 2)

    key = (backend, "decode" if T == 1 else "slice" if T < S else "prompt")  # a slice takes a lower-right mask
    if key in SDPA_WAYS:
        return call(SDPA_WAYS[key])
    errors = []
    for way in ("native", "expand"):
        try:
            out = call(way)
        except RuntimeError as error:
            errors.append(f"{way}: {str(error).strip().splitlines()[0][:100]}")
            continue
        SDPA_WAYS[key] = way
        return out
    raise ValueError(f"SDPA backend {backend} refuses these shapes ({'; '.join(errors)})")


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SDPA_WAYS: dict[tuple[str, str], str] = {}  # (backend, kind of call) -> the first way of calling it that worked
_VALUE_WIDTHS: dict[tuple, int] = {}


def sdpa_value_width(backend: str, dk: int, dv: int, device: torch.device, dtype: torch.dtype) -> int:
    """Dv where the backend takes V of another head dim than Q and K (tried on tiny tensors, prompt, slice and
    decode shapes), else Dk: V is then stored zero-padded to Dk (the outputs' extra columns are zeros, and dropped)."""
    key = (backend, dk, dv, str(device), dtype)
    if key not in _VALUE_WIDTHS:
        q, k, v = (torch.randn(1, 3, 2, d, device=device, dtype=dtype) for d in (dk, dk, dv))
        try:
            for T in (3, 2, 1):  # a prompt (causal), a slice after a cached token and a decode step
                sdpa(q[:, :T], k, v, backend)
            _VALUE_WIDTHS[key] = dv
        except (RuntimeError, ValueError):
            _VALUE_WIDTHS[key] = dk
        for kind in ("prompt", "slice", "decode"):  # decided again on real shapes
            SDPA_WAYS.pop((backend, kind), None)
    return _VALUE_WIDTHS[key]



def cpu_attention(q, k, v, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """nsa_eval.kernels' attention (q [B, T, HQ, Dk] the last T of the S positions of k/v [B, S, H, D], causal
    bottom-right, optional window; or with cu_seqlens int32 [N+1], sequences packed along T with B == 1 and T == S,
    each attending to itself) through PyTorch SDPA, one call per packed sequence."""
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        return torch.cat([cpu_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=causal, window=window, scale=scale)
                          for a, b in zip(offsets, offsets[1:]) if b > a], 1)
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(S - T, S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    mask = j <= i if causal else torch.ones(T, S, dtype=torch.bool, device=q.device)
    if window is not None:
        mask = mask & (j > i - window)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def cpu_attention_decode(q, k_cache, v_cache, cache_seqlens, *, window=None, scale=None):
    """nsa_eval.kernels' attention_decode (q [B, HQ, Dk], caches [B, S, H, D], cache_seqlens [B]) through SDPA."""
    j = torch.arange(k_cache.shape[1], device=q.device)[None, :]
    lengths = cache_seqlens.long()[:, None]
    mask = j < lengths if window is None else (j < lengths) & (j >= lengths - window)
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out[:, :, 0]
