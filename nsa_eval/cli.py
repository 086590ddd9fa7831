"""The `nsa-eval` command line. Bad input ends in one line (`Error: ...`) and exit code 1, never a traceback."""

from __future__ import annotations

import inspect
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from nsa_eval.bench import bench
from nsa_eval.registry import MODEL_KINDS, TASKS, task_factory


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


def parse_int_list(text: str, option: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096]."""
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)([kK]?)", part)
        if not match:
            raise ValueError(f"{option} '{text}': '{part}' is not a whole number (e.g. 1024 or 4k)")
        values.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not values:
        raise ValueError(f"{option} is empty; give comma-separated numbers such as 1024,2048")
    return values


def parse_data_paths(pairs: tuple[str, ...], task_names: list[str]) -> dict[str, str]:
    """('mmlu=/data/mmlu.jsonl', ...) -> {'mmlu': '/data/mmlu.jsonl'}; a bare PATH applies to a single task."""
    paths: dict[str, str] = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep:
            if len(task_names) != 1:
                raise ValueError(f"--data {pair}: with several tasks, name the task: --data TASK=PATH")
            task, path = task_names[0], pair
        if task not in task_names:
            raise ValueError(f"--data {pair}: task '{task}' is not among --tasks {','.join(task_names)}")
        paths[task] = path
    return paths


def parse_option_value(text: str) -> Any:
    """'true' -> True, '3' -> 3, '0.7' -> 0.7, 'a,b' -> ['a', 'b'], anything else stays text."""
    if "," in text:
        return [parse_option_value(part.strip()) for part in text.split(",") if part.strip()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_task_options(pairs: tuple[str, ...], task_names: list[str]) -> dict[str, dict[str, Any]]:
    """('mmlu.variant=generative', ...) -> {'mmlu': {'variant': 'generative'}}."""
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        task, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ValueError(f"--task-option {pair}: write TASK.KEY=VALUE, e.g. mmlu.num_fewshot=0")
        if task not in task_names:
            raise ValueError(f"--task-option {pair}: task '{task}' is not among --tasks {','.join(task_names)}")
        options.setdefault(task, {})[option.replace("-", "_")] = parse_option_value(value)
    return options


def build_tasks(task_names: list[str], options: dict[str, Any], per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each task built with the options its constructor accepts (common ones, then its own)."""
    tasks = {}
    for name in task_names:
        factory = task_factory(name)  # raises the "unknown task ... did you mean" line
        accepted = inspect.signature(factory).parameters
        explicit = per_task.get(name, {})
        unknown = sorted(set(explicit) - set(accepted))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            known = ", ".join(k for k, p in accepted.items() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)
            raise ValueError(f"task '{name}' has no option '{unknown[0]}'; its options: {known}")
        wanted = {**options, **explicit}
        tasks[name] = factory(**{k: v for k, v in wanted.items() if k in accepted})
    return tasks


def default_run_dir(model_name: str, task_names: list[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model_name}-{'-'.join(task_names)}").strip("-")
    return Path("results") / "runs" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


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
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N samples of each task.")
@click.option("--output", type=click.Path(path_type=Path),
              help="Run directory. Default: results/runs/<model>-<tasks>-<time>. Rerunning into the same directory "
                   "with the same settings resumes; different settings are refused.")
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
              help="Read a task's data from a local file (jsonl, json, parquet, csv) instead of its hub id. Repeatable.")
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
                   "aime.n_samples=4, ruler.lengths=4k,8k, ruler.essays=DIR (lists with commas). Repeatable; an unknown "
                   "key lists the task's options.")
@click.option("--include-path", type=click.Path(path_type=Path),
              help="A folder of lm-evaluation-harness task YAML files, for --tasks lm-eval:TASK.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(model_spec: str, attention: str, sparse_budget: int, sparse_leading: int, sparse_local: int,
        sparse_block: int, task_list: str, limit: int | None, output: Path | None, seed: int, engine: str,
        batch_size: int | None,
        max_length: int | None, prefill_chunk: int | None, device: str, dtype: str, chat: bool | None,
        data_pairs: tuple[str, ...], allow_code_execution: bool, niah_lengths: str, niah_depths: str,
        niah_samples: int, haystack: Path | None, task_options: tuple[str, ...], include_path: Path | None,
        quiet: bool) -> None:
    """Evaluate a model on tasks; writes run.json, samples/<task>.jsonl and metrics.json to the run directory."""
    from nsa_eval import distributed
    from nsa_eval.models import load_model
    from nsa_eval.runner import run as run_tasks

    task_names = [t.strip() for t in task_list.split(",") if t.strip()]
    if not task_names:
        raise ValueError("--tasks is empty; name at least one task (`nsa-eval list tasks`)")
    data_paths = parse_data_paths(data_pairs, task_names)
    per_task = {name: {"data_path": path} for name, path in data_paths.items()}
    per_task.setdefault("niah", {}).update(
        lengths=parse_int_list(niah_lengths, "--niah-lengths"),
        depths=parse_int_list(niah_depths, "--niah-depths"),
        samples_per_cell=niah_samples,
        haystack_dir=str(haystack) if haystack else None,
    )
    for name, options in parse_task_options(task_options, task_names).items():
        per_task.setdefault(name, {}).update(options)
    common = {"seed": seed, "allow_code_execution": allow_code_execution,
              "include_path": str(include_path) if include_path else None}
    tasks = build_tasks(task_names, common, per_task)
    if output is not None and output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a directory for the run")

    shard = distributed.start(device)  # None unless torchrun started several processes
    click.echo(f"loading {model_spec} ...", err=True)
    sparse = None
    if attention == "sparse":
        from nsa_eval.model_adapters.runtime.config import SparseSettings

        sparse = SparseSettings(sparse_budget, sparse_leading, sparse_local, sparse_block)
    model = load_model(model_spec, device=shard.device(device) if shard else device, dtype=dtype,
                       max_length=max_length, batch_size=batch_size, attention=attention, sparse=sparse,
                       prefill_chunk=prefill_chunk, engine=engine)
    run_dir = output or default_run_dir(model.name, task_names)
    store = distributed.run_store(run_dir, shard)
    device_type = str(getattr(model, "device", device)).split(":")[0]  # which GPU does not change the results
    metrics = run_tasks(
        model, model_spec, tasks, store, seed=seed, limit=limit, chat=chat,
        batch_size=getattr(model, "batch_size", batch_size or 1),
        extra_config={"device": device_type, "dtype": str(getattr(model, "dtype", dtype)),
                      **({"attention": "sparse", "sparse": vars(sparse)} if sparse else {})},
        argv=sys.argv, show_progress=not quiet and (shard is None or shard.rank == 0),
    )
    if metrics is None:  # a data-parallel process other than rank 0
        return
    for name, result in metrics["tasks"].items():
        headline = result["metrics"].get(result["headline"], {})
        click.echo(f"{name}: {result['headline']} = {headline.get('mean', float('nan')):.4f} "
                   f"± {headline.get('stderr', float('nan')):.4f} (n={result['n']})")
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


main.add_command(bench)

from nsa_eval.bench_model import model_command  # noqa: E402  (`nsa-eval bench model` lives in nsa_eval/bench_model.py)

bench.add_command(model_command)

from nsa_eval.bench_tasks import tasks_command  # noqa: E402  (`nsa-eval bench tasks`: scoring speed on the CPU)

bench.add_command(tasks_command)

from nsa_eval.bench_eval import eval_command  # noqa: E402  (`nsa-eval bench eval`: the engine end to end, GPU)

bench.add_command(eval_command)

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
