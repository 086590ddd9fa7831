"""The `nsa-eval` command line. Bad input ends in one line (`Error: ...`) and exit code 1, never a traceback."""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from nsa_eval.bench import bench
from nsa_eval.model_adapters.runtime.config import SELECTIONS, SparseSettings
from nsa_eval.models import MODEL_KINDS
from nsa_eval.records import TaskMetrics
from nsa_eval.registry import TASKS
from nsa_eval.run_config import RunConfig


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


def _limit_help() -> str:
    per = [f"of each {factory.limit_unit} for {name}" for name, factory in sorted(TASKS.items()) if factory.limit_unit]
    return ("Evaluate only the first N samples of each task: the first N " + " and ".join(per) +
            " (mmlu --limit 3 is 3 x 57 questions), the first N cells of the niah grid, the first N documents of an "
            "lm-eval task. The count per task is printed when the run starts.")


def print_metrics(metrics: dict[str, Any]) -> None:
    """A line per task of metrics.json (as the runner returns it): headline mean ± standard error and n."""
    shown = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731 - null: none (metrics.json says why)
    for name, entry in metrics["tasks"].items():
        result = TaskMetrics.from_json(entry)
        headline = result.metrics.get(result.headline, {})
        click.echo(f"{name}: {result.headline} = {shown(headline.get('mean'))} "
                   f"± {shown(headline.get('stderr'))} (n={result.n})")


@main.command()
@click.option("--model", "model_spec", default="smollm2", show_default=True,
              help="What to evaluate: 'smollm2' (embedded SmolLM2-135M-Instruct), 'hf:PATH_OR_ID' (a transformers "
                   "causal LM folder) or 'nsa:PATH' (an NSA checkpoint). `nsa-eval list models` shows every kind.")
@click.option("--attention", type=click.Choice(["full", "sparse"]), default="full", show_default=True,
              help="For smollm2 and hf: checkpoints: full attention (our kernels on CUDA), or training-free NSA-style "
                   "sparse attention (top blocks by mean-pooled keys, leading and local tokens always kept).")
@click.option("--sparse-budget", metavar="N[,N...]",
              help=f"Sparse attention: tokens each query sees (leading + local + selected blocks). "
                   f"Default: {SparseSettings.budget}. Several, e.g. 512,1k,2048, make a budget sweep: one run per "
                   "budget in <output>/budget-N/ (each resumable; a rerun skips the finished ones), then the sweep's "
                   "report (accuracy against budget) in <output>/report/.")
@click.option("--sparse-leading", type=click.IntRange(min=1),
              help=f"Sparse attention: leading tokens always kept. Default: {SparseSettings.leading}.")
@click.option("--sparse-local", type=click.IntRange(min=1),
              help=f"Sparse attention: most recent tokens always kept. Default: {SparseSettings.local}.")
@click.option("--sparse-block", type=click.IntRange(min=1),
              help=f"Sparse attention: block length of the selection. Default: {SparseSettings.block}.")
@click.option("--sparse-selection", type=click.Choice(SELECTIONS),
              help="Sparse attention: rank the blocks for each query (query, the default), or once for each tile of "
                   "--sparse-block consecutive queries from their summed importance (tile: NSA's way; a faster "
                   "prefill, each query keeping its local tokens). Decoding ranks per query either way.")
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
                   "(lm-eval:TASK too; perplexity: your documents, a .txt file, a folder of .txt files or a .jsonl "
                   "file with a \"text\" field). Repeatable, once per task. Hub data is read from the local datasets cache "
                   "first; HF_DATASETS_OFFLINE=1 keeps it there.")
@click.option("--allow-code-execution", is_flag=True,
              help="Allow tasks that run model-written code (humaneval); it runs in a sandbox.")
@click.option("--niah-lengths", metavar="LIST", help="Alias of --task-option niah.lengths=LIST (context lengths in the "
              "model's tokens, k = 1024; default 1k,2k,4k).")
@click.option("--niah-depths", metavar="LIST", help="Alias of --task-option niah.depths=LIST (needle depths in percent; "
              "default 0,25,50,75,100).")
@click.option("--niah-samples", type=click.IntRange(min=1), help="Alias of --task-option niah.samples_per_cell=N (samples "
              "per length x depth cell, each with its own random value; default 1).")
@click.option("--haystack", type=click.Path(path_type=Path), help="Alias of --task-option niah.haystack_dir=DIR (a "
              "folder of .txt files as the haystack; default: generated filler text).")
@click.option("--task-option", "task_options", multiple=True, metavar="TASK.KEY=VALUE",
              help="A task's own option, e.g. niah.lengths=1k,2k, niah.depths=0,50,100, mmlu.variant=generative, "
                   "gsm8k.variant=standard, longbench.subsets=table2, aime.n_samples=4, ruler.lengths=4k,8k, "
                   "ruler.essays=DIR, perplexity.bin_width=1k, perplexity.window=sliding (lists with commas; token "
                   "counts may end in k = 1024). Repeatable; values are "
                   "read as the option's type, and an unknown key lists the task's options.")
@click.option("--include-path", type=click.Path(path_type=Path),
              help="A folder of lm-evaluation-harness task YAML files, for --tasks lm-eval:TASK.")
@click.option("--quiet", is_flag=True, help="No progress (a bar on a terminal, else a line per task at most every 30 s).")
def run(**options: Any) -> None:
    """Evaluate a model on tasks; writes run.json, samples/<task>.jsonl and metrics.json to the run directory.

    Everything is checked before the model loads (task options, data, the run directory), so a bad command ends in
    one line at once; a run that stops before its first sample leaves nothing behind; Ctrl-C keeps the samples
    answered (exit code 130) and the same command resumes. Several --sparse-budget values run a budget sweep: one
    run folder per budget under --output, one after another, then the sweep's report."""
    try:
        configs = RunConfig.points_from_cli(**options)
        if len(configs) == 1:
            _run(configs[0])
        else:
            _sweep(configs)
    except KeyboardInterrupt:
        click.echo("interrupted before the model loaded; nothing was written", err=True)
        raise click.exceptions.Exit(130) from None


def _sweep(configs: list[RunConfig]) -> None:
    """A budget sweep (nsa_eval/sweep.py): every point checked before the first model loads, then each run as `run`
    runs it (a finished point is "already complete" and loads nothing), then the sweep's report."""
    import gc

    from nsa_eval.report.commands import report
    from nsa_eval.sweep import Sweep

    sweep = Sweep.of(configs)
    sweep.check()
    sweep.write_manifest()
    click.echo(sweep.describe(), err=True)
    results: dict[int, dict[str, TaskMetrics]] = {}  # budget -> task -> its metrics
    for point in sweep.points:
        click.echo(f"--sparse-budget {point.budget}: {point.folder}", err=True)
        _run(point.config)
        gc.collect()  # the point's model is gone before the next one loads
        metrics_file = point.folder / "metrics.json"
        if metrics_file.is_file():
            tasks = json.loads(metrics_file.read_text(encoding="utf-8"))["tasks"]
            results[point.budget] = {name: TaskMetrics.from_json(entry) for name, entry in tasks.items()}
    for task in sweep.points[0].config.tasks:
        shown = []
        for budget, metrics in results.items():
            mean = metrics[task].metrics.get(metrics[task].headline, {}).get("mean") if task in metrics else None
            shown.append(f"{budget}: {'n/a' if mean is None else f'{mean:.4f}'}")
        headline = next((m[task].headline for m in results.values() if task in m), "score")
        click.echo(f"{task} {headline} by --sparse-budget: " + "; ".join(shown))
    click.get_current_context().invoke(report, runs=(str(sweep.root),), out_dir=sweep.root / "report")


def _run(config: RunConfig) -> None:
    from nsa_eval import distributed
    from nsa_eval.models import check_model, load_model
    from nsa_eval.runner import evaluate
    from nsa_eval.store import Plan, RunStore, nearest_existing

    spec = check_model(config.model_spec, config.load_options())
    settings = config.settings()
    shard = distributed.start(config.device)  # None unless torchrun started several processes
    store: RunStore | None = None
    keep_from: Path | None = None  # the nearest folder that existed before the run folder: what a failed start keeps

    def take(folder: Path) -> Plan:
        """The run's store, locked and checked (a file, a foreign folder, a run with other settings: one line)."""
        nonlocal store, keep_from
        keep_from = nearest_existing(folder)
        store = distributed.run_store(folder, shard, settings=settings, overwrite=config.overwrite)
        click.get_current_context().call_on_close(store.unlock)  # released when the command ends, errors too
        return store.plan()

    if config.output is not None:  # checked before the model loads; else once its name gives the folder
        plan = take(config.output)
        if plan.state == "complete":
            click.echo(f"already complete: {store.root} holds all {plan.total} samples and metrics.json "
                       "(--overwrite runs it again)", err=True)
            if shard is None or shard.rank == 0:
                print_metrics(json.loads((store.root / "metrics.json").read_text(encoding="utf-8")))
                click.echo(f"run directory: {store.root}")
            return
        if plan.state == "resume":
            click.echo(f"resuming {plan.done}/{plan.total} samples in {store.root}", err=True)

    stage = "before the model loaded"
    try:  # the folder is held (store.plan locked it): whatever fails before the first sample leaves it as it was
        tasks = config.build_tasks()
        for task in tasks.values():  # data loaded and checked (empty, missing subsets) before the model loads
            task.prepare()
            if config.max_length is not None:  # NIAH's, RULER's lengths against --max-length
                task.check_length(config.max_length, config.max_new_tokens)
            for notice in task.notices:  # e.g. RULER without its QA data: which tasks run
                click.echo(notice, err=True)
        click.echo(f"loading {config.model_spec} ...", err=True)
        stage, started = "while the model loaded", time.perf_counter()
        model = load_model(spec, config.load_options(shard.device(config.device) if shard else None))
        click.echo(f"loaded {model.name} in {time.perf_counter() - started:.1f} s", err=True)
        stage = "before the first sample"
        if store is None:
            take(config.default_run_dir(model.name))
        assert store is not None
        metrics = evaluate(model, tasks, store, config,
                           show_progress=not config.quiet and (shard is None or shard.rank == 0))
    except KeyboardInterrupt:
        if store is not None and (shard is not None or store.has_samples()):
            done, total = store.counts()
            click.echo(f"interrupted: {done}/{total} samples kept in {store.root}; rerun the same command to resume",
                       err=True)
        else:
            if store is not None and keep_from is not None:
                store.discard_unstarted(keep_from)
            click.echo(f"interrupted {stage}; nothing was kept", err=True)
        raise click.exceptions.Exit(130) from None
    except BaseException:
        if shard is None and store is not None and keep_from is not None:
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

    ctx.invoke(run, model_spec="smollm2", task_list="niah",
               task_options=("niah.lengths=512,1k,1536,2k", "niah.depths=0,25,50,75,100"), output=output)
    ctx.invoke(report, runs=(str(output),), out_dir=output / "report")


@main.command(name="list")
@click.argument("what", type=click.Choice(["tasks", "models"]))
def list_things(what: str) -> None:
    """List the registered tasks or the model specs."""
    if what == "tasks":
        for name, factory in sorted(TASKS.items()):
            doc = (inspect.getdoc(sys.modules[factory.__module__]) or "").splitlines()
            click.echo(f"{name:<14} v{factory.version:<4} {doc[0] if doc else ''}")
    else:
        for spec, what_it_is in MODEL_KINDS.items():
            click.echo(f"{spec:<18} {what_it_is}")


@main.command()
@click.option("--model", "model_spec", required=True,
              help="The checkpoint to convert: nsa:PATH (ours, or flash-linear-attention's), hf:PATH or smollm2 (their "
                   "config must fit the layout: full-attention checkpoints do not fit fla's NSA).")
@click.option("--layout", type=click.Choice(["fla"]), required=True,
              help="fla: flash-linear-attention's NSA checkpoint (config.json with model_type nsa and fla's field "
                   "names, fla's weight names), which fla.models.NSAForCausalLM.from_pretrained and nsa:OUT load.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A new or empty folder.")
def export(model_spec: str, layout: str, out: Path) -> None:
    """Write a checkpoint in another library's layout: config.json and model.safetensors, with the tokenizer and
    generation_config.json found beside the source. What the layout cannot hold (fla: MLP compression, separate K/V
    per branch, block_len != block_stride or select_len, ...) is refused in one line before anything is written."""
    from nsa_eval.model_adapters.runtime.checkpoint import export_fla
    from nsa_eval.model_adapters.runtime.weights import fla_kernel_limits
    from nsa_eval.models import checkpoint_folder

    assert layout == "fla"  # click.Choice
    folder = checkpoint_folder(model_spec)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} is not an empty folder; give a new or empty one")
    config, copied = export_fla(folder, out)
    click.echo(f"wrote {out}: flash-linear-attention NSA checkpoint (config.json, model.safetensors"
               f"{', ' + ', '.join(copied) if copied else ''})")
    if not any(name.startswith("tokenizer") for name in copied):
        click.echo(f"note: {folder} holds no tokenizer files, so {out} has none; nsa:{out} needs one", err=True)
    for limit in fla_kernel_limits(config):
        click.echo(f"note: fla 0.6.0 loads it, but its NSA op needs more: {limit}", err=True)


from nsa_eval.report.commands import publish, report  # noqa: E402  (the report commands live with the reporter)

main.add_command(report)
main.add_command(publish)

main.add_command(bench)  # the group and its subcommands: nsa_eval/bench/

from nsa_eval.serve import serve  # noqa: E402  (the OpenAI-compatible server lives in nsa_eval/serve.py)

main.add_command(serve)

from nsa_eval.retrofit import retrofit  # noqa: E402  (full attention -> NSA by distillation: nsa_eval/retrofit.py)

main.add_command(retrofit)

from nsa_eval.fidelity import inspect as inspect_command  # noqa: E402  (selection fidelity: nsa_eval/fidelity.py)

main.add_command(inspect_command)


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
