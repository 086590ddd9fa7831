"""`nsa-eval bench eval`: evaluation speed end to end on one GPU, the native engine against transformers.

Random weights (speed does not depend on them) in two shapes: a 1.2B Llama (hidden 2048, 16 layers, 32/8 heads,
MLP 8192, vocab 49152, tied embeddings) with full attention and with training-free sparse attention, and the NSA
paper's attention shape (12 layers) with NSA beside the same shape with full attention. Every model is a real
checkpoint folder (save_pretrained, a real tokenizer beside it) loaded the way `nsa-eval run` loads it.

Parts (--parts):
- points: decode tokens/s of B samples at context L (one request with n = B samples: one prefill, B samples decoding;
  the engine's step time over the decode only) and prefill ms of one prompt, against the bounds: decode reads the
  weights and every row's KV (NSA: compressed blocks, selected blocks, window; sparse: block means and the budget)
  at the measured copy bandwidth; prefill does 2 * params * T + the attention FLOPs at the measured bf16 rate.
- niah: needle-in-a-haystack through the runner (`nsa_eval.runner.evaluate`, as `nsa-eval run`): wall time, per-length
  prefill and decode per sample, and the slowest sample's per-token time over the median (mid-run compiles show).
- longgen: the AIME-like workload, P prompts of L tokens x n samples x N new tokens through generate(), on the
  engine and, at a smaller scale given by --hf-scale, through transformers' own `generate` (batch = n samples).
Results: results/bench/eval-<card>.md and .json (rewritten after every part: a cut run keeps what it has).
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from nsa_eval.bench.common import card_slug, copy_bandwidth
from nsa_eval.kernels.nsa.layout import PAPER_LAYOUT

LLAMA_1B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
NSA_SHAPE = dict(vocab_size=49152, hidden_size=2560, num_hidden_layers=12, num_attention_heads=64,
                 num_key_value_heads=4, head_dim=192, v_head_dim=128, intermediate_size=6912,
                 max_position_embeddings=131072, **asdict(PAPER_LAYOUT), compression="mlp", compress_hidden_size=256,
                 shared_kv=False, eos_token_id=2)
VARIANTS = ("llama-full", "llama-sparse", "nsa", "nsa-shape-full")


def build_checkpoints(root: Path, tokenizer_dir: Path, variants: list[str], device: str = "cuda",
                      llama_shape: dict | None = None, nsa_shape: dict | None = None) -> dict[str, Path]:
    """Random-weight checkpoint folders (bfloat16) with the tokenizer beside them: llama, nsa, nsa-full. The weights
    are drawn on `device`; llama_shape / nsa_shape replace LLAMA_1B / NSA_SHAPE (`bench suite --shapes tiny`)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nsa_eval.model_adapters.runtime.checkpoint import save_pretrained
    from nsa_eval.model_adapters.runtime.config import ModelConfig
    from nsa_eval.model_adapters.runtime.model import Transformer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    folders = {}
    if any(v.startswith("llama") for v in variants):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**(llama_shape or LLAMA_1B))).to(torch.bfloat16)
        folders["llama"] = root / "llama-1b"
        model.save_pretrained(folders["llama"])
        del model
    for name, attention in (("nsa", "nsa"), ("nsa-full", "full")):
        if name not in variants and not (name == "nsa-full" and "nsa-shape-full" in variants):
            continue
        config = ModelConfig(**(nsa_shape or NSA_SHAPE), attention=attention)
        with torch.device(device):
            model = Transformer(config).init_weights(std=0.02, seed=0)
        folders[name] = root / name
        save_pretrained(model.to(torch.bfloat16), folders[name])
        del model
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return folders


def load_variant(name: str, folders: dict[str, Path], batch: int, device: str | None = None):
    """A variant's checkpoint on the native engine, loaded as `nsa-eval run` loads it (load_native; device None:
    cuda when present, dtype: bfloat16 on cuda, float32 on the CPU)."""
    from nsa_eval.model_adapters.native import load_native
    from nsa_eval.model_adapters.runtime.config import SparseSettings

    if name == "llama-full":
        return load_native(folders["llama"], batch_size=batch, name=name, device=device)
    if name == "llama-sparse":
        return load_native(folders["llama"], batch_size=batch, name=name, attention="sparse", sparse=SparseSettings(),
                           device=device)
    if name == "nsa":
        return load_native(folders["nsa"], batch_size=batch, name=name, device=device)
    return load_native(folders["nsa-full"], batch_size=batch, name=name, device=device)


def random_prompt(tokenizer: Any, tokens: int, rng: random.Random) -> str:
    """Text of about `tokens` tokens (random ids decoded, re-encoded and cut to the length)."""
    ids = [rng.randrange(1000, 40000) for _ in range(tokens + tokens // 4 + 8)]
    ids = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


# ---- bounds ---------------------------------------------------------------------------------------------------


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_step(config, context: int) -> float:
    """Bytes of cache one row's decode step reads at `context` tokens, over all layers."""
    c = config
    per_token = c.num_key_value_heads * (c.head_dim + c.v_head_dim) * 2  # bf16 K and V, one layer
    if c.attention == "full":
        tokens = context if c.sliding_window is None else min(context, c.sliding_window)
        return c.num_hidden_layers * tokens * per_token
    blocks = max(0, (context - c.block_len) // c.block_stride + 1)
    selected = min(context, c.num_selected * c.select_len)
    window = min(context, c.window)
    compressed = blocks * c.num_key_value_heads * (c.head_dim if c.attention == "sparse" else c.head_dim + c.v_head_dim) * 2
    return c.num_hidden_layers * (compressed + (selected + window) * per_token)


def prefill_flops(model, tokens: int) -> float:
    """2 * non-embedding params * T + causal attention (QK^T and PV over half the T x T scores)."""
    c = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed"))
    attention = 2 * c.num_hidden_layers * c.num_attention_heads * (c.head_dim + c.v_head_dim) * tokens * tokens / 2
    return 2 * params * tokens + attention


def matmul_rate() -> float:
    """Measured bf16 GEMM FLOP/s (8192^3)."""
    import torch
    import triton

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3)


# ---- parts ----------------------------------------------------------------------------------------------------


def decode_point(lm, context: int, batch: int, steps: int, rng: random.Random, bw: float) -> dict:
    """Decode tokens/s of `batch` rows at `context` tokens: one request, n = batch sampled rows from one prefill."""
    from nsa_eval.model_adapters.base import GenerationRequest

    prompt = random_prompt(lm.tokenizer, context, rng)
    before = (lm.stats.decode_s, lm.stats.decode_tokens, lm.stats.decode_steps)
    [out] = lm.generate([GenerationRequest(prompt=prompt, max_new_tokens=steps, temperature=1.0, n=batch, seed=1)])
    seconds = lm.stats.decode_s - before[0]
    tokens = lm.stats.decode_tokens - before[1]
    step_count = lm.stats.decode_steps - before[2]
    rate = tokens / seconds
    mean_context = out.prompt_tokens + steps / 2
    bytes_step = weight_bytes(lm.model) + batch * kv_bytes_per_step(lm.model.config, int(mean_context))
    bound = batch * bw / bytes_step  # a step only reads: at the copy rate (bytes read + written per second)
    return {"part": "decode", "context": out.prompt_tokens, "batch": batch, "steps": step_count,
            "tokens_per_s": rate, "step_ms": 1e3 * seconds / step_count, "bound_tokens_per_s": bound,
            "share_of_bound": rate / bound}


def prefill_point(lm, context: int, rng: random.Random, flops_rate: float, repeats: int = 2) -> dict:
    from nsa_eval.model_adapters.base import GenerationRequest

    prompt = random_prompt(lm.tokenizer, context, rng)
    times = []
    for _ in range(repeats):
        [out] = lm.generate([GenerationRequest(prompt=prompt, max_new_tokens=1)])
        times.append(out.prefill_ms)
    ms = min(times)
    row = {"part": "prefill", "context": out.prompt_tokens, "prefill_ms": ms}
    if lm.model.config.attention == "full":
        bound_ms = 1e3 * prefill_flops(lm.model, out.prompt_tokens) / flops_rate
        row.update(bound_ms=bound_ms, share_of_bound=bound_ms / ms)
    return row


def niah_part(lm, spec: str, lengths: list[int], samples: int, root: Path) -> dict:
    """NIAH through the runner into a temporary run folder: wall time and per-sample timings."""
    from nsa_eval import store as run_store
    from nsa_eval.records import read_samples, samples_file
    from nsa_eval.run_config import RunConfig
    from nsa_eval.runner import evaluate
    from nsa_eval.tasks.niah import NeedleInAHaystack

    task = NeedleInAHaystack(lengths=lengths, samples_per_cell=samples)
    folder = root / f"niah-{lm.name}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    config = RunConfig(model_spec=spec, tasks=("niah",), batch_size=lm.batch_size)
    evaluate(lm, {"niah": task}, run_store.RunStore(folder), config, show_progress=False)
    wall = time.perf_counter() - start
    records = [r.to_json() for r in read_samples(samples_file(folder, "niah"), strict=True)]
    by_length: dict[int, dict] = {}
    for length in lengths:
        rows = [r for r in records if r["breakdown"]["length"] == length]
        per_token = sorted(1e3 / r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"] > 0)
        prefill = sorted(r["prefill_ms"] / r["prompt_tokens"] for r in rows)
        by_length[length] = {
            "samples": len(rows), "prefill_ms_mean": sum(r["prefill_ms"] for r in rows) / len(rows),
            "decode_ms_per_token_median": per_token[len(per_token) // 2] if per_token else None,
            "decode_slowest_over_median": per_token[-1] / per_token[len(per_token) // 2] if per_token else None,
            "prefill_slowest_over_median": prefill[-1] / prefill[len(prefill) // 2]}
    return {"part": "niah", "wall_s": wall, "samples": len(records), "compile_s": lm.compile_s,
            "by_length": by_length}


def longgen_part(lm, prompts: int, prompt_tokens: int, n: int, new_tokens: int, rng: random.Random) -> dict:
    """P prompts x n samples x N new tokens through generate() (temperature 0.6): wall time and tokens/s."""
    from nsa_eval.model_adapters.base import GenerationRequest

    requests = [GenerationRequest(prompt=random_prompt(lm.tokenizer, prompt_tokens, rng), max_new_tokens=new_tokens,
                                  temperature=0.6, top_p=0.95, n=n, seed=i) for i in range(prompts)]
    start = time.perf_counter()
    outputs = lm.generate(requests)
    wall = time.perf_counter() - start
    tokens = sum(sum(o.new_tokens) for o in outputs)
    return {"part": "longgen", "prompts": prompts, "prompt_tokens": prompt_tokens, "n": n, "new_tokens": new_tokens,
            "wall_s": wall, "generated": tokens, "tokens_per_s": tokens / wall}


def hf_generate_part(folder: Path, prompts: int, prompt_tokens: int, n: int, new_tokens: int,
                     rng: random.Random) -> dict:
    """The same workload through transformers' own generate (sdpa attention, its default cache), batch = n."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).cuda().eval()
    texts = [random_prompt(tokenizer, prompt_tokens, rng) for _ in range(prompts)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, num_return_sequences=n, pad_token_id=tokenizer.eos_token_id)
        tokens += (out.shape[1] - ids.shape[1]) * n
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return {"part": "longgen", "engine": "transformers generate", "prompts": prompts, "prompt_tokens": prompt_tokens,
            "n": n, "new_tokens": new_tokens, "wall_s": wall, "generated": tokens, "tokens_per_s": tokens / wall}


# ---- report ---------------------------------------------------------------------------------------------------


def format_report(results: dict) -> str:
    lines = [f"# Evaluation speed on {results['device']}", "",
             f"`nsa-eval bench eval {results['argv']}`: random bfloat16 weights; 1.2B Llama shape "
             f"(hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 49152) and the NSA paper's attention shape "
             f"(12 layers, vocab 49152). torch {results['torch']}, triton {results['triton']}, commit "
             f"{results['git_sha']}. Copy bandwidth {results['copy_bandwidth'] / 1e9:.0f} GB/s (read + write), bf16 "
             f"GEMM {results['matmul_rate'] / 1e12:.0f} TFLOP/s.", ""]
    rows = results["rows"]
    decode = [r for r in rows if r["part"] == "decode"]
    if decode:
        lines += _table("**decode** (tokens/s of all rows; step ms; share of the bandwidth bound)",
                        ["model", "context", "batch", "tokens/s", "step ms", "bound tokens/s", "share"],
                        [[r["model"], r["context"], r["batch"], f"{r['tokens_per_s']:.0f}", f"{r['step_ms']:.2f}",
                          f"{r['bound_tokens_per_s']:.0f}", f"{100 * r['share_of_bound']:.0f}%"] for r in decode])
    prefill = [r for r in rows if r["part"] == "prefill"]
    if prefill:
        lines += _table("**prefill** (one prompt, fastest of 2)", ["model", "context", "ms", "share of the FLOP bound"],
                        [[r["model"], r["context"], f"{r['prefill_ms']:.1f}", _percent(r.get("share_of_bound"))]
                         for r in prefill])
    niah = [r for r in rows if r["part"] == "niah"]
    if niah:
        lines += _table("**NIAH through the runner**",
                        ["model", "samples", "wall s", "compile s", "length", "prefill ms", "decode ms/token (median)",
                         "slowest / median decode", "slowest / median prefill per token"],
                        [[r["model"], r["samples"], f"{r['wall_s']:.1f}", f"{r['compile_s']:.1f}", length,
                          f"{b['prefill_ms_mean']:.0f}", f"{b['decode_ms_per_token_median'] or 0:.2f}",
                          f"{b['decode_slowest_over_median'] or 0:.2f}", f"{b['prefill_slowest_over_median']:.2f}"]
                         for r in niah for length, b in r["by_length"].items()])
    longgen = [r for r in rows if r["part"] == "longgen"]
    if longgen:
        lines += _table("**long generation** (P prompts x n samples x N new tokens)",
                        ["model", "engine", "P x L", "n x N", "wall s", "tokens/s"],
                        [[r["model"], r.get("engine", "native"), f"{r['prompts']} x {r['prompt_tokens']}",
                          f"{r['n']} x {r['new_tokens']}", f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:.0f}"]
                         for r in longgen])
    return "\n".join(lines) + "\n"


def _table(heading: str, columns: list[str], rows: list[list]) -> list[str]:
    """A Markdown table under its heading line, then a blank line (eval-<card>.md's tables: a row per result)."""
    return ([heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""])


def _percent(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.0f}%"


@click.command("eval")
@click.option("--variants", default=",".join(VARIANTS), show_default=True,
              help=f"Models to run, of {', '.join(VARIANTS)}.")
@click.option("--parts", default="points,niah,longgen", show_default=True, help="points, niah, longgen.")
@click.option("--decode-points", default="32k:16,32k:1,64k:16,64k:1", show_default=True,
              help="context:batch pairs for decode tokens/s.")
@click.option("--prefill-points", default="32k,64k", show_default=True, help="Prompt lengths for prefill ms.")
@click.option("--decode-steps", default=64, show_default=True, type=click.IntRange(min=2))
@click.option("--niah-lengths", default="16k,32k,64k", show_default=True)
@click.option("--niah-samples", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--longgen", default="8x1k:16x2k,8x32k:16x2k", show_default=True,
              help="Workloads PxL:nxN (P prompts of L tokens, n samples of N new tokens), comma-separated.")
@click.option("--hf-scale", default="2x1k:16x512", show_default=True,
              help="transformers' generate on the Llama at this workload (empty: skip); the engine runs it too.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1), help="Engine rows.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path),
              help="A tokenizer folder with vocab <= 49152 (default: the embedded SmolLM2's).")
@click.option("--out", "out_dir", default="results/bench", show_default=True, type=click.Path(file_okay=False))
def eval_command(variants: str, parts: str, decode_points: str, prefill_points: str, decode_steps: int,
                 niah_lengths: str, niah_samples: int, longgen: str, hf_scale: str, batch: int,
                 tokenizer_dir: Path | None, out_dir: str) -> None:
    """Evaluation speed end to end (module docstring): the native engine vs transformers, on a GPU."""
    import sys

    import torch
    import triton

    from nsa_eval.util import parse_int_list
    from nsa_eval.store import git_sha

    if not torch.cuda.is_available():
        raise ValueError("bench eval needs a CUDA GPU; none is visible to torch here")
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown[0]}; use {', '.join(VARIANTS)}")
    part_set = {p.strip() for p in parts.split(",") if p.strip()}
    if tokenizer_dir is None:
        from nsa_eval.model_adapters.smollm2 import plain_checkpoint

        tokenizer_dir = plain_checkpoint()
    device = torch.cuda.get_device_name()
    card = card_slug(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": device, "card": card, "torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "git_sha": git_sha(), "argv": " ".join(sys.argv[3:]),
               "copy_bandwidth": copy_bandwidth(), "matmul_rate": matmul_rate(), "rows": []}
    click.echo(f"device: {device} | copy {results['copy_bandwidth'] / 1e9:.0f} GB/s | bf16 "
               f"{results['matmul_rate'] / 1e12:.0f} TFLOP/s")

    def record(model: str, row: dict) -> None:
        row["model"] = model
        results["rows"].append(row)
        click.echo(f"  {model:16s} " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                    for k, v in row.items() if k != "by_length"}))
        (out / f"eval-{card}.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / f"eval-{card}.md").write_text(format_report(results))

    root = Path(tempfile.mkdtemp(prefix="nsa-eval-bench-"))
    try:
        folders = build_checkpoints(root, tokenizer_dir, chosen)
        rng = random.Random(0)
        for name in chosen:
            lm = load_variant(name, folders, batch)
            if "points" in part_set:
                for point in [p for p in decode_points.split(",") if p.strip()]:
                    context, rows = point.split(":")
                    record(name, decode_point(lm, parse_int_list(context, "--decode-points")[0], int(rows),
                                              decode_steps, rng, results["copy_bandwidth"]))
                for context in parse_int_list(prefill_points, "--prefill-points"):
                    record(name, prefill_point(lm, context, rng, results["matmul_rate"]))
            if "niah" in part_set:
                record(name, niah_part(lm, f"bench:{name}", parse_int_list(niah_lengths, "--niah-lengths"),
                                       niah_samples, root))
            if "longgen" in part_set:
                for workload in [w for w in longgen.split(",") if w.strip()]:
                    record(name, longgen_part(lm, *parse_workload(workload), rng))
                if hf_scale and name == "llama-full":
                    record(name, longgen_part(lm, *parse_workload(hf_scale), rng))
            del lm
            torch.cuda.empty_cache()
        if "longgen" in part_set and hf_scale and "llama-full" in chosen:
            record("llama-full", hf_generate_part(folders["llama"], *parse_workload(hf_scale), rng))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    click.echo("\n" + format_report(results))
    click.echo(f"wrote {out / f'eval-{card}.json'} and .md")


def parse_workload(text: str) -> tuple[int, int, int, int]:
    """'8x1k:16x2k' -> (prompts 8, prompt tokens 1024, n 16, new tokens 2048)."""
    from nsa_eval.util import parse_int_list

    try:
        left, right = text.strip().split(":")
        prompts, length = left.split("x")
        n, new = right.split("x")
        return (int(prompts), parse_int_list(length, "--longgen")[0], int(n), parse_int_list(new, "--longgen")[0])
    except ValueError:
        raise ValueError(f"workload {text!r}: write PxL:nxN, e.g. 8x1k:16x2k") from None
