"""`nsa-eval bench suite`: a whole evaluation as a user runs it, timed task by task, and the tasks lm-eval has through
lm-evaluation-harness's HF backend on the same card in the same call.

Models: `bench eval`'s random-weight checkpoints (build_checkpoints: real folders with a real tokenizer, loaded by
load_native as `nsa-eval run` loads them): the 1.2B Llama shape with full attention (llama-full) and the NSA paper's
shape with NSA (nsa); `--shapes tiny` gives small versions of both for CPU tests. Random weights never end an answer
sensibly, so the engine's EOS is switched off (`lm.output.eos_ids`) and every generation runs to its task's budget
unless a stop string turns up in the random text (the rows say how many ran their full budget); scores are meaningless
and only show that scoring ran. Plain-text prompts (a base-model evaluation, lm-eval's default): no chat template.

Tasks, each through the runner (`nsa_eval.runner.evaluate`, one run folder per task, its own --limit), at --scale 1:
niah 4k-64k x depths 0, 50, 100; ruler at 4k and 32k, its 11 synthetic tasks x 1 sample; mmlu loglikelihood on the
local STEM rows (10 per subject, 5-shot); gsm8k (8-shot chain of thought, 32 problems, 256 new tokens); humaneval n=1
(16 problems, 512 new tokens, scored in the sandbox); aime n=16 (2 problems, 2048 new tokens, temperature 0.7): sized
for about 400 s on one H100 with the lm-eval part (an estimate from bench eval's rates until a run says otherwise).
Sample counts scale with --scale (at least 1). Each row also says how much of its wall time went to building the
samples (NIAH fits each haystack by counting its tokens: CPU time a user pays too). "One prompt at a time" rows
(mmlu@1, gsm8k@1: the engine with one slot, and one log-likelihood sample per call where the engine takes several,
fewer samples) give the per-sample time the batched rows are measured against.

lm-eval: `lm_eval.models.huggingface.HFLM` (transformers, sdpa, batch --batch) on the llama checkpoint, asked the very
requests our tasks made (same prompts, continuations, stops, budgets; greedy; `min_new_tokens` = the budget so EOS
cannot end it early) and scored by the same task code, for mmlu, gsm8k and humaneval. lm-eval's own niah/ruler groups
and AIME read their data from the hub, and NSA checkpoints do not load in transformers: those rows have no lm-eval
twin. Agreement on the greedy tasks: the same chosen answer (mmlu) or the same response text (gsm8k, humaneval).
Results: results/bench/suite-<card>.md and .json, rewritten after every task (a cut run keeps what it has).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from nsa_eval.bench.common import card_slug
from nsa_eval.bench.eval import LLAMA_1B, NSA_SHAPE, build_checkpoints, load_variant
from nsa_eval.bench.suite_report import format_report, summary

TASKS = ("niah", "ruler", "mmlu", "gsm8k", "humaneval", "aime")
LM_EVAL_TASKS = ("mmlu", "gsm8k", "humaneval")  # tasks lm-eval has, and runnable here from local data
MODELS = ("llama-full", "nsa")  # bench eval's variant names: the 1.2B Llama (full attention), the NSA paper's shape
TINY_LLAMA = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
TINY_NSA = dict(NSA_SHAPE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, v_head_dim=32, intermediate_size=128, compress_hidden_size=32)
SHAPES = {"paper": (LLAMA_1B, NSA_SHAPE), "tiny": (TINY_LLAMA, TINY_NSA)}
DATA_FILES = {"mmlu": "mmlu_stem/test.jsonl", "gsm8k": "gsm8k/test.jsonl", "aime": "aime24/test.jsonl"}
SEED = 0


@dataclasses.dataclass
class TaskPlan:
    """One timed row: a registered task with its --task-option values, --data file and --limit (per subject for mmlu),
    run at `batch` engine slots (None: the suite's --batch). label: the row's name (mmlu@1: one slot)."""

    name: str
    label: str
    options: dict[str, str]
    data: str | None = None
    limit: int | None = None
    batch: int | None = None


def plan_tasks(tasks: list[str], scale: float, niah_lengths: str, ruler_lengths: str, data_dir: Path,
               budgets: dict[str, int], one_at_a_time: bool, extra: dict[str, dict[str, str]] | None = None
               ) -> list[TaskPlan]:
    """The rows to time, in order: each task at its --scale 1 size times `scale` (at least 1), then the one-slot rows.
    extra: --task-option values per task, over the suite's own."""
    def count(base: float) -> int:
        return max(1, round(base * scale))

    data = {name: str(data_dir / path) for name, path in DATA_FILES.items()}
    made = {
        "niah": TaskPlan("niah", "niah", {"lengths": niah_lengths, "depths": "0,50,100",
                                          "samples_per_cell": str(count(1))}),
        "ruler": TaskPlan("ruler", "ruler", {"lengths": ruler_lengths, "samples": str(count(1))}),
        "mmlu": TaskPlan("mmlu", "mmlu", {"variant": "loglikelihood"}, data["mmlu"], count(10)),
        "gsm8k": TaskPlan("gsm8k", "gsm8k", {"max_new_tokens": str(budgets["gsm8k"])}, data["gsm8k"], count(32)),
        "humaneval": TaskPlan("humaneval", "humaneval", {"n_samples": "1", "max_new_tokens": str(budgets["humaneval"])},
                              None, count(16)),
        "aime": TaskPlan("aime", "aime", {"n_samples": "16", "max_new_tokens": str(budgets["aime"])}, data["aime"],
                         count(2)),
    }
    for name, options in (extra or {}).items():
        made[name].options.update(options)
    plans = [made[name] for name in tasks]
    if one_at_a_time and "mmlu" in tasks:
        plans.append(dataclasses.replace(made["mmlu"], label="mmlu@1", limit=count(2), batch=1))
    if one_at_a_time and "gsm8k" in tasks:
        plans.append(dataclasses.replace(made["gsm8k"], label="gsm8k@1", limit=count(8), batch=1))
    return plans


# ---- our side: the runner -------------------------------------------------------------------------------------


def run_config(plan: TaskPlan, model: str, batch: int, cap: int | None):
    from nsa_eval.run_config import RunConfig

    return RunConfig(model_spec=f"bench:{model}", tasks=(plan.name,), limit=plan.limit, max_new_tokens=cap, seed=SEED,
                     batch_size=batch, chat=False, data_paths={plan.name: plan.data} if plan.data else {},
                     task_options={plan.name: plan.options}, allow_code_execution=True)


def run_task(lm, model: str, plan: TaskPlan, root: Path, cap: int | None, keep_samples: bool) -> tuple[dict, dict]:
    """One task through the runner into its own run folder -> (its row, what the lm-eval side needs: the task, the
    samples the run asked, by id, and its records by id). keep_samples: rebuild the samples after the timing (for
    loglikelihood token counts and the lm-eval side; checked against the records' prompt hashes)."""
    from nsa_eval import store as run_store
    from nsa_eval.records import read_samples, samples_file
    from nsa_eval.runner import evaluate
    from nsa_eval.tasks.base import TaskContext

    batch = plan.batch or lm.batch_size
    lm.batch_size = batch
    if plan.batch is not None and getattr(lm, "scoring_batch", None) is not None:
        lm.scoring_batch = plan.batch  # an engine that hands log-likelihood samples over many at a time: one (mmlu@1)
    config = run_config(plan, model, batch, cap)
    task = config.build_tasks()[plan.name]
    task.prepare()  # data read and checked before the timer, as `nsa-eval run` does before the model loads
    folder = root / f"{model}-{plan.label.replace('@', '-at-')}"
    shutil.rmtree(folder, ignore_errors=True)
    build_s = [0.0]  # seconds evaluate spends building the samples (prompts, haystacks fitted by token counts)
    samples_of = task.samples

    def timed_samples(ctx):
        begin = time.perf_counter()
        try:
            return samples_of(ctx)
        finally:
            build_s[0] += time.perf_counter() - begin

    task.samples = timed_samples
    stats, compile_s = dataclasses.replace(lm.stats), lm.compile_s
    start = time.perf_counter()
    metrics = evaluate(lm, {plan.name: task}, run_store.RunStore(folder), config, show_progress=False)
    wall = time.perf_counter() - start
    task.samples = samples_of
    records = [r.to_json() for r in read_samples(samples_file(folder, plan.name), strict=True)]
    asked: dict[str, Any] = {}
    if keep_samples:
        ctx = TaskContext(count_tokens=lm.count_tokens, chat=False, max_length=lm.max_length, seed=SEED,
                          limit=plan.limit, max_new_tokens=cap)
        hashes = {r["id"]: r["prompt_hash"] for r in records}
        for sample in task.samples(ctx):
            if sample.id in hashes:
                if sample.prompt_hash != hashes[sample.id]:
                    raise AssertionError(f"{plan.label}: sample {sample.id} rebuilt with another prompt than it ran")
                if sample.generative and cap is not None:
                    sample = dataclasses.replace(sample, max_new_tokens=min(sample.max_new_tokens, cap))
                asked[sample.id] = sample
    generative = [r for r in records if "new_tokens" in r]
    prompt_tokens = sum(r["prompt_tokens"] for r in generative) + sum(
        scored_tokens(lm, s) for s in asked.values() if s.continuations is not None)
    generated = sum(sum(r["new_tokens"]) for r in generative)
    completions = [reason for r in generative for reason in r["finish_reasons"]]
    entry = metrics["tasks"][plan.name] if metrics else {}
    headline = entry.get("metrics", {}).get(entry.get("headline"), {}).get("mean")
    prefill_s, decode_s = lm.stats.prefill_s - stats.prefill_s, lm.stats.decode_s - stats.decode_s
    row = {"model": model, "task": plan.label, "engine": "nsa-eval", "batch": batch, "samples": len(records),
           "completions": len(completions) or len(records), "wall_s": wall, "build_s": build_s[0],
           "warmup_s": lm.compile_s - compile_s,
           "prompt_tokens": prompt_tokens, "generated_tokens": generated,
           "full_budget_share": (sum(reason == "length" for reason in completions) / len(completions)
                                 if completions else None),
           "prefill_tokens_per_s": (lm.stats.prefill_tokens - stats.prefill_tokens) / prefill_s if prefill_s else None,
           "decode_tokens_per_s": (lm.stats.decode_tokens - stats.decode_tokens) / decode_s if decode_s else None,
           "score": headline, "limit": plan.limit, "options": plan.options}
    return with_rates(row), {"task": task, "samples": asked, "records": {r["id"]: r for r in records}}


def scored_tokens(lm, sample) -> int:
    """Tokens the forward passes of a loglikelihood sample take: context + continuation, once per continuation."""
    from nsa_eval.model_adapters.prompts import loglikelihood_tokens

    context = lm.render(sample.prompt)
    return sum(len(loglikelihood_tokens(lm.tokenizer, context, c, isinstance(sample.prompt, str))[0])
               for c in sample.continuations)


def with_rates(row: dict) -> dict:
    """samples/s, seconds per sample and tokens/s (prompt + generated tokens per wall second) of a row."""
    wall = row["wall_s"]
    row["samples_per_s"] = row["samples"] / wall
    row["s_per_sample"] = wall / row["samples"]
    row["tokens_per_s"] = (row["prompt_tokens"] + row["generated_tokens"]) / wall
    return row


# ---- lm-eval's HF backend ---------------------------------------------------------------------------------------


def lm_eval_importable() -> str | None:
    """None when lm-eval's HF backend imports, else the reason in a few words."""
    try:
        import lm_eval.api.instance  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def lm_eval_part(folder: Path, device: str, batch: int, plans: list[TaskPlan], asked: dict[str, dict],
                 model_rows: dict[str, dict], record) -> None:
    """The shared tasks' requests through lm-eval's HFLM on the llama checkpoint, each scored by the same task code;
    a row per task with its agreement with our answers on the same samples (`record` writes it)."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    start = time.perf_counter()
    hf = HFLM(pretrained=str(folder), device=device, dtype=dtype, batch_size=batch)
    load_s = time.perf_counter() - start
    generated = [0]  # tokens HF's batched generate produced: rows x steps, until every row of a batch stopped
    model_generate = hf._model_generate

    def counted(context, max_length, stop, **kwargs):
        out = model_generate(context, max_length, stop, **kwargs)
        generated[0] += (out.shape[1] - context.shape[1]) * out.shape[0]
        return out

    hf._model_generate = counted
    for plan in plans:
        samples = list(asked[plan.label]["samples"].values())
        records, task = asked[plan.label]["records"], asked[plan.label]["task"]  # the task object that ran them
        ours = model_rows[plan.label]
        _sync(device)
        generated[0] = 0
        start = time.perf_counter()
        if samples[0].continuations is not None:
            requests = [Instance("loglikelihood", {}, (s.prompt, c), i, (plan.name, k, 1))
                        for k, s in enumerate(samples) for i, c in enumerate(s.continuations)]
            answers = iter(hf.loglikelihood(requests, disable_tqdm=True))
            outputs = [[tuple(next(answers)) for _ in s.continuations] for s in samples]
        else:
            requests = [Instance("generate_until", {}, (s.prompt, {
                "until": list(s.stop), "max_gen_toks": s.max_new_tokens, "min_new_tokens": s.max_new_tokens,
                "do_sample": False, "temperature": 0.0}), 0, (plan.name, k, 1)) for k, s in enumerate(samples)]
            outputs = [[text] for text in hf.generate_until(requests, disable_tqdm=True)]
        scores = [task.score(s, out) for s, out in zip(samples, outputs)]  # the same scoring cost as our rows
        _sync(device)
        wall = time.perf_counter() - start
        row = {"model": "llama-full", "task": plan.label, "engine": "lm-eval hf", "batch": batch,
               "samples": len(samples), "completions": len(samples), "wall_s": wall, "build_s": 0.0, "warmup_s": 0.0,
               "load_s": load_s, "prompt_tokens": ours["prompt_tokens"], "generated_tokens": generated[0],
               "score": sum(s.get(task.headline, 0.0) for s in scores) / len(scores), "limit": plan.limit,
               "lm_eval_version": _version("lm-eval"), **agreement(samples, outputs, records)}
        record(with_rates(row))
        ours["vs_lm_eval"] = row["s_per_sample"] / ours["s_per_sample"]
    del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def agreement(samples: list, theirs: list[list], records: dict[str, dict]) -> dict:
    """How often lm-eval's HF backend and ours answer alike on the same samples: the chosen continuation (loglikelihood
    tasks; and the largest |log-probability difference|) or the whole greedy response (generative; and the mean share
    of the longer response that both share as a prefix)."""
    same, detail = 0, []
    for sample, out in zip(samples, theirs):
        record = records[sample.id]
        if sample.continuations is not None:
            mine = [lp for lp, _ in record["loglikelihoods"]]
            other = [lp for lp, _ in out]
            same += max(range(len(mine)), key=mine.__getitem__) == max(range(len(other)), key=other.__getitem__)
            detail.append(max(abs(a - b) for a, b in zip(mine, other)))
        else:
            a, b = record["responses"][0], out[0]
            same += a == b
            prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            detail.append(prefix / max(len(a), len(b), 1))
    if samples[0].continuations is not None:
        return {"agreement": same / len(samples), "max_abs_logprob_diff": max(detail)}
    return {"agreement": same / len(samples), "mean_common_prefix_share": sum(detail) / len(detail)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---- the command ------------------------------------------------------------------------------------------------


@click.command("suite")
@click.option("--tasks", "task_list", default=",".join(TASKS), show_default=True, help="Tasks to time, of those shown.")
@click.option("--models", default=",".join(MODELS), show_default=True,
              help="llama-full (the 1.2B Llama shape, full attention), nsa (the NSA paper's shape).")
@click.option("--shapes", type=click.Choice(sorted(SHAPES)), default="paper", show_default=True,
              help="paper: the 1.2B Llama and the NSA paper's shape; tiny: small versions of both (CPU tests).")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Multiplies every task's sample count (at least 1 each).")
@click.option("--niah-lengths", default="4k,8k,16k,32k,64k", show_default=True)
@click.option("--ruler-lengths", default="4k,32k", show_default=True)
@click.option("--gsm8k-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="GSM8K's budget.")
@click.option("--humaneval-tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--aime-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="AIME's capped budget (n=16 samples each).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="A cap on every task's budget (the runner's).")
@click.option("--task-option", "task_options", multiple=True, metavar="TASK.KEY=VALUE",
              help="A task's own option over the suite's (as `nsa-eval run`), e.g. mmlu.num_fewshot=0. Repeatable.")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Engine slots, and lm-eval HF's batch size.")
@click.option("--one-at-a-time/--no-one-at-a-time", default=True, show_default=True,
              help="Also time mmlu and gsm8k with one engine slot (mmlu@1, gsm8k@1).")
@click.option("--lm-eval/--no-lm-eval", "with_lm_eval", default=True, show_default=True,
              help=f"Also run {', '.join(LM_EVAL_TASKS)} through lm-eval's HF backend (skipped in one line when "
                   "lm_eval does not import).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("../shared/data"), show_default=True,
              help="Local benchmark rows: mmlu_stem/, gsm8k/, aime24/ (../shared/data/README.md).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path),
              help="A tokenizer folder with vocab <= 49152 (default: the embedded SmolLM2's).")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True),
              help="Seconds after which no further task or part starts (what finished is kept and written).")
@click.option("--out", "out_dir", default="results/bench", show_default=True, type=click.Path(file_okay=False))
def suite_command(task_list: str, models: str, shapes: str, scale: float, niah_lengths: str, ruler_lengths: str,
                  gsm8k_tokens: int, humaneval_tokens: int, aime_tokens: int, max_new_tokens: int | None,
                  task_options: tuple[str, ...], batch: int, one_at_a_time: bool, with_lm_eval: bool, device: str,
                  data_dir: Path, tokenizer_dir: Path | None, deadline: float | None, out_dir: str) -> None:
    """A whole evaluation timed task by task on random weights, beside lm-eval's HF backend (module docstring)."""
    import torch

    from nsa_eval.run_config import parse_task_options
    from nsa_eval.store import cpu_model, git_sha, versions
    from nsa_eval.util import parse_int_list

    started = time.perf_counter()
    tasks = _names(task_list, TASKS, "--tasks")
    chosen = _names(models, MODELS, "--models")
    lengths = {"niah": parse_int_list(niah_lengths, "--niah-lengths"),
               "ruler": parse_int_list(ruler_lengths, "--ruler-lengths")}
    extra = parse_task_options(task_options, tasks)
    budgets = {"gsm8k": gsm8k_tokens, "humaneval": humaneval_tokens, "aime": aime_tokens}
    plans = plan_tasks(tasks, scale, niah_lengths, ruler_lengths, data_dir, budgets, one_at_a_time, extra)
    checked = [run_config(plan, "check", batch, max_new_tokens).build_tasks()[plan.name] for plan in plans]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible to torch; use --device cpu")
    for name, path in DATA_FILES.items():
        if name in tasks and not (data_dir / path).is_file():
            raise ValueError(f"{data_dir / path} is missing ({name}'s local rows); give --data-dir, the folder that "
                             f"holds {path}")
    for task in checked:  # every task's options and data checked before any model is built
        task.prepare()
    if tokenizer_dir is None:
        from nsa_eval.model_adapters.smollm2 import plain_checkpoint

        tokenizer_dir = plain_checkpoint()
    elif not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"--tokenizer {tokenizer_dir} holds no tokenizer_config.json; give a tokenizer folder")
    shared = [p for p in plans if p.label in LM_EVAL_TASKS] if with_lm_eval and "llama-full" in chosen else []
    lm_eval_note = "" if with_lm_eval else "lm-eval: not asked (--no-lm-eval)."
    if shared:
        reason = lm_eval_importable()
        if reason is not None:
            lm_eval_note = f"lm-eval: skipped, lm_eval's HF backend does not import here ({reason})."
            click.echo(lm_eval_note)
            shared = []

    name = torch.cuda.get_device_name() if device == "cuda" else (cpu_model() or platform.machine() or "CPU")
    card = card_slug(name) if device == "cuda" else "cpu"
    llama_shape, nsa_shape = SHAPES[shapes]
    results: dict[str, Any] = {
        "device": name, "card": card, "argv": " ".join(sys.argv[3:]), "git_sha": git_sha(), "seed": SEED,
        "versions": versions(), "shapes": {model: (llama_shape if model == "llama-full" else nsa_shape)
                                           for model in chosen},
        "settings": {"tasks": tasks, "models": chosen, "shapes": shapes, "scale": scale, "batch": batch,
                     "budgets": budgets, "max_new_tokens": max_new_tokens, "niah_lengths": niah_lengths,
                     "ruler_lengths": ruler_lengths, "task_options": extra, "data_dir": str(data_dir),
                     "deadline": deadline},
        "plans": [dataclasses.asdict(p) for p in plans], "models": {}, "lm_eval_note": lm_eval_note, "skipped": [],
        "failed": [],
        "rows": []}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        results["summary"] = summary(results)
        (out / f"suite-{card}.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / f"suite-{card}.md").write_text(format_report(results))

    def record(row: dict) -> None:
        results["rows"].append(row)
        click.echo(f"  {row['model']:10s} {row['engine']:10s} {row['task']:10s} {row['samples']:4d} samples "
                   f"{row['wall_s']:8.2f} s  {row['samples_per_s']:8.2f} samples/s  {row['tokens_per_s']:8.0f} tokens/s"
                   + (f"  agreement {row['agreement']:.2f}" if "agreement" in row else ""))
        write()

    def failed(what: str, error: Exception) -> None:
        """A part that raised: one line, kept in the results; the other parts still run, the command exits 1."""
        text = str(error).strip().splitlines()
        results["failed"].append(f"{what}: {type(error).__name__}: {text[0] if text else ''}")
        click.echo(f"  failed {results['failed'][-1]}")
        write()

    def past_deadline(what: str) -> bool:
        if deadline is None or time.perf_counter() - started < deadline:
            return False
        results["skipped"].append(what)
        click.echo(f"  skipped {what}: past --deadline {deadline:g} s")
        write()
        return True

    click.echo(f"device: {name} | models {', '.join(chosen)} ({shapes}) | tasks {', '.join(p.label for p in plans)}")
    root = Path(tempfile.mkdtemp(prefix="nsa-eval-suite-"))
    try:
        folders = build_checkpoints(root, tokenizer_dir, chosen, device=device, llama_shape=llama_shape,
                                    nsa_shape=nsa_shape)
        longest = max([n for task in ("niah", "ruler") if task in tasks for n in lengths[task]], default=0)
        for model in chosen:
            if past_deadline(f"{model} (every task)"):
                continue
            start = time.perf_counter()
            lm = load_variant(model, folders, batch, device)
            lm.output.eos_ids = set()  # random weights: every answer runs to its budget (or a stop string)
            info = results["models"][model] = {"load_s": time.perf_counter() - start,
                                               "params": sum(p.numel() for p in lm.model.parameters())}
            if longest:
                lm.reserve(longest + 256)  # one cache for every task, warmed up before the first is timed
                info["warmup_s"] = lm.compile_s
            rows, asked = {}, {}
            for plan in plans:
                if past_deadline(f"{model} {plan.label}"):
                    continue
                keep = model == "llama-full" and any(p.label == plan.label for p in shared)
                try:
                    row, asked_here = run_task(lm, model, plan, root, max_new_tokens, keep or plan.name == "mmlu")
                except Exception as error:  # noqa: BLE001 - said in one line; the other tasks still run
                    failed(f"{model} {plan.label}", error)
                    continue
                rows[plan.label] = row
                if keep:
                    asked[plan.label] = asked_here
                record(row)
            del lm
            gc.collect()  # the engine's graphs and cache go before the next model loads
            if device == "cuda":
                torch.cuda.empty_cache()
            ready = [p for p in shared if p.label in asked]
            if model == "llama-full" and ready and not past_deadline("lm-eval hf"):
                try:
                    lm_eval_part(folders["llama"], device, batch, ready, asked, rows, record)
                except Exception as error:  # noqa: BLE001 - said in one line; the NSA model still runs
                    failed("lm-eval hf", error)
                write()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - started
    write()
    click.echo("\n" + format_report(results))
    click.echo(f"wrote {out / f'suite-{card}.json'} and .md")
    if results["failed"]:
        raise click.ClickException(f"{len(results['failed'])} part(s) failed: {'; '.join(results['failed'])}")


def _names(text: str, known: tuple[str, ...], option: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{option}: {'unknown ' + unknown[0] if unknown else 'empty'}; use {', '.join(known)}")
    return names

