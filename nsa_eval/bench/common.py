"""What the `nsa-eval bench` commands share: the card's short name, the measured copy bandwidth, a CUDA-graphed call,
PyTorch SDPA as a baseline (GQA natively, or KV heads expanded where a backend refuses it) and the Markdown table of
implementations by length that kernels-<card>.md and model-<card>.md print."""

from __future__ import annotations

import re
from typing import Callable


def card_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    match = re.search(r"\b(GH200|H200|H100|H20|B200|A100|L40S|L4)\b", device_name, re.IGNORECASE)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def copy_bandwidth(gib: int = 2) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import torch
    import triton

    n = gib << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured in a CUDA graph: its replay, timed without the host's launch overhead (a decode
    step is tens of microseconds, so Python and launch latency would otherwise dominate)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sdpa(backend_name: str, q, k, v, causal: bool):
    """SDPA on one backend over q [B, HQ, T, D], k/v [B, H, S, D]: GQA through enable_gqa, or KV heads
    expanded (outside the timed call) where the backend refuses it. Returns (call, k, v, note)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def native(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def expanded(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    try:
        with torch.no_grad():
            native(q[..., :1, :], k[..., :1, :], v[..., :1, :])
        return native, k, v, "enable_gqa"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        return expanded, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), f"KV heads expanded x{group}"


def length_table(heading: str, impls: list[str], lengths: list[int], cell: Callable[[str, int], str]) -> list[str]:
    """The lines of a Markdown table with a row per implementation and a column per length (T=8k, ...), under its
    heading line: `cell(impl, T)` gives each cell's text."""
    lines = [heading, "", "| impl | " + " | ".join(f"T={t // 1024}k" for t in lengths) + " |",
             "|" + " --- |" * (len(lengths) + 1)]
    for impl in impls:
        lines.append(f"| {impl} | " + " | ".join(cell(impl, t) for t in lengths) + " |")
    return lines


# the kernel benchmark's shape (bench kernels, its tile sweep): the paper's Figure 6 setting
HQ, H, D = 64, 4, 128  # query heads, KV heads, head dim of every prefill and decode row


def randn_input(*shape, grad=False):
    import torch

    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def kv_cache_bytes(batch: int, T: int, heads: int = H) -> float:
    return 2.0 * batch * T * heads * D * 2  # K and V, bf16
