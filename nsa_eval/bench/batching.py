"""`nsa-eval bench batching`: what packed (varlen) forwards buy the native engine, one sequence per pass against
several packed into one (model_adapters/runtime/model.py `prefill_packed`, `score_positions`; DESIGN.md "Packed
(varlen) batches"), on real task prompts, on the CPU or a GPU.

- MMLU log-likelihoods: the first N samples of the MMLU task (4 requests each, the task's prompts as `nsa-eval run`
  builds them for the model) scored three ways: the padded path the engine used before packing (`ForwardScoring`:
  batches of --batch-size requests through model.forward, a pass per request, or one pass of the whole batch when its
  requests are of one length, as a sample's four letters are; every position's logits), `PackedScoring` with a budget
  of one sequence per pass (requests with the same input share a sequence; the LM head only at the scored positions),
  and `PackedScoring` packed.
- GSM8K prompts: the first P samples' prompts through the engine with a budget of one new token (prefill and the
  first token; no decode), rows enough for all of them, each prompt prefilled alone, then packed.
Each way is checked against the first (log-likelihoods to float rounding, the same argmax answer per sample and the
same is_greedy flags; the same first tokens) and timed: the best of --repeats runs, after one warm-up call. Results:
results/bench/<device>-varlen-batching.md and .json (<device>: cpu, or the card's short name).
"""

from __future__ import annotations

import json
import os
import platform
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from nsa_eval.bench.common import card_slug


def load_engine(model_spec: str, device: str, dtype: str, rows: int):
    """The model on the native engine with `rows` cache rows; one ValueError line for a spec that is not on it."""
    from nsa_eval.model_adapters.runtime.engine import Engine
    from nsa_eval.models import LoadOptions, load_model

    model = load_model(model_spec, LoadOptions(device=device, dtype=dtype, batch_size=rows))
    if not isinstance(model, Engine):
        raise ValueError(f"bench batching measures the native engine; --model {model_spec} loads "
                         f"{type(model).__name__}: give smollm2, smollm2-nsa, hf:PATH of a Llama-family checkpoint "
                         "or nsa:PATH")
    return model


def task_samples(lm, name: str, data: str | None, count: int, shots: int | None) -> list:
    """The first `count` samples of task `name` (mmlu | gsm8k) from `data` (None: its hub id), as `nsa-eval run`
    builds them for the model `lm` (its chat setting, length and token counts)."""
    from nsa_eval.tasks.base import TaskContext
    from nsa_eval.tasks.gsm8k import GSM8K
    from nsa_eval.tasks.mmlu import MMLU

    task = MMLU(data_path=data, **({} if shots is None else {"num_fewshot": shots})) if name == "mmlu" else \
        GSM8K(data_path=data, num_fewshot=shots)
    task.prepare()
    ctx = TaskContext(count_tokens=lm.count_tokens, chat=lm.chat, max_length=lm.max_length, seed=0, limit=None)
    samples = task.samples(ctx)[:count]
    if len(samples) < count:
        raise ValueError(f"--{name} {count}: {data or name} gives only {len(samples)} samples")
    return samples


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: left as they are) inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PassCounter:
    """Counts the passes through the model's layers (`Transformer._prefill_slice`: one per prompt slice or pack)."""

    def __init__(self, model):
        self.model, self.passes = model, 0
        inner = model._prefill_slice

        def counted(*args, **kwargs):
            self.passes += 1
            return inner(*args, **kwargs)

        model._prefill_slice = counted

    def close(self) -> None:
        del self.model._prefill_slice  # the class's method again


def measure(lm, ways: dict[str, Callable[[], Any]], budgets: dict[str, int | None], repeats: int) -> dict[str, dict]:
    """Each way run `repeats` times with its pack budget (Engine.max_batch_tokens): {way: {seconds: the best wall
    time, passes: passes through the layers in one run, result: the last run's answers}}."""
    import torch

    out = {}
    for way, call in ways.items():
        lm.max_batch_tokens = budgets[way]
        best, passes, result = float("inf"), None, None
        for _ in range(repeats):
            counter = PassCounter(lm.model)
            try:
                if lm.device.type == "cuda":
                    torch.cuda.synchronize(lm.device)
                start = time.perf_counter()
                result = call()
                if lm.device.type == "cuda":
                    torch.cuda.synchronize(lm.device)
                best = min(best, time.perf_counter() - start)
                passes = counter.passes
            finally:
                counter.close()
        out[way] = {"seconds": best, "passes": passes, "result": result}
    lm.max_batch_tokens = None
    return out


def mmlu_part(lm, samples: list, repeats: int, padded_batch: int) -> dict[str, Any]:
    """MMLU log-likelihoods three ways (module docstring), checked against the first; the padded path in batches of
    `padded_batch` requests (`nsa-eval run`'s --batch-size)."""
    from nsa_eval.model_adapters.base import LoglikelihoodRequest
    from nsa_eval.model_adapters.scoring import ForwardScoring

    requests = [LoglikelihoodRequest(s.prompt, c) for s in samples for c in s.continuations]
    lm.loglikelihood(requests[:2])  # warm-up: the fused weights, the allocator

    def padded() -> list:  # the engine's path before packing: ForwardScoring's padded batches through model.forward
        rows, lm.batch_size = lm.batch_size, padded_batch
        lm._continuation_scores = types.MethodType(ForwardScoring._continuation_scores, lm)
        try:
            return lm.loglikelihood(requests)
        finally:
            del lm._continuation_scores
            lm.batch_size = rows

    ways = {f"padded batches of {padded_batch} (before)": padded,
            "one sequence per pass": lambda: lm.loglikelihood(requests),
            "packed": lambda: lm.loglikelihood(requests)}
    budgets = dict(zip(ways, (None, 1, None)))
    results = measure(lm, ways, budgets, repeats)
    reference = results[next(iter(ways))]["result"]
    width = len(samples[0].continuations)
    for way, entry in results.items():
        got = entry.pop("result")
        entry["max_abs_logprob_diff"] = max(abs(a.logprob - b.logprob) for a, b in zip(got, reference))
        entry["is_greedy_equal"] = all(a.is_greedy == b.is_greedy for a, b in zip(got, reference))
        answers = lambda lls: [max(range(width), key=lambda j: lls[i * width + j].logprob)  # noqa: E731
                               for i in range(len(samples))]
        entry["answers_equal"] = answers(got) == answers(reference)
    lengths = [len(whole) for whole in (lm.encode(s.prompt) for s in samples)]
    return {"samples": len(samples), "requests": len(requests), "mean_prompt_tokens": sum(lengths) / len(lengths),
            "ways": results}


def gsm8k_part(lm, samples: list, repeats: int) -> dict[str, Any]:
    """GSM8K prompts' prefill and first token, one prompt per pass and packed, checked against each other."""
    import dataclasses

    from nsa_eval.runner import generation_request

    requests = [dataclasses.replace(generation_request(s, 0), max_new_tokens=1) for s in samples]
    lm.generate(requests[:2])  # warm-up
    ways = {"one prompt per pass (before)": lambda: lm.generate(requests), "packed": lambda: lm.generate(requests)}
    results = measure(lm, ways, dict(zip(ways, (1, None))), repeats)
    reference = [g.texts for g in results[next(iter(ways))]["result"]]
    for entry in results.values():
        entry["first_tokens_equal"] = [g.texts for g in entry.pop("result")] == reference
    lengths = [len(lm.prompt_ids(r)[0]) for r in requests]
    return {"prompts": len(samples), "mean_prompt_tokens": sum(lengths) / len(lengths), "ways": results}


def machine(device) -> dict[str, Any]:
    import torch

    from nsa_eval.store import cpu_model, git_sha

    info = {"device": str(device), "cpu": cpu_model() or platform.processor(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "git_sha": git_sha(),
            "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_report(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = "" if m.get("load_average") is None else f" (load average {m['load_average']:.1f} when it started)"
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} CPU cores{load}, {m['torch_threads']} torch " \
                            f"thread{'s' if m['torch_threads'] > 1 else ''}"
    lines = [f"# Packed (varlen) batching on the native engine: {results['model']}", "",
             f"Machine: {where}; torch {m['torch']}; {results['dtype']}; git {m['git_sha']}; {m['date']}.",
             f"Command: `{results['command']}`", "",
             "Seconds are the best of the repeats (wall time, after a warm-up call); speedup against the first row of "
             "each part. Passes: passes through the model's layers. Checks: against the first row.", ""]
    if "mmlu" in results:
        part = results["mmlu"]
        lines += [f"## MMLU log-likelihoods: {part['samples']} samples, {part['requests']} requests "
                  f"({results['mmlu_shots']}, mean {part['mean_prompt_tokens']:.0f} prompt tokens)", "",
                  "| path | passes | seconds | ms per sample | speedup | max abs Δ log-likelihood | same answers | "
                  "same is_greedy |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        base = next(iter(part["ways"].values()))["seconds"]
        for way, e in part["ways"].items():
            lines.append(f"| {way} | {e['passes']} | {e['seconds']:.2f} | {e['seconds'] * 1e3 / part['samples']:.1f} | "
                         f"{base / e['seconds']:.2f}x | {e['max_abs_logprob_diff']:.1e} | "
                         f"{'yes' if e['answers_equal'] else 'NO'} | {'yes' if e['is_greedy_equal'] else 'NO'} |")
        lines.append("")
    for key, part in results.get("gsm8k", {}).items():
        lines += [f"## GSM8K prompts, prefill and first token: {part['prompts']} prompts ({key}, mean "
                  f"{part['mean_prompt_tokens']:.0f} tokens), {results['rows']} rows", "",
                  "| path | passes | seconds | ms per prompt | speedup | same first tokens |",
                  "| --- | --- | --- | --- | --- | --- |"]
        base = next(iter(part["ways"].values()))["seconds"]
        for way, e in part["ways"].items():
            lines.append(f"| {way} | {e['passes']} | {e['seconds']:.2f} | {e['seconds'] * 1e3 / part['prompts']:.1f} | "
                         f"{base / e['seconds']:.2f}x | {'yes' if e['first_tokens_equal'] else 'NO'} |")
        lines.append("")
    lines.append(f"Pack budget: {results['batch_tokens']} tokens per pass (`--prefill-chunk`, else 8192 on CUDA and "
                 "1024 on the CPU).")
    return "\n".join(lines) + "\n"


def command_line() -> str:
    """The running bench command as typed, from click's parsed options (those away from their defaults)."""
    ctx = click.get_current_context()
    parts = [ctx.command_path.replace(ctx.find_root().info_name, "nsa-eval", 1)]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if value is None or value == () or value == param.default:
            continue
        parts += [f"{param.opts[0]} {v}" for v in (value if param.multiple else [value])]
    return " ".join(parts)


@click.command("batching")
@click.option("--model", "model_spec", default="smollm2", show_default=True,
              help="A model on the native engine: smollm2, smollm2-nsa, hf:PATH (Llama family) or nsa:PATH.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on the CPU), ...")
@click.option("--mmlu", "mmlu_count", default=16, show_default=True, type=click.IntRange(min=0),
              help="MMLU samples to score (4 log-likelihood requests each); 0 skips the part.")
@click.option("--mmlu-shots", type=click.IntRange(0, 5), help="MMLU's num_fewshot (default the task's, 5).")
@click.option("--gsm8k", "gsm8k_count", default=16, show_default=True, type=click.IntRange(min=0),
              help="GSM8K prompts to prefill; 0 skips the part.")
@click.option("--gsm8k-shots", default="default", show_default=True,
              help="GSM8K's num_fewshot, comma-separated for several; 'default': the task's for the model (0 for "
                   "chat models, 8 for others).")
@click.option("--data", "data_paths", multiple=True, metavar="TASK=PATH",
              help="Local rows: mmlu=PATH, gsm8k=PATH (default: the tasks' hub ids).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Requests per padded batch on the path before packing (default: `nsa-eval run`'s on the device, 4 "
                   "on the CPU, 16 on a GPU).")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1), help="Timed runs per way.")
@click.option("--threads", type=click.IntRange(min=1),
              help="torch's intra-op threads (default torch's own); 1 keeps CPU timings steady on cores other jobs "
                   "share.")
@click.option("--out", "out_dir", default="results/bench", show_default=True, type=click.Path(file_okay=False))
def batching_command(model_spec: str, device: str, dtype: str, mmlu_count: int, mmlu_shots: int | None,
                     gsm8k_count: int, gsm8k_shots: str, data_paths: tuple[str, ...], batch_size: int | None,
                     repeats: int, threads: int | None, out_dir: str) -> None:
    """Packed (varlen) forwards against one sequence per pass: MMLU log-likelihoods and GSM8K prefills."""
    from nsa_eval.models import default_batch
    from nsa_eval.run_config import parse_data_paths
    from nsa_eval.util import parse_int_list

    data = parse_data_paths(data_paths, ["mmlu", "gsm8k"])
    shots_list = [None if part.strip() == "default" else parse_int_list(part, "--gsm8k-shots")[0]
                  for part in gsm8k_shots.split(",")]
    if not mmlu_count and not gsm8k_count:
        raise ValueError("--mmlu 0 and --gsm8k 0 leave nothing to measure")
    with torch_threads(threads):
        lm = load_engine(model_spec, device, dtype, max(1, gsm8k_count))
        mmlu_samples = task_samples(lm, "mmlu", data.get("mmlu"), mmlu_count, mmlu_shots) if mmlu_count else []
        gsm8k_samples = {shots: task_samples(lm, "gsm8k", data.get("gsm8k"), gsm8k_count, shots)
                         for shots in shots_list} if gsm8k_count else {}
        results: dict[str, Any] = {"model": lm.name, "dtype": str(lm.model.dtype).replace("torch.", ""),
                                   "rows": lm.batch_size, "batch_tokens": lm.batch_tokens,
                                   "machine": machine(lm.device), "command": command_line(),
                                   "mmlu_shots": f"{mmlu_shots if mmlu_shots is not None else 5}-shot"}
        click.echo(f"{lm.name} on {lm.device} ({results['dtype']}), {lm.batch_size} rows, "
                   f"{lm.batch_tokens} tokens per pack")
        if mmlu_samples:
            results["mmlu"] = mmlu_part(lm, mmlu_samples, repeats, batch_size or default_batch(str(lm.device)))
            click.echo(json.dumps(results["mmlu"], indent=1))
        if gsm8k_samples:
            results["gsm8k"] = {}
            for shots, samples in gsm8k_samples.items():
                key = "the task's shots for the model" if shots is None else f"{shots}-shot"
                results["gsm8k"][key] = gsm8k_part(lm, samples, repeats)
                click.echo(json.dumps(results["gsm8k"][key], indent=1))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = "cpu" if lm.device.type != "cuda" else card_slug(results["machine"]["gpu"])
        (out / f"{name}-varlen-batching.json").write_text(json.dumps(results, indent=1) + "\n")
        report = format_report(results)
        (out / f"{name}-varlen-batching.md").write_text(report)
        click.echo("\n" + report)
        click.echo(f"wrote {out / f'{name}-varlen-batching.md'} and .json")
