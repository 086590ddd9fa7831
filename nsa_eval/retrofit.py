"""`nsa-eval retrofit`: a full-attention Llama-family checkpoint -> an NSA checkpoint by distillation
(model_adapters/retrofit.py says how). The output folder holds the corpus file (unless --corpus names one), the
resumable state (state.pt), the step log (log.jsonl), the shipped file (retrofit.safetensors: what training changed,
float16, with the recipe and everything needed to reproduce it) and the NSA checkpoint built from it (checkpoint/,
load it as nsa:OUT/checkpoint). Run the same command again to resume."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import click

from nsa_eval.model_adapters.base import ModelLoadError
from nsa_eval.model_adapters.retrofit import Recipe

RECIPE_HELP = {
    "block": "tokens per block (compression and selection, l = d = l')", "selected": "selected blocks per query (n)",
    "window": "sliding-window tokens (w; 0: no window branch)", "lora_rank": "rank of the low-rank updates of q/k/v/o",
    "seq_len": "tokens per training sequence", "batch": "sequences per step", "warmup_steps": "stage 1 steps",
    "steps": "stage 2 steps", "lr": "learning rate of the low-rank updates", "gate_lr": "learning rate of the gates",
    "mass_weight": "weight of the block-mass KL", "probes": "query positions per sequence for the block-mass KL",
    "seed": "seed of the data order, probes and initial weights",
    "gate_init": "gates at the start, compressed,selected,window, by a least-squares fit of g_proj on one batch; "
                 "'zero': zero weights (every gate 0.5)",
}


def recipe_options(command):
    for f in reversed([f for f in fields(Recipe) if f.name != "base"]):
        command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=type(f.default), default=f.default,
                               show_default=True, help=RECIPE_HELP[f.name])(command)
    return command


def base_folder(spec: str) -> Path:
    """The base checkpoint folder of `smollm2` or `hf:PATH` (a local Llama-family transformers checkpoint)."""
    if spec == "smollm2":
        from nsa_eval.model_adapters.smollm2 import plain_checkpoint

        return plain_checkpoint()
    kind, _, target = spec.partition(":")
    if kind != "hf" or not target:
        raise ValueError(f"--base {spec!r}: give smollm2 or hf:PATH (a local Llama-family checkpoint folder)")
    folder = Path(target).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--base {spec}: {folder} holds no config.json; give a checkpoint folder")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    from nsa_eval.model_adapters.runtime.weights import HF_MODEL_TYPES

    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"--base {spec}: model_type {model_type!r} is not Llama-family ({', '.join(HF_MODEL_TYPES)}); "
                         "retrofit needs one")
    return folder


@click.command()
@click.option("--base", default="smollm2", show_default=True,
              help="The full-attention model: smollm2 or hf:PATH (a Llama-family checkpoint folder).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder (run the same command again to resume).")
@click.option("--corpus", default=None, type=click.Path(dir_okay=False),
              help="Training token file (built there from this Python's standard library if it does not exist; "
                   "default OUT/corpus.bin).")
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--save-every", default=50, show_default=True, help="Steps between resumable saves.")
@click.option("--max-file-mb", default=10.0, show_default=True,
              help="Refuse a recipe whose retrofit file (what ships) would be larger.")
@recipe_options
def retrofit(base: str, out: str, corpus: str | None, device: str | None, save_every: int, max_file_mb: float,
             **recipe_fields) -> None:
    """Turn a full-attention checkpoint into an NSA checkpoint by distillation (our kernels' backward on CUDA)."""
    import torch

    from nsa_eval.model_adapters.retrofit import Progress, batch_at, fit_gates, load_state, student_from_base, train
    from nsa_eval.model_adapters.retrofit_file import (base_fingerprint, build_model, probe_logits, read_delta,
                                                       save_delta, write_checkpoint)
    from nsa_eval.model_adapters.retrofit_corpus import build_corpus, read_corpus
    from nsa_eval.model_adapters.runtime.checkpoint import from_pretrained
    from nsa_eval.store import git_sha, versions

    recipe = Recipe(base=base, **recipe_fields)
    recipe.check()
    folder = base_folder(base)
    from nsa_eval.model_adapters.retrofit import delta_bytes
    from nsa_eval.model_adapters.runtime.checkpoint import read_config

    try:
        base_config = read_config(folder)
    except ModelLoadError as error:
        raise ValueError(str(error)) from None
    size = delta_bytes(base_config, recipe) / 1e6
    if size > max_file_mb:
        raise ValueError(f"the retrofit file would be {size:.1f} MB, over --max-file-mb {max_file_mb:g}; lower "
                         "--lora-rank")
    if recipe.seq_len > base_config.max_position_embeddings:
        raise ValueError(f"--seq-len {recipe.seq_len} exceeds the base's {base_config.max_position_embeddings} "
                         "positions; lower it")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus_path = Path(corpus) if corpus else out_dir / "corpus.bin"
    if corpus_path.exists():
        data = read_corpus(corpus_path)
    else:
        click.echo(f"retrofit: building the corpus {corpus_path} from this Python's standard library ...", err=True)
        data = build_corpus(tokenizer, corpus_path)
    if data.header["vocab_size"] != len(tokenizer):
        raise ValueError(f"{corpus_path} was tokenized for a vocabulary of {data.header['vocab_size']}, the base has "
                         f"{len(tokenizer)}; give another --corpus")
    click.echo(f"retrofit: corpus {data.header['tokens']:,} tokens, sha256 {data.sha256[:16]}; loading {base} on "
               f"{device} ...", err=True)
    try:
        base_float32 = from_pretrained(folder, dtype=torch.float32)  # on the CPU: the rebuild's base, fingerprinted
    except ModelLoadError as error:
        raise ValueError(str(error)) from None
    fingerprint = base_fingerprint(base_float32.state_dict())  # of the float32 weights a rebuild checks against
    student = student_from_base(base_float32, recipe, device=device, dtype=dtype)
    state_path = out_dir / "state.pt"
    progress, optimizer_state = (load_state(student, state_path) if state_path.exists() else (Progress(), None))
    if progress.step:
        click.echo(f"retrofit: resuming at step {progress.step} of {recipe.total_steps}", err=True)
    elif recipe.gate_targets:
        fit_ids, _ = batch_at(data.ids, recipe, recipe.total_steps)  # a batch no step trains on
        sums = fit_gates(student, fit_ids.to(device), recipe.gate_targets)
        click.echo(f"retrofit: gates fitted to {recipe.gate_init}: per-layer gate sums {min(sums):.3f}-"
                   f"{max(sums):.3f}", err=True)
    log = open(out_dir / "log.jsonl", "a", encoding="utf-8")
    started = time.monotonic()
    first_step = progress.step

    def on_step(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        done = record["step"] - first_step
        rate = (time.monotonic() - started) / max(done, 1)
        left = rate * (recipe.total_steps - record["step"])
        if record["step"] % 10 == 0 or record["step"] in (first_step + 1, recipe.total_steps):
            click.echo(f"retrofit: step {record['step']}/{recipe.total_steps} stage {record['stage']} loss "
                       f"{record['loss']:.4f} (distill {record['distill_kl']:.4f}, mass {record['mass_kl']:.4f}) "
                       f"{record['tokens_per_s']:,.0f} tokens/s, ETA {int(left // 60)}:{int(left % 60):02d}", err=True)

    try:
        train(student, data.ids, state_path, progress, on_step, save_every=save_every, optimizer_state=optimizer_state)
    finally:
        log.close()
    tail = progress.log[-20:]
    record = {
        "recipe": asdict(recipe), "base": base, "base_fingerprint": fingerprint, "corpus": data.header,
        "steps": progress.step, "train_seconds": round(progress.seconds, 1),
        "final": {k: round(sum(r[k] for r in tail) / len(tail), 5) for k in ("distill_kl", "mass_kl")},
        "first": {k: progress.log[0][k] for k in ("distill_kl", "mass_kl")} if progress.log else {},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype).split(".")[-1],
        "versions": versions(), "git_sha": git_sha(), "command": " ".join(sys.argv),
    }
    delta_path = out_dir / "retrofit.safetensors"
    save_delta(student, delta_path, record)
    built = build_model(base_float32, *read_delta(delta_path))  # as users rebuild it
    record["probe"] = probe_logits(built, tokenizer)  # a rebuild is checked against these
    save_delta(student, delta_path, record)
    write_checkpoint(built, record, folder, out_dir / "checkpoint")
    click.echo(f"retrofit: {progress.step} steps in {progress.seconds / 60:.1f} min; distill KL "
               f"{record['first'].get('distill_kl', float('nan')):.4f} -> {record['final']['distill_kl']:.4f}, "
               f"mass KL {record['first'].get('mass_kl', float('nan')):.4f} -> {record['final']['mass_kl']:.4f}; "
               f"wrote {delta_path} ({delta_path.stat().st_size / 1e6:.1f} MB) and nsa:{out_dir / 'checkpoint'}")

