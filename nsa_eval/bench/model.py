"""`nsa-eval bench model`: whole-model speed of an NSA transformer against the same transformer with full attention
through PyTorch SDPA (each backend asked for; the best is the baseline), on a GPU.

Per context length: prefill latency of one prompt, decode tokens/s of a batch of B sequences at that context (the
prompt's cache copied to B rows; each step a CUDA-graph replay through the model's forward, as generation runs it),
peak GPU memory of each, and the share of time in attention (the time that goes away when the attention of every
layer returns zeros, all else equal). Random weights: speed does not depend on them. The default model is the
paper's attention shape (hidden 2560, 64 query heads in 4 KV groups, d_k 192, d_v 128) with 12 layers.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import click

from nsa_eval.bench.common import card_slug, length_table
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT

PAPER_SHAPE = dict(vocab_size=32000, hidden_size=2560, num_hidden_layers=12, num_attention_heads=64,
                   num_key_value_heads=4, head_dim=192, v_head_dim=128, intermediate_size=6912,
                   max_position_embeddings=131072, **asdict(PAPER_LAYOUT), compression="mlp", compress_hidden_size=256,
                   shared_kv=False)
TARGETS = {"prefill": 3.0, "decode": 4.0}  # speedup aimed for at the longest length: NSA vs the best SDPA
DEVICE = "cuda"


def build_models(spec: str, layers: int | None) -> tuple[object, dict]:
    """(NSA config, {variant: sdpa backend or None}); spec 'paper' or nsa:PATH (its config, random weights)."""
    from nsa_eval.model_adapters.runtime.checkpoint import read_checkpoint
    from nsa_eval.model_adapters.runtime.config import ModelConfig

    if spec == "paper":
        fields = dict(PAPER_SHAPE)
    elif spec.startswith("nsa:"):
        config, _ = read_checkpoint(Path(spec[4:]).expanduser())
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    else:
        raise ValueError(f"--model {spec}: give 'paper' or nsa:PATH")
    if layers:
        fields["num_hidden_layers"] = layers
    return ModelConfig(**fields), fields


def make_model(fields: dict, attention: str, sdpa_backend: str | None, prefill_chunk: int | None = None):
    import torch

    from nsa_eval.model_adapters.runtime.config import ModelConfig
    from nsa_eval.model_adapters.runtime.model import Transformer

    with torch.device(DEVICE):
        model = Transformer(ModelConfig(**{**fields, "attention": attention}))
    model = model.to(torch.bfloat16).eval()
    model.sdpa_backend = sdpa_backend
    model.prefill_chunk = prefill_chunk
    return model


@contextmanager
def attention_removed(model):
    """Every layer's attention returns zeros (projections, cache writes, MLP and the rest unchanged): the model's
    attention-off switch (`Attention.skip_attention`, model_adapters/runtime/attention.py), set on every layer
    and cleared on leaving."""
    from nsa_eval.model_adapters.runtime.attention import Attention

    layers = [module for module in model.modules() if isinstance(module, Attention)]
    for layer in layers:
        layer.skip_attention = True
    try:
        yield
    finally:
        for layer in layers:
            layer.skip_attention = False


def time_prefill(model, T: int, repeats: int = 2, use_cache: bool = True) -> tuple[float, object]:
    """Fastest of `repeats` prefills of one T-token prompt (after a warm-up) in ms, and the last one's cache."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, T), device=DEVICE)
    model(ids, use_cache=use_cache, logits_to_keep=1)  # warm-up (compiles kernels on first use)
    best, cache = float("inf"), None
    for _ in range(repeats):
        cache = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, use_cache=use_cache, logits_to_keep=1)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
        cache = out.past_key_values
    return best, cache


def repeat_rows(model, cache, batch: int):
    """A cache of `batch` copies of a one-sequence cache (same tokens: the same work per row as different ones)."""
    import torch

    from nsa_eval.model_adapters.runtime.cache import SlotCache

    layers = [{k: v.repeat(batch, *([1] * (v.ndim - 1))) for k, v in layer.items()} for layer in cache.layers]
    copy = SlotCache(layers, cache.capacity)
    copy.lengths.copy_(cache.lengths.repeat(batch))
    copy.host_lengths = cache.host_lengths * batch
    torch.cuda.synchronize()
    return copy


def warmup_steps(config) -> int:
    """Decode steps before timing: both CUDA graphs (with and without a compressed block) captured, and replayed."""
    return config.block_stride + 4 if config.attention == "nsa" else 4


def time_decode(model, cache, steps: int) -> float:
    """Tokens/s over `steps` decode steps of every sequence (after warmup_steps: eager first steps, captures and
    replays)."""
    import torch

    batch = len(cache.host_lengths)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEVICE)
    for _ in range(warmup_steps(model.config)):
        model(ids, past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(ids, past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def bench_variant(name: str, fields: dict, attention: str, backend: str | None, T: int, batch: int, steps: int,
                  prefill_chunk: int | None = None) -> dict:
    """One row: prefill, decode and their attention shares at one length. An error (out of memory, a backend
    refusing) becomes a field of the stage it stopped; what was measured before it stays."""
    import torch

    row: dict = {"impl": name, "T": T, "batch": batch}
    model = cache = rows = None
    stage = "prefill"
    try:
        model = make_model(fields, attention, backend, prefill_chunk)
        model.decode_reserve = 2 * (steps + warmup_steps(model.config)) + 16  # both decodes fit without growing
        torch.cuda.reset_peak_memory_stats()
        row["prefill_ms"], cache = time_prefill(model, T)
        row["prefill_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with attention_removed(model):
            no_attention_ms, _ = time_prefill(model, T, use_cache=False)
        row["prefill_attention_share"] = max(0.0, 1 - no_attention_ms / row["prefill_ms"])
        stage = "decode"
        rows = repeat_rows(model, cache, batch)
        cache = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row["decode_tokens_per_s"] = time_decode(model, rows, steps)
        row["decode_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with attention_removed(model):
            rows.drop_graphs()  # capture the steps again, without attention
            no_attention_tps = time_decode(model, rows, steps)
        row["decode_attention_share"] = max(0.0, 1 - row["decode_tokens_per_s"] / no_attention_tps)
    except Exception as error:  # one failing row must not end the run
        message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        row["error"] = f"{stage}: {type(error).__name__}: {message}"
    if backend:
        from nsa_eval.model_adapters.runtime.ops import SDPA_WAYS, sdpa_value_width

        ways = {kind: way for (b, kind), way in SDPA_WAYS.items() if b == backend}  # prompt, slice, decode
        width = sdpa_value_width(backend, fields["head_dim"], fields["v_head_dim"], torch.device(DEVICE),
                                 torch.bfloat16)
        if width != fields["v_head_dim"]:
            ways["V"] = f"zero-padded to {width} (cache and prompt)"
        row["sdpa_ways"] = ways
    del model, cache, rows
    torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """NSA rows get prefill and decode speed-ups over the best full-attention row at the same length."""
    for r in rows:
        if r["impl"] != "nsa":
            continue
        for key, better, what in (("prefill_ms", min, "prefill"), ("decode_tokens_per_s", max, "decode")):
            full = [f for f in rows if f["T"] == r["T"] and f["impl"] != "nsa" and key in f]
            if key in r and full:
                best = better(full, key=lambda f: f[key])
                ratio = best[key] / r[key] if what == "prefill" else r[key] / best[key]
                r[f"{what}_speedup"], r[f"{what}_baseline"] = ratio, best["impl"]


def format_report(rows: list[dict], lengths: list[int], header: str) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cell = {(r["impl"], r["T"]): r for r in rows}
    tables = []
    for title, fmt in (
        ("prefill of one prompt: ms (share in attention; peak GiB)",
         lambda r: f"{r['prefill_ms']:.1f} ({100 * r['prefill_attention_share']:.0f}%; {r['prefill_peak_gb']:.1f})"
                   + (f", {r['prefill_speedup']:.2f}x vs {r['prefill_baseline']}" if "prefill_speedup" in r else "")),
        (f"decode, batch {rows[0]['batch']}: tokens/s (share in attention; peak GiB)",
         lambda r: f"{r['decode_tokens_per_s']:.0f} ({100 * r['decode_attention_share']:.0f}%; "
                   f"{r['decode_peak_gb']:.1f})"
                   + (f", {r['decode_speedup']:.2f}x vs {r['decode_baseline']}" if "decode_speedup" in r else "")),
    ):
        def text(impl: str, t: int, fmt=fmt) -> str:
            r = cell.get((impl, t))
            try:
                return "" if r is None else fmt(r)
            except KeyError:  # the stage this table shows did not finish
                return "error"

        tables.append("\n".join(length_table(f"**{title}**", impls, lengths, text)))
    notes = sorted({f"- {r['impl']} T={r['T']}: {r['error']}" for r in rows if "error" in r})
    notes += sorted({f"- {r['impl']}: SDPA called as {r['sdpa_ways']}" for r in rows if r.get("sdpa_ways")})
    longest = max(lengths)
    verdict = []
    for r in rows:
        if r["impl"] != "nsa" or r["T"] != longest:
            continue
        for what, target in TARGETS.items():
            if f"{what}_speedup" in r:
                got = r[f"{what}_speedup"]
                verdict.append(f"- target {what} >= {target:.0f}x at T={longest // 1024}k: {got:.2f}x "
                               f"({'met' if got >= target else 'NOT met'})")
    return header + "\n\n" + "\n\n".join(tables) + "\n\n" + "\n".join(verdict + notes) + "\n"


@click.command("model")
@click.option("--model", "model_spec", default="paper", show_default=True,
              help="'paper' (the paper's attention shape, random weights) or nsa:PATH (that checkpoint's config, "
                   "random weights); the baseline is the same config with full attention.")
@click.option("--lengths", default="8k,16k,32k,64k", show_default=True, help="Context lengths.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per decode step.")
@click.option("--layers", type=click.IntRange(min=1), help="Override the number of layers.")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=1), help="Timed decode steps.")
@click.option("--baselines", default="flash,cudnn", show_default=True,
              help="SDPA backends for the full-attention model (flash, cudnn, efficient, math).")
@click.option("--prefill-chunk", type=click.IntRange(min=0),
              help="NSA prompt tokens per prefill slice over the cache (0: one pass); default: the model's (8192 on CUDA). "
                   "The full-attention baseline always prefills in one pass (its fastest).")
@click.option("--out", "out_dir", default="results/bench", show_default=True, type=click.Path(file_okay=False),
              help="Folder for model-<card>.json and .md.")
def model_command(model_spec: str, lengths: str, batch: int, layers: int | None, steps: int, baselines: str,
                  prefill_chunk: int | None, out_dir: str) -> None:
    """Prefill latency, decode tokens/s, peak memory and attention share: NSA model vs full attention (SDPA)."""
    import torch
    import triton

    from nsa_eval.util import parse_int_list

    if not torch.cuda.is_available():
        raise ValueError("bench model needs a CUDA GPU; none is visible to torch here")
    lengths_list = parse_int_list(lengths, "--lengths")
    backends = [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ("flash", "cudnn", "efficient", "math")]
    if unknown:
        raise ValueError(f"--baselines: unknown SDPA backend {unknown[0]}; use flash, cudnn, efficient or math")
    config, fields = build_models(model_spec, layers)
    device_name = torch.cuda.get_device_name()
    card = card_slug(device_name)
    click.echo(f"device: {device_name} | torch {torch.__version__} | triton {triton.__version__}")

    variants = [("nsa", "nsa", None)] + [(f"full sdpa {b}", "full", b) for b in backends]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, attention, backend in variants:  # NSA first: its rows matter most if a baseline row fails
        for T in lengths_list:
            # the baseline at its best: one pass (SDPA's lower-right causal mask for a slice after cached tokens
            # is slower: cuDNN 3521 vs 2091 ms at 64k on an H200)
            row = bench_variant(name, fields, attention, backend, T, batch, steps,
                                prefill_chunk if attention == "nsa" else 0)
            rows.append(row)
            click.echo(f"  {name:18s} T={T:6d} " + "  ".join(
                f"{k} {row[k]:.4g}" for k in ("prefill_ms", "prefill_attention_share", "decode_tokens_per_s",
                                                "decode_attention_share") if k in row) + f"  {row.get('error', '')}")
            write_results(out, card, rows, lengths_list, model_spec, fields, config, batch, steps, device_name,
                          prefill_chunk)
    report = write_results(out, card, rows, lengths_list, model_spec, fields, config, batch, steps, device_name,
                           prefill_chunk)
    click.echo("\n" + report)
    click.echo(f"wrote {out / f'model-{card}.json'} and .md")
    if any("error" in r for r in rows if r["impl"] == "nsa"):
        sys.exit(1)


def write_results(out: Path, card: str, rows: list[dict], lengths_list: list[int], model_spec: str, fields: dict,
                  config, batch: int, steps: int, device_name: str, prefill_chunk: int | None = None) -> str:
    """model-<card>.json and .md from the rows so far (rewritten after every row: a cut run keeps what it has)."""
    import torch
    import triton

    from nsa_eval.model_adapters.runtime.model import DEFAULT_PREFILL_CHUNK
    from nsa_eval.store import git_sha

    add_ratios(rows)
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    shape = (f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} query "
             f"heads / {config.num_key_value_heads} KV heads, d_k {config.head_dim}, d_v {config.v_head_dim}, MLP "
             f"{config.intermediate_size}, vocab {config.vocab_size}; NSA l={config.block_len}, "
             f"d={config.block_stride}, "
             f"l'={config.select_len}, n={config.num_selected}, w={config.window}, compression {config.compression}, "
             f"{'shared' if config.shared_kv else 'independent'} K/V")
    header = (f"# Model speed on {device_name}\n\n`nsa-eval bench model --model {model_spec}`: {shape}. bfloat16, "
              f"random weights. torch {torch.__version__}, triton {triton.__version__}, commit {git_sha()}. "
              f"Prefill: one prompt ({f'NSA in slices of {chunk} tokens over the cache' if chunk else 'NSA in one pass'}"
              f", full attention in one pass), fastest of 2 after a warm-up. Decode: {steps} steps of batch {batch} at the given context (CUDA-graph "
              f"replays through the model's forward; the SDPA rows attend over a fixed T+1 keys per step). Attention "
              f"share: 1 - time without attention / time with it.")
    report = format_report(rows, lengths_list, header)
    payload = {"device": device_name, "card": card, "torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "model": model_spec, "config": fields, "batch": batch,
               "steps": steps, "prefill_chunk": chunk, "git_sha": git_sha(), "rows": rows}
    (out / f"model-{card}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"model-{card}.md").write_text(report)
    return report
