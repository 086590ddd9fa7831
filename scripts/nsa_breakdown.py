"""Where the NSA time goes on a GPU: each kernel of the prefill (forward and backward) and the decode step
timed alone at one length, the compiler's register / spill / shared-memory report of each kernel, and
optionally a sweep of the tile choices (kernels/nsa/*.py TILES). Prints a table, writes JSON.

    python scripts/nsa_breakdown.py --T 65536 --sweep --out results/bench/nsa-breakdown.json
    python scripts/nsa_breakdown.py --dk 192 --dv 128 ...   (the paper model's head dims)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from nsa_eval.kernels.attention import attention, attention_decode
from nsa_eval.kernels.nsa import mean_pool
from nsa_eval.kernels.nsa import compression, decode, parallel, selected, selection
from nsa_eval.kernels.nsa.layout import FLA_LAYOUT, PAPER_LAYOUT, NSALayout

HQ, H = 64, 4
DK = DV = 128  # query-key and value head dims (--dk, --dv)


def ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def parts(T: int, layout: NSALayout) -> list[tuple[str, float]]:
    """Median ms of every piece of one NSA prefill (forward and backward) at length T."""
    bf = torch.bfloat16
    q, k, v = (torch.randn(1, T, h, d, device="cuda", dtype=bf) for h, d in ((HQ, DK), (H, DK), (H, DV)))
    k_cmp, v_cmp = (mean_pool(x, layout.block_len, layout.block_stride) for x in (k, v))
    gates = [torch.rand(1, T, HQ, device="cuda", dtype=bf) for _ in range(3)]
    scale = DK ** -0.5
    o_cmp, lse = compression.compressed_fwd(q, k_cmp, v_cmp, layout, scale)
    idx = selection.select_fwd(q, k_cmp, lse, layout, scale)
    o_slc, lse_slc = selected.selected_fwd(q, k, v, idx, layout.select_len, scale)
    do = torch.randn_like(o_cmp)
    rows = [
        ("fwd compressed", ms(lambda: compression.compressed_fwd(q, k_cmp, v_cmp, layout, scale))),
        ("fwd select top-n", ms(lambda: selection.select_fwd(q, k_cmp, lse, layout, scale))),
        ("fwd selected", ms(lambda: selected.selected_fwd(q, k, v, idx, layout.select_len, scale))),
        ("fwd gated sum (torch)", ms(lambda: gates[0].unsqueeze(-1) * o_cmp + gates[1].unsqueeze(-1) * o_slc)),
        ("bwd compressed (dq, dk, dv)", ms(lambda: compression.compressed_bwd(q, k_cmp, v_cmp, o_cmp, lse, do, layout,
                                                                              scale))),
        ("bwd selected (dq, dk, dv)", ms(lambda: selected.selected_bwd(q, k, v, idx, o_slc, lse_slc, do,
                                                                       layout.select_len, scale))),
        ("bwd selected: inverted index", ms(lambda: selected.inverted_index(idx, triton.cdiv(T, layout.select_len),
                                                                            selected.TILES["dkv"][1]))),
    ]
    if layout.window:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        rows.append(("fwd window (full-attention kernel)", ms(lambda: attention(q, k, v, window=layout.window))))
        rows.append(("fwd+bwd window", ms(lambda: torch.autograd.grad(attention(qg, kg, vg, window=layout.window),
                                                                      (qg, kg, vg), do))))
    inputs = [x.clone().requires_grad_() for x in (q, k, v, k_cmp, v_cmp, *gates[:2 + bool(layout.window)])]
    inputs += [None] * (8 - len(inputs))
    leaves = [x for x in inputs if x is not None]
    rows.append(("NSA fwd total", ms(lambda: parallel.nsa_attention(*inputs, layout=layout))))
    rows.append(("NSA fwd+bwd total", ms(lambda: torch.autograd.grad(parallel.nsa_attention(*inputs, layout=layout),
                                                                      leaves, do))))
    return rows


def decode_parts(T: int, batch: int) -> list[tuple[str, float]]:
    layout = PAPER_LAYOUT
    bf = torch.bfloat16
    q = torch.randn(batch, HQ, DK, device="cuda", dtype=bf)
    k, v = (torch.randn(batch, T, H, d, device="cuda", dtype=bf) for d in (DK, DV))
    k_cmp, v_cmp = (mean_pool(x, layout.block_len, layout.block_stride) for x in (k, v))
    gates = [torch.rand(batch, HQ, device="cuda", dtype=bf) for _ in range(3)]
    lengths = torch.full((batch,), T, dtype=torch.int32, device="cuda")
    return [
        (f"decode b={batch} NSA step (eager)", ms(lambda: decode.nsa_decode(q, k, v, k_cmp, v_cmp, lengths, *gates,
                                                                                  layout=layout))),
        (f"decode b={batch} window part (eager)", ms(lambda: attention_decode(q, k, v, lengths, window=layout.window))),
        (f"decode b={batch} full attention (eager)", ms(lambda: attention_decode(q, k, v, lengths))),
    ]


def compiler_reports() -> list[dict]:
    """Registers, spills and shared memory of every compiled NSA kernel variant."""
    out = []
    for module in (compression, selection, selected, decode):
        for name in dir(module):
            fn = getattr(module, name)
            if not isinstance(fn, triton.runtime.jit.JITFunction) or not name.endswith("_kernel"):
                continue
            try:
                for caches in getattr(fn, "device_caches", {}).values():
                    for kernel in caches[0].values():
                        kernel._init_handles()
                        out.append({"kernel": name, "regs": kernel.n_regs, "spills": kernel.n_spills,
                                    "shared": kernel.metadata.shared, "warps": kernel.metadata.num_warps,
                                    "stages": kernel.metadata.num_stages})
            except Exception as error:  # the cache layout is Triton's own and changes between versions
                out.append({"kernel": name, "error": repr(error)[:200]})
    return out


def sweep(T: int, only: str = "") -> list[dict]:
    """Time each tile candidate of the paper-layout kernels at length T (the first of each list: the default)."""
    layout = PAPER_LAYOUT
    bf = torch.bfloat16
    q, k, v = (torch.randn(1, T, h, d, device="cuda", dtype=bf) for h, d in ((HQ, DK), (H, DK), (H, DV)))
    k_cmp, v_cmp = (mean_pool(x, layout.block_len, layout.block_stride) for x in (k, v))
    scale = DK ** -0.5
    o_cmp, lse = compression.compressed_fwd(q, k_cmp, v_cmp, layout, scale)
    idx = selection.select_fwd(q, k_cmp, lse, layout, scale)
    o_slc, lse_slc = selected.selected_fwd(q, k, v, idx, layout.select_len, scale)
    do = torch.randn_like(o_cmp)
    candidates = {
        (compression, "fwd"): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
        (compression, "dq"): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3), (64, 128, 8, 2)],
        (compression, "dkv"): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
        (selection, "select"): [(64, 4, 2), (128, 8, 2), (32, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2)],
        (selected, "fwd"): [(4, 2, 4), (4, 2, 1), (4, 3, 4), (2, 2, 4), (4, 2, 16), (8, 2, 4)],
        (selected, "dq"): [(4, 2, 4), (4, 2, 1), (4, 3, 4), (8, 2, 4)],
        (selected, "dkv"): [(64, 256, 4, 2), (128, 256, 8, 2), (64, 512, 4, 2), (64, 128, 4, 3), (32, 256, 4, 2)],
    }
    calls = {
        (compression, "fwd"): lambda: compression.compressed_fwd(q, k_cmp, v_cmp, layout, scale),
        (compression, "dq"): lambda: compression.compressed_bwd(q, k_cmp, v_cmp, o_cmp, lse, do, layout, scale),
        (compression, "dkv"): lambda: compression.compressed_bwd(q, k_cmp, v_cmp, o_cmp, lse, do, layout, scale),
        (selection, "select"): lambda: selection.select_fwd(q, k_cmp, lse, layout, scale),
        (selected, "fwd"): lambda: selected.selected_fwd(q, k, v, idx, layout.select_len, scale),
        (selected, "dq"): lambda: selected.selected_bwd(q, k, v, idx, o_slc, lse_slc, do, layout.select_len, scale),
        (selected, "dkv"): lambda: selected.selected_bwd(q, k, v, idx, o_slc, lse_slc, do, layout.select_len, scale),
    }
    rows = []
    for (module, key), options in candidates.items():
        if only not in f"{module.__name__.rsplit('.', 1)[1]}.{key}":
            continue
        default = module.TILES[key]
        first = None
        for tiles in options:
            module.TILES[key] = tiles
            row = {"kernel": f"{module.__name__.rsplit('.', 1)[1]}.{key}", "tiles": tiles}
            try:
                out = calls[(module, key)]()
                outs = out if isinstance(out, tuple) else (out,)
                flat = torch.cat([x.float().flatten() for x in outs])
                first = flat if first is None else first
                row["err_vs_first"] = ((flat - first).norm() / first.norm()).item()
                row["ms"] = ms(calls[(module, key)])
            except Exception as error:  # a tile that does not compile or fit is a row, not the end
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
            print(f"  sweep {row['kernel']:22s} {str(tiles):22s} " +
                  (f"{row['ms']:8.3f} ms err {row['err_vs_first']:.1e}" if "ms" in row else row["error"]), flush=True)
            rows.append(row)
        module.TILES[key] = default
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-T", type=int, default=32768)
    parser.add_argument("--sweep-only", default="", help="sweep only the kernels whose name contains this")
    parser.add_argument("--dk", type=int, default=128, help="query-key head dim")
    parser.add_argument("--dv", type=int, default=128, help="value head dim")
    parser.add_argument("--out", default="nsa-breakdown.json")
    a = parser.parse_args()
    global DK, DV
    DK, DV = a.dk, a.dv
    result = {"device": torch.cuda.get_device_name(), "T": a.T, "dk": DK, "dv": DV}

    def save():
        Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")

    for name, layout in (("paper", PAPER_LAYOUT), ("fla", FLA_LAYOUT)):
        result[name] = parts(a.T, layout)
        print(f"\n{name} layout, T={a.T}")
        for part, t in result[name]:
            print(f"  {part:40s} {t:9.3f} ms", flush=True)
        torch.cuda.empty_cache()
        save()
    result["decode"] = decode_parts(a.T, 1) + decode_parts(a.T, 16)
    for part, t in result["decode"]:
        print(f"  {part:40s} {t:9.3f} ms", flush=True)
    result["compiler"] = compiler_reports()
    for r in result["compiler"]:
        print("  " + " ".join(f"{k} {v}" for k, v in r.items()))
    save()
    if a.sweep:
        torch.cuda.empty_cache()
        result["sweep"] = sweep(a.sweep_T, a.sweep_only)
        save()


if __name__ == "__main__":
    main()
