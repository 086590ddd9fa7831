"""`nsa-eval bench kernels --sweep`: tile candidates of our attention kernels (kernels/attention/parallel.py and
decode.py) timed on the GPU, each checked against the first candidate's result, so a tile that computes wrongly
shows."""

from __future__ import annotations

import math

import click

from nsa_eval.bench.common import HQ, D, H, kv_cache_bytes, randn_input, rel_err


# the first of each list is the default; the sweep of 2026-11 on an H200 picked them (results/bench)
FWD_TILES = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)]
BWD_TILES = [  # (dk/dv kernel, dq kernel)
    ((64, 128, 8, 2), (128, 64, 8, 2)),
    ((64, 64, 4, 2), (64, 64, 4, 2)),
    ((64, 64, 4, 3), (64, 64, 4, 3)),
    ((32, 128, 8, 2), (128, 32, 8, 2)),
    ((32, 64, 4, 3), (64, 32, 4, 3)),
]
DECODE_TILES = [(128, 4, 3), (64, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 2), (256, 4, 3)]


def sweep_tiles(T: int, T_decode: int, decode_batch: int = 16) -> list[dict]:
    """Time each tile candidate of our kernels (prefill at T, decode at T_decode); every candidate's
    result is compared with the first candidate's, so a tile that computes wrongly shows."""
    import torch
    import triton

    from nsa_eval.kernels.attention import decode, parallel

    def measure(kernel, label, fn, check):
        row = {"kernel": kernel, "tiles": label}
        try:
            out = fn()
            row["err_vs_first"] = check(out)
            row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        click.echo(f"  sweep {kernel:6s} {label:40s} " + (f"{row['ms']:8.3f} ms  err {row['err_vs_first']:.1e}" if "ms" in row else row["error"]))
        return row

    rows, first = [], {}

    def against_first(kernel):
        def check(out):
            outs = out if isinstance(out, tuple) else (out,)
            if kernel not in first:
                first[kernel] = [x.float() for x in outs]
                return 0.0
            return max(rel_err(x, r) for x, r in zip(outs, first[kernel]))

        return check

    scale = 1 / math.sqrt(D)
    q, k, v = randn_input(1, T, HQ, D), randn_input(1, T, H, D), randn_input(1, T, H, D)
    for tiles in FWD_TILES:
        t = parallel.Tiles(*tiles)
        rows.append(measure("fwd", str(tiles), lambda: parallel.attention_fwd(q, k, v, True, None, None, None, scale, t)[0],
                            against_first("fwd")))
    o, lse = parallel.attention_fwd(q, k, v, True, None, None, None, scale)
    do = torch.randn_like(o)
    for pair in BWD_TILES:
        t = (parallel.Tiles(*pair[0]), parallel.Tiles(*pair[1]))
        rows.append(measure("bwd", str(pair), lambda: parallel.attention_bwd(q, k, v, o, lse, do, True, None, None, None, scale, t),
                            against_first("bwd")))
    del q, k, v, o, lse, do
    torch.cuda.empty_cache()
    q, k_cache, v_cache = randn_input(decode_batch, HQ, D), randn_input(decode_batch, T_decode, H, D), randn_input(decode_batch, T_decode, H, D)
    lengths = torch.full((decode_batch,), T_decode, dtype=torch.int32, device="cuda")
    for tiles in DECODE_TILES:
        rows.append(measure("decode", str(tiles), lambda: decode.attention_decode_fwd(q, k_cache, v_cache, lengths, None, scale, tiles)[0],
                            against_first("decode")))
    for row in rows:
        if row["kernel"] == "decode" and "ms" in row:
            row["gbps"] = kv_cache_bytes(decode_batch, T_decode) / (row["ms"] * 1e-3) / 1e9
    torch.cuda.empty_cache()
    return rows
