"""The `nsa-eval` command line. Bad input ends in one line (`Error: ...`) and exit code 1, never a traceback."""

from __future__ import annotations

import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from nsa_eval.bench import bench
from nsa_eval.models import MODEL_KINDS
from nsa_eval.registry import LM_EVAL_PREFIX, TASKS, task_factory
from nsa_eval.util import parse_int_list


class _Commands(click.Group):
    """A click group whose commands turn ValueError (bad input, validated at the boundary) into one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # unreadable files, full disks: the path and the reason, not a traceback
            raise click.ClickException(f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="nsa-eval")
def main() -> None:
    """Evaluate NSA and full-attention language models: accuracy and speed, side by side."""


def parse_data_paths(pairs: tuple[str, ...], task_names: list[str]) -> dict[str, str]:
    """('mmlu=/data/mmlu.jsonl', ...) -> {'mmlu': '/data/mmlu.jsonl'}; a bare PATH applies to a single task. Each path
    must exist, and each task gets one."""
    paths: dict[str, str] = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep:
            if len(task_names) != 1:
                raise ValueError(f"--data {pair}: with several tasks, name the task: --data TASK=PATH")
            task, path = task_names[0], pair
        if task not in task_names:
            raise ValueError(f"--data {pair}: task '{task}' is not among --tasks {','.join(task_names)}")
        if task == "niah":
            raise ValueError("--data niah=...: niah generates its samples and reads no data file; "
                             "--haystack DIR gives it your own filler text")
        if not path.strip():
            raise ValueError(f"--data {pair}: the path after '=' is empty; give a file or folder, e.g. "
                             f"--data {task}=data/{task.split(':')[-1]}.jsonl")
        if task in paths:
            raise ValueError(f"--data names {task} twice ({paths[task]} and {path}); give one path per task")
        if not Path(path).expanduser().exists():
            raise ValueError(f"--data {pair}: {path} does not exist; give a jsonl/json/parquet/csv file or a folder of them")
        paths[task] = path
    return paths


# options that have flags of their own: --task-option TASK.KEY=... for them points at the flag
FLAG_OPTIONS = {"data_path": "--data TASK=PATH", "seed": "--seed N", "allow_code_execution": "--allow-code-execution",
                "haystack_dir": "--haystack DIR", "include_path": "--include-path DIR"}


def parse_task_options(pairs: tuple[str, ...], task_names: list[str]) -> dict[str, dict[str, str]]:
    """('mmlu.variant=generative', ...) -> {'mmlu': {'variant': 'generative'}}: the values as text, read as their
    option's type by build_tasks (nsa_eval/task_options.py)."""
    options: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        task, dot, option = key.partition(".")
        if task not in task_names and key.count(".") > 1:  # lm-eval task names may hold dots: split at the last one
            task, _, option = key.rpartition(".")
            dot = "."
        if not sep or not dot or not option:
            raise ValueError(f"--task-option {pair}: write TASK.KEY=VALUE, e.g. mmlu.num_fewshot=0")
        if task not in task_names:
            raise ValueError(f"--task-option {pair}: task '{task}' is not among --tasks {','.join(task_names)}")
        option = option.replace("-", "_")
        if option in FLAG_OPTIONS:
            raise ValueError(f"--task-option {pair}: {option} has its own flag; use {FLAG_OPTIONS[option]}")
        if option in options.get(task, {}):
            raise ValueError(f"--task-option {task}.{option} is given twice ({options[task][option]} and {value}); "
                             "give it once")
        options.setdefault(task, {})[option] = value
    return options


def build_tasks(task_names: list[str], options: dict[str, Any], per_task: dict[str, dict[str, Any]],
                texts: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Each task built with the options its constructor accepts (common ones, then its own). texts: --task-option
    values as given, read as the types the task's options take (one line naming the option when one does not fit)."""
    from nsa_eval.task_options import typed_options

    tasks = {}
    for name in task_names:
        factory = task_factory(name)  # raises the "unknown task ... did you mean" line
        accepted = inspect.signature(factory).parameters
        given = (texts or {}).get(name, {})
        unknown = sorted(set(per_task.get(name, {})) - set(accepted) | set(given) - set(accepted))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            known = ", ".join(k for k, p in accepted.items()
                              if (p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY) and k not in FLAG_OPTIONS)
            raise ValueError(f"task '{name}' has no option '{unknown[0]}'; its options: {known}")
        explicit = {**per_task.get(name, {}), **typed_options(name, factory, given)}
        wanted = {**options, **explicit}
        tasks[name] = factory(**{k: v for k, v in wanted.items() if k in accepted})
    return tasks


def default_run_dir(model_name: str, task_names: list[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model_name}-{'-'.join(task_names)}").strip("-")
    return Path("results") / "runs" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user set an option (on the command line or through its environment variable)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def check_inert_options(ctx: click.Context, task_names: list[str], attention: str,
                        task_texts: dict[str, dict[str, str]]) -> None:
    """Settings that would do nothing in this run are refused (one line saying what they apply to)."""
    for name, flag in (("sparse_budget", "--sparse-budget"), ("sparse_leading", "--sparse-leading"),
                       ("sparse_local", "--sparse-local"), ("sparse_block", "--sparse-block")):
        if attention != "sparse" and _given(ctx, name):
            raise ValueError(f"{flag} applies only with --attention sparse; add --attention sparse or leave it out")
    listed = ",".join(task_names)
    if "niah" not in task_names:
        for name, flag in (("niah_lengths", "--niah-lengths"), ("niah_depths", "--niah-depths"),
                           ("niah_samples", "--niah-samples"), ("haystack", "--haystack")):
            if _given(ctx, name):
                raise ValueError(f"{flag} applies to the niah task, which is not among --tasks {listed}; add niah or "
                                 "leave it out")
    else:
        for option, name, flag in (("lengths", "niah_lengths", "--niah-lengths"), ("depths", "niah_depths", "--niah-depths"),
                                   ("samples_per_cell", "niah_samples", "--niah-samples")):
            if option in task_texts.get("niah", {}) and _given(ctx, name):
                raise ValueError(f"{flag} and --task-option niah.{option} both set the NIAH {option}; give one of them")
    if _given(ctx, "include_path") and not any(t.startswith(LM_EVAL_PREFIX) for t in task_names):
        raise ValueError(f"--include-path applies to lm-eval:TASK tasks, none of which is among --tasks {listed}; "
                         "leave it out")
    if _given(ctx, "allow_code_execution") and "humaneval" not in task_names:
        raise ValueError(f"--allow-code-execution applies to humaneval, which is not among --tasks {listed}; "
                         "leave it out")


def _limit_help() -> str:
    per = [f"of each {getattr(factory, 'limit_unit')} for {name}" for name, factory in sorted(TASKS.items())
           if getattr(factory, "limit_unit", None)]
    return ("Evaluate only the first N samples of each task: the first N " + " and ".join(per) +
            " (mmlu --limit 3 is 3 x 57 questions), the first N cells of the niah grid, the first N documents of an "
            "lm-eval task. The count per task is printed when the run starts.")


def print_metrics(metrics: dict[str, Any]) -> None:
    for name, result in metrics["tasks"].items():
        headline = result["metrics"].get(result["headline"], {})
        click.echo(f"{name}: {result['headline']} = {headline.get('mean', float('nan')):.4f} "
                   f"± {headline.get('stderr', float('nan')):.4f} (n={result['n']})")


@main.command()
@click.option("--model", "model_spec", default="smollm2", show_default=True,
              help="What to evaluate: 'smollm2' (embedded SmolLM2-135M-Instruct), 'hf:PATH_OR_ID' (a transformers "
                   "causal LM folder) or 'nsa:PATH' (an NSA checkpoint). `nsa-eval list models` shows every kind.")
@click.option("--attention", type=click.Choice(["full", "sparse"]), default="full", show_default=True,
              help="For smollm2 and hf: checkpoints: full attention (our kernels on CUDA), or training-free NSA-style "
                   "sparse attention (top blocks by mean-pooled keys, leading and local tokens always kept).")
@click.option("--sparse-budget", default=2560, show_default=True, type=click.IntRange(min=1),
              help="Sparse attention: tokens each query sees (leading + local + selected blocks).")
@click.option("--sparse-leading", default=128, show_default=True, type=click.IntRange(min=1),
              help="Sparse attention: leading tokens always kept.")
@click.option("--sparse-local", default=512, show_default=True, type=click.IntRange(min=1),
              help="Sparse attention: most recent tokens always kept.")
@click.option("--sparse-block", default=64, show_default=True, type=click.IntRange(min=1),
              help="Sparse attention: block length of the selection.")
@click.option("--tasks", "task_list", required=True, help="Comma-separated task names; `nsa-eval list tasks` shows them.")
@click.option("--limit", type=click.IntRange(min=1), help=_limit_help())
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Cap every task's generation at N new tokens (e.g. HumanEval's 512-1024 and AIME's 8192 for a quick "
                   "CPU try, as lm-eval's --gen_kwargs max_gen_toks=N); recorded in the run's config.")
@click.option("--output", type=click.Path(path_type=Path),
              help="Run directory. Default: results/runs/<model>-<tasks>-<time>. Rerunning into the same directory "
                   "with the same settings resumes; different settings are refused, naming them.")
@click.option("--overwrite", is_flag=True,
              help="Start the run in --output over: what an earlier run wrote there (run.json, samples/, metrics.json) "
                   "is removed once the model has loaded.")
@click.option("--seed", default=0, show_default=True, help="Seed for data sampling (needles, shots) and generation.")
@click.option("--engine", type=click.Choice(["auto", "native", "transformers"]), default="auto", show_default=True,
              help="For smollm2 and hf: checkpoints: 'native' runs Llama-family checkpoints (llama, qwen2, qwen3, "
                   "mistral) on our generation engine (static cache, continuous batching, CUDA graphs, our kernels); "
                   "'transformers' runs any causal LM through transformers; 'auto' takes native where it applies. "
                   "nsa: checkpoints always run native.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Sequences decoded at once: the native engine's cache rows (continuous batching; default 16 on "
                   "cuda, 4 on the CPU), or requests per left-padded forward pass on transformers (default 1).")
@click.option("--max-length", type=click.IntRange(min=16),
              help="Prompt + generation budget in tokens (default: the model's context length). Longer prompts are "
                   "cut in the middle and the sample records it.")
@click.option("--prefill-chunk", type=click.IntRange(min=0),
              help="For smollm2, hf: and nsa: checkpoints: prompt tokens per forward pass during prefill, so a long "
                   "prompt's activations fit in memory (0: the whole prompt at once). Default: 8192 on cuda, 0 on the "
                   "CPU.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs; auto picks cuda when present.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Model weights' dtype; auto is bfloat16 on cuda, float32 on the CPU.")
@click.option("--chat-template/--no-chat-template", "chat", default=None,
              help="Send chat messages through the model's chat template (default: when the tokenizer has one).")
@click.option("--data", "data_pairs", multiple=True, metavar="TASK=PATH",
              help="Read a task's data from a local file (jsonl, json, parquet, csv) or folder instead of its hub id "
                   "(lm-eval:TASK too). Repeatable, once per task. Hub data is read from the local datasets cache "
                   "first; HF_DATASETS_OFFLINE=1 keeps it there.")
@click.option("--allow-code-execution", is_flag=True,
              help="Allow tasks that run model-written code (humaneval); it runs in a sandbox.")
@click.option("--niah-lengths", default="1k,2k,4k", show_default=True,
              help="Needle-in-a-haystack context lengths in the model's tokens (k = 1024).")
@click.option("--niah-depths", default="0,25,50,75,100", show_default=True,
              help="Needle depths in percent of the context.")
@click.option("--niah-samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Needle samples per (length, depth) cell, each with its own random value.")
@click.option("--haystack", type=click.Path(path_type=Path),
              help="Folder of .txt files to use as haystack (default: generated filler text).")
@click.option("--task-option", "task_options", multiple=True, metavar="TASK.KEY=VALUE",
              help="A task's own option, e.g. mmlu.variant=generative, gsm8k.variant=standard, longbench.subsets=table2, "
                   "aime.n_samples=4, ruler.lengths=4k,8k, ruler.essays=DIR (lists with commas). Repeatable; values are "
                   "read as the option's type, and an unknown key lists the task's options.")
@click.option("--include-path", type=click.Path(path_type=Path),
              help="A folder of lm-evaluation-harness task YAML files, for --tasks lm-eval:TASK.")
@click.option("--quiet", is_flag=True, help="No progress (a bar on a terminal, else a line per task at most every 30 s).")
def run(model_spec: str, attention: str, sparse_budget: int, sparse_leading: int, sparse_local: int,
        sparse_block: int, task_list: str, limit: int | None, max_new_tokens: int | None, output: Path | None,
        overwrite: bool, seed: int, engine: str, batch_size: int | None, max_length: int | None,
        prefill_chunk: int | None, device: str, dtype: str, chat: bool | None, data_pairs: tuple[str, ...],
        allow_code_execution: bool, niah_lengths: str, niah_depths: str, niah_samples: int, haystack: Path | None,
        task_options: tuple[str, ...], include_path: Path | None, quiet: bool) -> None:
    """Evaluate a model on tasks; writes run.json, samples/<task>.jsonl and metrics.json to the run directory.

    Everything is checked before the model loads (task options, data, the run directory), so a bad command ends in
    one line at once; a run that stops before its first sample leaves nothing behind; Ctrl-C keeps the samples
    answered (exit code 130) and the same command resumes."""
    try:
        _run(**locals())
    except KeyboardInterrupt:
        click.echo("interrupted before the model loaded; nothing was written", err=True)
        raise click.exceptions.Exit(130) from None


def _run(model_spec: str, attention: str, sparse_budget: int, sparse_leading: int, sparse_local: int,
         sparse_block: int, task_list: str, limit: int | None, max_new_tokens: int | None, output: Path | None,
         overwrite: bool, seed: int, engine: str, batch_size: int | None, max_length: int | None,
         prefill_chunk: int | None, device: str,
         dtype: str, chat: bool | None, data_pairs: tuple[str, ...], allow_code_execution: bool, niah_lengths: str,
         niah_depths: str, niah_samples: int, haystack: Path | None, task_options: tuple[str, ...],
         include_path: Path | None, quiet: bool) -> None:
    from nsa_eval import distributed
    from nsa_eval.models import check_model_spec, load_model
    from nsa_eval.runner import run as run_tasks
    from nsa_eval.store import nearest_existing

    ctx = click.get_current_context()
    task_names = list(dict.fromkeys(t.strip() for t in task_list.split(",") if t.strip()))
    if not task_names:
        raise ValueError("--tasks is empty; name at least one task (`nsa-eval list tasks`)")
    for name in task_names:
        task_factory(name)  # an unknown name: one line with the nearest known one, before anything else
    texts = parse_task_options(task_options, task_names)
    check_inert_options(ctx, task_names, attention, texts)
    data_paths = parse_data_paths(data_pairs, task_names)
    check_model_spec(model_spec, attention, prefill_chunk, engine)
    per_task: dict[str, dict[str, Any]] = {name: {"data_path": path} for name, path in data_paths.items()}
    niah = dict(lengths=parse_int_list(niah_lengths, "--niah-lengths"), depths=parse_int_list(niah_depths, "--niah-depths"),
                samples_per_cell=niah_samples, haystack_dir=str(haystack) if haystack else None)
    if "niah" in task_names:
        per_task.setdefault("niah", {}).update(niah)
    common = {"seed": seed, "allow_code_execution": allow_code_execution,
              "include_path": str(include_path) if include_path else None}

    settings: dict[str, Any] = {"--model": model_spec, "--tasks": task_names, "--attention": attention}
    if attention == "sparse":
        settings.update({"--sparse-budget": sparse_budget, "--sparse-leading": sparse_leading,
                         "--sparse-local": sparse_local, "--sparse-block": sparse_block})
    settings.update({"--limit": limit, "--max-new-tokens": max_new_tokens, "--seed": seed, "--max-length": max_length,
                     "--device": device, "--dtype": dtype, "--chat-template": chat})
    settings.update({f"--data {task}": path for task, path in sorted(data_paths.items())})
    if "niah" in task_names:
        settings.update({"--niah-lengths": niah["lengths"], "--niah-depths": niah["depths"],
                         "--niah-samples": niah_samples, "--haystack": niah["haystack_dir"]})
    settings.update({f"--task-option {task}.{key}": value for task, values in sorted(texts.items())
                     for key, value in sorted(values.items())})
    if any(t.startswith(LM_EVAL_PREFIX) for t in task_names):
        settings["--include-path"] = common["include_path"]
    if "humaneval" in task_names:
        settings["--allow-code-execution"] = allow_code_execution
    settings = json.loads(json.dumps(settings))

    shard = distributed.start(device)  # None unless torchrun started several processes
    store = distributed.run_store(output, shard, settings=settings, overwrite=overwrite) if output else None
    keep_from = nearest_existing(output) if output else None
    if store is not None:
        plan = store.plan()  # a file, a foreign folder, a run with other settings: one line, before the model loads
        if plan.state == "complete":
            click.echo(f"already complete: {store.root} holds all {plan.total} samples and metrics.json "
                       "(--overwrite runs it again)", err=True)
            if shard is None or shard.rank == 0:
                print_metrics(json.loads((store.root / "metrics.json").read_text(encoding="utf-8")))
                click.echo(f"run directory: {store.root}")
            return
        if plan.state == "resume":
            click.echo(f"resuming {plan.done}/{plan.total} samples in {store.root}", err=True)

    tasks = build_tasks(task_names, common, per_task, texts)
    for task in tasks.values():  # data loaded and checked (empty, missing subsets) before the model loads
        prepare = getattr(task, "prepare", None)
        if prepare is not None:
            prepare()

    click.echo(f"loading {model_spec} ...", err=True)
    started = time.perf_counter()
    sparse = None
    if attention == "sparse":
        from nsa_eval.model_adapters.runtime.config import SparseSettings

        sparse = SparseSettings(sparse_budget, sparse_leading, sparse_local, sparse_block)
    try:
        model = load_model(model_spec, device=shard.device(device) if shard else device, dtype=dtype,
                           max_length=max_length, batch_size=batch_size, attention=attention, sparse=sparse,
                           prefill_chunk=prefill_chunk, engine=engine)
    except KeyboardInterrupt:
        click.echo("interrupted while the model loaded; nothing was written", err=True)
        raise click.exceptions.Exit(130) from None
    click.echo(f"loaded {model.name} in {time.perf_counter() - started:.1f} s", err=True)
    if store is None:
        run_dir = default_run_dir(model.name, task_names)
        keep_from = nearest_existing(run_dir)
        store = distributed.run_store(run_dir, shard, settings=settings, overwrite=overwrite)
        store.plan()
    assert keep_from is not None
    device_type = str(getattr(model, "device", device)).split(":")[0]  # which GPU does not change the results
    alone = shard is None
    try:
        metrics = run_tasks(
            model, model_spec, tasks, store, seed=seed, limit=limit, chat=chat,
            batch_size=getattr(model, "batch_size", batch_size or 1),
            extra_config={"device": device_type, "dtype": str(getattr(model, "dtype", dtype)),
                          **({"attention": "sparse", "sparse": vars(sparse)} if sparse else {})},
            argv=sys.argv, show_progress=not quiet and (shard is None or shard.rank == 0), max_new_tokens=max_new_tokens,
        )
    except KeyboardInterrupt:
        if alone and not store.has_samples():
            store.discard_unstarted(keep_from)
            click.echo("interrupted before the first sample; nothing was kept", err=True)
        else:
            done, total = store.counts()
            click.echo(f"interrupted: {done}/{total} samples kept in {store.root}; rerun the same command to resume",
                       err=True)
        raise click.exceptions.Exit(130) from None
    except BaseException:
        if alone:
            store.discard_unstarted(keep_from)  # a run that failed before its first sample leaves nothing behind
        raise
    if metrics is None:  # a data-parallel process other than rank 0
        return
    print_metrics(metrics)
    click.echo(f"run directory: {store.root}")


QUICKSTART_RUN = Path("results") / "runs" / "quickstart-smollm2"


@main.command()
@click.option("--output", type=click.Path(path_type=Path), default=QUICKSTART_RUN, show_default=True,
              help="Run directory (rerunning resumes; the report goes to <output>/report).")
@click.pass_context
def quickstart(ctx: click.Context, output: Path) -> None:
    """The README's first job: the embedded SmolLM2 on a CPU-sized needle-in-a-haystack grid (512 to 2048
    tokens x 5 depths, a few minutes on 2 cores), then its report (Markdown table, heatmap, HTML)."""
    from nsa_eval.report.commands import report

    ctx.invoke(run, model_spec="smollm2", task_list="niah", niah_lengths="512,1k,1536,2k",
               niah_depths="0,25,50,75,100", output=output)
    ctx.invoke(report, runs=(str(output),), out_dir=output / "report")


@main.command(name="list")
@click.argument("what", type=click.Choice(["tasks", "models"]))
def list_things(what: str) -> None:
    """List the registered tasks or the model specs."""
    if what == "tasks":
        for name, factory in sorted(TASKS.items()):
            doc = (inspect.getdoc(sys.modules[factory.__module__]) or "").splitlines()
            click.echo(f"{name:<14} v{getattr(factory, 'version', '?'):<4} {doc[0] if doc else ''}")
    else:
        for spec, what_it_is in MODEL_KINDS.items():
            click.echo(f"{spec:<18} {what_it_is}")


from nsa_eval.report.commands import publish, report  # noqa: E402  (the report commands live with the reporter)

main.add_command(report)
main.add_command(publish)

main.add_command(bench)  # the group and its subcommands: nsa_eval/bench/

from nsa_eval.serve import serve  # noqa: E402  (the OpenAI-compatible server lives in nsa_eval/serve.py)

main.add_command(serve)


@main.command(name="lm-eval", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("lm_eval_args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(lm_eval_args: tuple[str, ...]) -> None:
    """lm-evaluation-harness's own CLI with our backends registered as `--model nsa-eval`, e.g.
    `nsa-eval lm-eval --model nsa-eval --model_args model=SPEC --tasks hellaswag`."""
    from nsa_eval.lm_eval_bridge import run_lm_eval_cli

    run_lm_eval_cli(list(lm_eval_args))

if __name__ == "__main__":
    main()
