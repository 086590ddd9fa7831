"""`nsa-eval bench kernels`: attention kernel speed on a GPU, checked for correctness in the same run.

The shape is the paper's Figure 6 setting: B=1, 64 query heads, 4 KV heads, head dim 128, bfloat16.
What runs is two plain lists: CHECKS (correctness at small sizes, error against a bound) and CASES
(one timed call per op, implementation and length). To add a row, append a Case whose `setup(T)`
builds the inputs and returns a Run (the call to time, and the bytes it must read for decode rows).
Times are medians of triton.testing.do_bench; ratios are baseline time / row time (>1: faster).
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from nsa_eval.bench.common import (HQ, D, H, card_slug, copy_bandwidth, graphed, kv_cache_bytes, length_table,
                                   randn_input, rel_err, sdpa)
from nsa_eval.kernels.nsa.layout import FLA_LAYOUT, PAPER_LAYOUT, NSALayout

DECODE_BATCHES = (1, 16)


@dataclass
class Run:
    """A prepared call: `fn` is what gets timed; `bytes_read` the bytes it must move from memory."""

    fn: Callable[[], object]
    bytes_read: float | None = None
    note: str = ""


@dataclass
class Case:
    """One row of the table: `op` groups rows that compare ("prefill fwd", "decode b=16", ...)."""

    op: str
    impl: str
    setup: Callable[[int], Run]  # T -> Run
    flops: Callable[[int], float] | None = None


@dataclass
class Check:
    """A correctness check run before the timings: `run()` returns ||out - ref|| / ||ref||."""

    name: str
    run: Callable[[], float]
    bound: float
    error: float | None = field(default=None)


# ----------------------------------------------------------------------------------------------------
# inputs and helpers
# ----------------------------------------------------------------------------------------------------


def causal_flops(T: int) -> float:
    """Forward FLOPs of causal attention at B=1: two T x T x D products per head, half kept."""
    return 2.0 * HQ * D * T * T


def _fwd_bwd(attend, q, k, v):
    """A call that runs forward then backward (fresh gradients each time, no accumulation)."""
    import torch

    do = torch.randn_like(attend(q, k, v))

    def fn():
        return torch.autograd.grad(attend(q, k, v), (q, k, v), do)

    return fn


# ----------------------------------------------------------------------------------------------------
# our kernels
# ----------------------------------------------------------------------------------------------------


def ours_prefill(backward: bool) -> Callable[[int], Run]:
    def setup(T: int) -> Run:
        from nsa_eval.kernels.attention import attention

        q, k, v = randn_input(1, T, HQ, D, grad=backward), randn_input(1, T, H, D, grad=backward), randn_input(1, T, H, D, grad=backward)
        if backward:
            return Run(_fwd_bwd(lambda q, k, v: attention(q, k, v), q, k, v))
        return Run(lambda: attention(q, k, v))

    return setup


def ours_decode(batch: int) -> Callable[[int], Run]:
    def setup(T: int) -> Run:
        import torch

        from nsa_eval.kernels.attention import attention_decode

        q, k_cache, v_cache = randn_input(batch, HQ, D), randn_input(batch, T, H, D), randn_input(batch, T, H, D)
        lengths = torch.full((batch,), T, dtype=torch.int32, device="cuda")
        step = graphed(lambda: attention_decode(q, k_cache, v_cache, lengths))
        return Run(step, kv_cache_bytes(batch, T), note="CUDA graph")

    return setup


# ----------------------------------------------------------------------------------------------------
# PyTorch SDPA baselines ([B, heads, T, D] layout, its own)
# ----------------------------------------------------------------------------------------------------


def sdpa_prefill(backend_name: str, backward: bool) -> Callable[[int], Run]:
    def setup(T: int) -> Run:
        call, k, v, note = sdpa(backend_name, randn_input(1, HQ, T, D), randn_input(1, H, T, D), randn_input(1, H, T, D), causal=True)
        q = randn_input(1, HQ, T, D, grad=backward)
        k, v = k.requires_grad_(backward), v.requires_grad_(backward)
        if backward:
            return Run(_fwd_bwd(call, q, k, v), note=note)
        return Run(lambda: call(q, k, v), note=note)

    return setup


def sdpa_decode(batch: int) -> Callable[[int], Run]:
    def setup(T: int) -> Run:
        q = randn_input(batch, HQ, 1, D)
        call, k, v, note = sdpa("FLASH_ATTENTION", q, randn_input(batch, H, T, D), randn_input(batch, H, T, D), causal=False)
        step = graphed(lambda: call(q, k, v))
        return Run(step, kv_cache_bytes(batch, T, k.shape[1]), note=f"flash, {note}, CUDA graph")

    return setup


# ----------------------------------------------------------------------------------------------------
# NSA (kernels/nsa): the paper's layout with the window, and flash-linear-attention's beside fla-core
# ----------------------------------------------------------------------------------------------------

def _nsa_inputs(T: int, layout: NSALayout, grad: bool):
    """q, k, v, k_cmp, v_cmp (mean pooling: a stand-in for the model's phi), three gates (g_win None without a
    window); bf16 on the GPU."""
    import torch

    from nsa_eval.kernels.nsa import mean_pool

    q, k, v = randn_input(1, T, HQ, D, grad=grad), randn_input(1, T, H, D, grad=grad), randn_input(1, T, H, D, grad=grad)
    k_cmp = mean_pool(k.detach(), layout.block_len, layout.block_stride).requires_grad_(grad)
    v_cmp = mean_pool(v.detach(), layout.block_len, layout.block_stride).requires_grad_(grad)
    gates = [torch.rand(1, T, HQ, device="cuda", dtype=torch.bfloat16).requires_grad_(grad) for _ in range(3)]
    return [q, k, v, k_cmp, v_cmp, *gates[:2], gates[2] if layout.window else None]


def ours_nsa(layout: NSALayout, backward: bool) -> Callable[[int], Run]:
    def setup(T: int) -> Run:
        import torch

        from nsa_eval.kernels.nsa import nsa_attention

        inputs = _nsa_inputs(T, layout, backward)
        if not backward:
            return Run(lambda: nsa_attention(*inputs, layout=layout))
        do = torch.randn_like(nsa_attention(*inputs, layout=layout))
        leaves = [x for x in inputs if x is not None]
        return Run(lambda: torch.autograd.grad(nsa_attention(*inputs, layout=layout), leaves, do))

    return setup


def fla_nsa(backward: bool) -> Callable[[int], Run]:
    """fla-core's parallel_nsa at its own layout (block 64, 16 blocks, no window; it mean-pools k, v itself)."""

    def setup(T: int) -> Run:
        import torch
        from fla.ops.nsa import parallel_nsa

        q, k, v, _, _, g_cmp, g_slc, _ = _nsa_inputs(T, FLA_LAYOUT, backward)

        def call():
            return parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=FLA_LAYOUT.num_selected,
                                block_size=FLA_LAYOUT.block_len, window_size=FLA_LAYOUT.window)

        if not backward:
            return Run(call)
        do = torch.randn_like(call())
        return Run(lambda: torch.autograd.grad(call(), (q, k, v, g_cmp, g_slc), do))

    return setup


def ours_nsa_decode(batch: int, fused: bool = False) -> Callable[[int], Run]:
    """One NSA step (paper layout) at T cached tokens: reads the compressed cache, 16 blocks and the window. fused:
    kernels/nsa/fused_decode.py's two launches, else decode.py's five (what nsa_eval.kernels.nsa.nsa_decode runs)."""

    def setup(T: int) -> Run:
        import torch

        from nsa_eval.kernels.nsa import fused_decode, mean_pool
        from nsa_eval.kernels.nsa import nsa_decode as five_launches

        nsa_decode = fused_decode.nsa_decode if fused else five_launches
        layout = PAPER_LAYOUT
        q, k_cache, v_cache = randn_input(batch, HQ, D), randn_input(batch, T, H, D), randn_input(batch, T, H, D)
        k_cmp, v_cmp = (mean_pool(x, layout.block_len, layout.block_stride) for x in (k_cache, v_cache))
        gates = [torch.rand(batch, HQ, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        lengths = torch.full((batch,), T, dtype=torch.int32, device="cuda")
        step = graphed(lambda: nsa_decode(q, k_cache, v_cache, k_cmp, v_cmp, lengths, *gates, layout=layout))
        tokens = k_cmp.shape[1] + layout.num_selected * layout.select_len + layout.window  # K/V rows it must read
        return Run(step, kv_cache_bytes(batch, tokens), note=f"CUDA graph, {'two' if fused else 'five'} launches; "
                   "bytes: compressed cache + 16 blocks + window")

    return setup


# ----------------------------------------------------------------------------------------------------
# what runs
# ----------------------------------------------------------------------------------------------------

CASES: list[Case] = [
    Case("prefill fwd", "ours full", ours_prefill(backward=False), causal_flops),
    Case("prefill fwd", "sdpa flash", sdpa_prefill("FLASH_ATTENTION", backward=False), causal_flops),
    Case("prefill fwd", "sdpa cudnn", sdpa_prefill("CUDNN_ATTENTION", backward=False), causal_flops),
    Case("prefill fwd+bwd", "ours full", ours_prefill(backward=True), lambda T: 3.5 * causal_flops(T)),
    Case("prefill fwd+bwd", "sdpa flash", sdpa_prefill("FLASH_ATTENTION", backward=True), lambda T: 3.5 * causal_flops(T)),
    Case("prefill fwd+bwd", "sdpa cudnn", sdpa_prefill("CUDNN_ATTENTION", backward=True), lambda T: 3.5 * causal_flops(T)),
]
CASES += [
    Case("prefill fwd", "ours nsa", ours_nsa(PAPER_LAYOUT, backward=False)),
    Case("prefill fwd+bwd", "ours nsa", ours_nsa(PAPER_LAYOUT, backward=True)),
    Case("nsa fla-layout fwd", "ours nsa", ours_nsa(FLA_LAYOUT, backward=False)),
    Case("nsa fla-layout fwd", "fla parallel_nsa", fla_nsa(backward=False)),
    Case("nsa fla-layout fwd+bwd", "ours nsa", ours_nsa(FLA_LAYOUT, backward=True)),
    Case("nsa fla-layout fwd+bwd", "fla parallel_nsa", fla_nsa(backward=True)),
]
for _batch in DECODE_BATCHES:
    CASES += [
        Case(f"decode b={_batch}", "ours full", ours_decode(_batch)),
        Case(f"decode b={_batch}", "sdpa", sdpa_decode(_batch)),
        Case(f"decode b={_batch}", "ours nsa", ours_nsa_decode(_batch)),
        Case(f"decode b={_batch}", "ours nsa fused", ours_nsa_decode(_batch, fused=True)),
    ]
BASELINES = ("sdpa flash", "sdpa cudnn", "sdpa", "fla parallel_nsa")  # ratio columns: their time / the row's
# NSA rows also get ratios against our full attention, and the two-launch decode against the five-launch one
NSA_BASELINES = {"ours nsa": ("ours full",), "ours nsa fused": ("ours full", "ours nsa")}


def check_full_attention(T: int = 1024) -> float:
    """Largest of the o, dq, dk, dv errors of our kernel against the float32 reference (bf16 inputs)."""
    import torch

    from nsa_eval.kernels.attention import parallel, reference

    q, k, v = randn_input(1, T, HQ, D, grad=True), randn_input(1, T, H, D, grad=True), randn_input(1, T, H, D, grad=True)
    o = parallel.attention(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref = reference.attention(q32, k32, v32)
    grads_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    return max(rel_err(o, o_ref), *(rel_err(g, r) for g, r in zip(grads, grads_ref)))


def check_against_sdpa(T: int = 8192) -> float:
    """Our forward against SDPA's (flash) at a benchmark length."""
    from nsa_eval.kernels.attention import attention

    q, k, v = randn_input(1, T, HQ, D), randn_input(1, T, H, D), randn_input(1, T, H, D)
    call, k_sdpa, v_sdpa, _ = sdpa("FLASH_ATTENTION", q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True)
    return rel_err(attention(q, k, v), call(q.transpose(1, 2), k_sdpa, v_sdpa).transpose(1, 2))


def check_decode(batch: int = 4, s_max: int = 4096) -> float:
    """Decode over caches of different lengths against the float32 reference."""
    import torch

    from nsa_eval.kernels.attention import decode, reference

    q, k_cache, v_cache = randn_input(batch, HQ, D), randn_input(batch, s_max, H, D), randn_input(batch, s_max, H, D)
    lengths = torch.randint(1, s_max + 1, (batch,), dtype=torch.int32, device="cuda")
    ours = decode.attention_decode(q, k_cache, v_cache, lengths)
    ref = reference.attention_decode(q.float(), k_cache.float(), v_cache.float(), lengths)
    return rel_err(ours, ref)


def check_nsa(T: int = 2048) -> float:
    """NSA (paper layout) forward and every gradient against the float32 reference, both on the kernel's
    block selection (bf16 rounding may flip near-ties); the selection itself must agree on >= 99% of rows."""
    import torch

    from nsa_eval.kernels.nsa import parallel, reference

    inputs = _nsa_inputs(T, PAPER_LAYOUT, grad=True)
    o, idx = parallel.nsa_attention(*inputs, layout=PAPER_LAYOUT, return_block_indices=True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)  # the paper layout has a window: every input is used
    inputs32 = [x.detach().float().requires_grad_() for x in inputs]
    o_ref, idx_ref = reference.nsa_attention(*inputs32, layout=PAPER_LAYOUT, return_block_indices=True)
    same_rows = (torch.sort(idx, -1).values == torch.sort(idx_ref, -1).values).all(-1).float().mean().item()
    o_ref = reference.nsa_attention(*inputs32, layout=PAPER_LAYOUT, block_indices=idx)
    grads_ref = torch.autograd.grad(o_ref, inputs32, do.float())
    error = max(rel_err(o, o_ref), *(rel_err(g, r) for g, r in zip(grads, grads_ref)))
    return error if same_rows >= 0.99 else float("inf")


def check_nsa_decode(batch: int = 3, s_max: int = 3000, fused: bool = False) -> float:
    """NSA decode (five launches, or fused_decode's two) over caches of different lengths against the float32
    reference step."""
    import torch

    from nsa_eval.kernels.nsa import mean_pool
    from nsa_eval.kernels.nsa import decode, fused_decode, reference

    layout = PAPER_LAYOUT
    q, k_cache, v_cache = randn_input(batch, HQ, D), randn_input(batch, s_max, H, D), randn_input(batch, s_max, H, D)
    k_cmp, v_cmp = (mean_pool(x, layout.block_len, layout.block_stride) for x in (k_cache, v_cache))
    gates = [torch.rand(batch, HQ, device="cuda") for _ in range(3)]
    lengths = torch.tensor([s_max, s_max // 3, 700], dtype=torch.int32, device="cuda")[:batch]
    ours = (fused_decode if fused else decode).nsa_decode(q, k_cache, v_cache, k_cmp, v_cmp, lengths, *gates,
                                                          layout=layout)
    ref = reference.nsa_decode(*(x.float() for x in (q, k_cache, v_cache, k_cmp, v_cmp)), lengths, *gates,
                               layout=layout)
    return rel_err(ours, ref)


CHECKS: list[Check] = [
    Check("full attention fwd+bwd vs reference, T=1024 (max of o, dq, dk, dv)", check_full_attention, 3e-2),
    Check("NSA fwd+bwd vs reference, T=2048, paper layout (max of o and 8 gradients)", check_nsa, 3e-2),
    Check("NSA decode vs reference, mixed cache lengths", check_nsa_decode, 1.5e-2),
    Check("NSA decode in two launches vs reference, mixed cache lengths", lambda: check_nsa_decode(fused=True), 1.5e-2),
    Check("full attention fwd vs SDPA flash, T=8192", check_against_sdpa, 1.5e-2),
    Check("full attention decode vs reference, mixed cache lengths", check_decode, 1.5e-2),
]


# ----------------------------------------------------------------------------------------------------
# measuring and reporting
# ----------------------------------------------------------------------------------------------------


def time_case(case: Case, T: int) -> dict:
    """Median ms of one case at one length; an error (out of memory, a backend missing) becomes a field."""
    import torch
    import triton

    row: dict = {"op": case.op, "impl": case.impl, "T": T}
    try:
        run = case.setup(T)
        run.fn()
        torch.cuda.synchronize()
        row["ms"] = triton.testing.do_bench(run.fn, warmup=25, rep=100, return_mode="median")
        row.update(bytes_read=run.bytes_read, note=run.note)
        if case.flops:
            row["tflops"] = case.flops(T) / (row["ms"] * 1e-3) / 1e12
    except Exception as error:  # one failing row must not end the run
        message = str(error).splitlines()[0][:160] if str(error) else ""
        row["error"] = f"{type(error).__name__}: {message}"
    run = None
    torch.cuda.empty_cache()
    return row


def _format_table(rows: list[dict], op: str, lengths: list[int]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["op"] == op))
    cell = {(r["impl"], r["T"]): r for r in rows if r["op"] == op}
    decode = op.startswith("decode")

    def text(impl: str, t: int) -> str:
        r = cell.get((impl, t))
        if r is None:
            return ""
        if "error" in r:
            return "error"
        text = f"{r['ms']:.3f}"
        if decode and r.get("gbps"):
            text += f", {r['gbps']:.0f} GB/s ({100 * r['copy_fraction']:.0f}%)"
        elif r.get("tflops"):
            text += f", {r['tflops']:.0f}"
        ratios = [f"{r[k]:.2f}x {k.removeprefix('vs ')}" for k in r if k.startswith("vs ")]
        if ratios and impl not in BASELINES:
            text += " (" + ", ".join(ratios) + ")"
        return text

    heading = f"**{op}** (ms" + (", GB/s, % of copy bandwidth" if decode else ", TFLOP/s") + ", speed-up vs baselines)"
    lines = length_table(heading, impls, lengths, text)
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r["op"] == op and r.get("note")})
    errors = sorted({f"{r['impl']} T={r['T']}: {r['error']}" for r in rows if r["op"] == op and "error" in r})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes + errors])


def _add_ratios(rows: list[dict]) -> None:
    base = {(r["op"], r["impl"], r["T"]): r["ms"] for r in rows if "ms" in r}
    for r in rows:
        for b in BASELINES + NSA_BASELINES.get(r["impl"], ()):
            if "ms" in r and (r["op"], b, r["T"]) in base and r["impl"] != b:
                r[f"vs {b}"] = base[(r["op"], b, r["T"])] / r["ms"]


@click.command("kernels")
@click.option("--lengths", default="8k,16k,32k,64k", show_default=True, help="Sequence / cache lengths.")
@click.option("--out", "out_dir", default="results/bench", show_default=True, type=click.Path(file_okay=False),
              help="Folder for kernels-<card>.json and .md.")
@click.option("--quick", is_flag=True, help="A smoke run: lengths 4k only.")
@click.option("--only", default="", help="Run only the ops, and the correctness checks, whose name contains this "
              "text (e.g. decode).")
@click.option("--sweep", is_flag=True, help="Also time the tile candidates of our kernels (16k prefill, 64k decode).")
def kernels_command(lengths: str, out_dir: str, quick: bool, only: str, sweep: bool) -> None:
    """Time our attention kernels against PyTorch SDPA (B=1, 64/4 heads, dim 128, bf16)."""
    import torch
    import triton

    from nsa_eval.util import parse_int_list

    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA GPU; none is visible to torch here")
    lengths_list = [4096] if quick else parse_int_list(lengths, "--lengths")
    device_name = torch.cuda.get_device_name()
    card = card_slug(device_name)
    click.echo(f"device: {device_name} | torch {torch.__version__} | triton {triton.__version__}")

    checks = [check for check in CHECKS if only in check.name]
    for check in checks:
        check.error = check.run()
        torch.cuda.empty_cache()
        status = "ok" if check.error < check.bound else "FAIL"
        click.echo(f"check {status}: {check.name}: rel err {check.error:.2e} (bound {check.bound:.0e})")

    copy_bw = copy_bandwidth()
    click.echo(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
    from nsa_eval.bench.tile_sweep import sweep_tiles

    sweep_rows = sweep_tiles(4096 if quick else 16384, 4096 if quick else 65536) if sweep else []
    rows = []
    for case in CASES:
        if only and only not in case.op:
            continue
        for T in lengths_list:
            row = time_case(case, T)
            rows.append(row)
            click.echo(f"  {case.op:18s} {case.impl:18s} T={T:6d} " + (f"{row['ms']:9.3f} ms" if "ms" in row else row["error"]))
    _finish_rows(rows, copy_bw)

    from nsa_eval.store import git_sha

    ops = list(dict.fromkeys(r["op"] for r in rows))
    tables = "\n\n".join(_format_table(rows, op, lengths_list) for op in ops)
    checks_md = "\n".join(
        f"- {'ok' if c.error < c.bound else 'FAIL'}: {c.name}: {c.error:.2e} (bound {c.bound:.0e})" for c in checks
    )
    header = (f"# Attention kernels on {device_name}\n\nB=1, {HQ} query heads, {H} KV heads, head dim {D}, bfloat16; "
              f"decode at batch {', '.join(map(str, DECODE_BATCHES))}. torch {torch.__version__}, triton "
              f"{triton.__version__}, commit {git_sha()}. Median of triton.testing.do_bench. Copy bandwidth "
              f"{copy_bw / 1e9:.0f} GB/s (read + write).\n\nCorrectness (same run):\n{checks_md}\n")
    report = header + "\n" + tables + "\n"
    click.echo("\n" + report)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": device_name, "card": card, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "git_sha": git_sha(),
        "shape": {"B": 1, "HQ": HQ, "H": H, "D": D, "dtype": "bfloat16"},
        "copy_bandwidth_bytes_per_s": copy_bw,
        "checks": [{"name": c.name, "error": c.error, "bound": c.bound, "ok": c.error < c.bound} for c in checks],
        "rows": rows,
        "tile_sweep": sweep_rows,
    }
    (out / f"kernels-{card}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"kernels-{card}.md").write_text(report)
    click.echo(f"wrote {out / f'kernels-{card}.json'} and .md")
    if not all(c.error < c.bound for c in checks):
        sys.exit(1)


def _finish_rows(rows: list[dict], copy_bw: float) -> None:
    """Bandwidth columns for rows with a byte count, and the ratio columns."""
    for r in rows:
        if "ms" in r and r.get("bytes_read"):
            r["gbps"] = r["bytes_read"] / (r["ms"] * 1e-3) / 1e9
            r["copy_fraction"] = r["bytes_read"] / (r["ms"] * 1e-3) / copy_bw
    _add_ratios(rows)

