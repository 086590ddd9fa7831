"""`nsa-eval inspect`: selection fidelity of a sparse model on a task's real prompts (issue 21).

Per layer and KV head, at sampled query positions of each prompt: the recall of dense attention's top-n blocks by the
model's own block selection, and the share of dense attention mass on the tokens the model attends (selected blocks,
which hold the always-kept leading and local ones, plus NSA's window). The definitions are those of
model_adapters/runtime/fidelity.py, which captures each layer's q, k and block indices from the model's own prefill
(Triton kernels on CUDA, the PyTorch reference on the CPU). Prompts are the task's samples encoded and cut as the
native engine does for `nsa-eval run`; the command's task options are `run`'s, read by the same RunConfig.

Output folder: fidelity.json (means per layer x KV head, per layer, per KV head, per query-position bin; the prompts
and positions used), layer_x_head.{png,svg,pdf} and layer_x_position.{png,svg,pdf} (recall and mass share side by
side); the table is printed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click

from nsa_eval.model_adapters.runtime.config import SELECTIONS, SparseSettings
from nsa_eval.run_config import RunConfig, parse_budgets
from nsa_eval.tasks.base import Sample, token_count

METRICS = {"recall": "recall of dense top-n blocks", "mass_share": "dense mass share attended"}
RESULT_FILE = "fidelity.json"
FIGURES = ("layer_x_head", "layer_x_position")
INSPECTABLE = ("smollm2", "smollm2-nsa", "hf", "nsa")
DEFINITIONS = {
    "dense attention": "softmax(q k^T / sqrt(head_dim)) over tokens s <= t with the layer's own q and k (after RoPE; "
                       "NSA: the selection branch's keys), each query head's probabilities summed over the query "
                       "heads of a KV head (NSA eq. 10): mass m(s), summing to G = query heads per KV head",
    "block mass": "sum of m(s) over a selection block's tokens (NSA: select_len; sparse: its block)",
    "n": "min(the model's selected blocks per query (NSA num_selected; sparse budget // block), blocks visible at t)",
    "recall": "|selected blocks with block mass >= the n-th largest visible block mass| / n (= |selected ∩ dense "
              "top-n| / n; a selected block tied with the n-th counts)",
    "mass_share": "dense mass on the tokens the model attends (its selected blocks, the always-kept leading and local "
                  "blocks among them, plus NSA's window of the last w tokens) / G; NSA's compressed branch not "
                  "counted",
    "selective queries": "queries with more visible blocks than n, where the selection has a choice",
}


def _bin_width(value: str | None) -> int | None:
    if value is None or str(value).strip().lower() == "auto":
        return None
    width = token_count(value, "--bin-width")
    if width < 1:
        raise ValueError(f"--bin-width {value} is not a width; give a positive number of tokens, e.g. 1k, or auto")
    return width


def auto_bin_width(longest: int) -> int:
    """A power of two >= 64 giving at most 8 position bins over the longest prompt."""
    width = 64
    while width * 8 < longest:
        width *= 2
    return width


def check_inspectable(model_spec: str, attention: str) -> None:
    """One line for a spec inspect cannot look into (a server, vLLM) or a model without block selection."""
    kind = model_spec.partition(":")[0]
    if kind not in INSPECTABLE:
        raise ValueError(f"inspect reads the model's own q, k and block selection on the native engine: give smollm2, "
                         f"smollm2-nsa, hf:PATH (a Llama-family checkpoint) or nsa:PATH, not '{model_spec}'")
    if attention == "full" and kind in ("smollm2", "hf"):
        raise ValueError(f"{model_spec} runs full attention, which selects no blocks: add --attention sparse (its "
                         "training-free block selection, with --sparse-budget) or inspect an NSA checkpoint "
                         "(smollm2-nsa, nsa:PATH)")


def check_output(folder: Path) -> None:
    """inspect writes into a new or empty folder, or over an earlier inspect's output (its fidelity.json)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / RESULT_FILE).is_file():
        raise ValueError(f"--output {folder} holds other files (no {RESULT_FILE}); give a new or empty folder")


class Totals:
    """Sums of recall and mass share over the sampled queries: per layer x KV head, per position bin, and over the
    selective queries (those where n < visible blocks)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0
        self.bins: dict[int, dict[str, Any]] = {}
        self.selective = {"queries": 0, "recall": 0.0, "mass_share": 0.0}

    def add(self, recall, share, positions: list[int], bin_width: int, selective: list[bool]) -> None:
        """recall, share [layers, P, H] (torch, CPU) at `positions` [P]."""
        for name, values in (("recall", recall.double()), ("mass_share", share.double())):
            self.sums[name] = self.sums.get(name, 0) + values.sum(1)
            for i, position in enumerate(positions):
                cell = self.bins.setdefault(position // bin_width, {"queries": 0})
                cell[name] = cell.get(name, 0) + values[:, i]
            for i, chosen in enumerate(selective):
                if chosen:
                    self.selective[name] += float(values[:, i].mean())
        for position in positions:
            self.bins[position // bin_width]["queries"] += 1
        self.count += len(positions)
        self.selective["queries"] += sum(selective)

    def mean(self, name: str) -> float:
        return float(self.sums[name].mean()) / self.count


def summarise(totals: Totals, bin_width: int) -> dict[str, Any]:
    """The metrics part of fidelity.json: per metric the mean, by_layer_head [L][H], by_layer [L], by_head [H], and
    per position bin by_bin_layer_head [B][L][H], by_bin_layer [B][L], by_bin [B]; the bins and the selective
    queries' means (null when there are none)."""
    bins = sorted(totals.bins)
    metrics: dict[str, Any] = {}
    for name in METRICS:
        grid = totals.sums[name] / totals.count  # [L, H]
        per_bin = [totals.bins[b][name] / totals.bins[b]["queries"] for b in bins]
        metrics[name] = {
            "mean": float(grid.mean()),
            "by_layer_head": grid.tolist(),
            "by_layer": grid.mean(1).tolist(),
            "by_head": grid.mean(0).tolist(),
            "by_bin_layer_head": [g.tolist() for g in per_bin],
            "by_bin_layer": [g.mean(1).tolist() for g in per_bin],
            "by_bin": [float(g.mean()) for g in per_bin],
        }
    chosen = totals.selective["queries"]
    return {
        "queries": totals.count,
        "metrics": metrics,
        "position_bins": [{"first": b * bin_width, "last": (b + 1) * bin_width - 1,
                           "queries": totals.bins[b]["queries"]} for b in bins],
        "selective": {"queries": chosen,
                      **{name: (totals.selective[name] / chosen if chosen else None) for name in METRICS}},
    }


def table(result: dict[str, Any]) -> list[str]:
    """The terminal table: a row per layer (each KV head's recall and mass share when there are at most 8 heads,
    else their mean, min and max), the mean over layers, then a row per query-position bin."""
    metrics = result["metrics"]
    heads = result["kv_heads"]
    selection = result["selection"]
    lines = [f"selection fidelity of {result['model']} on {result['task']}: {len(result['prompts'])} prompts, "
             f"{result['queries']} query positions, {result['layers']} layers x {heads} KV heads "
             f"({result['kernels']} kernels on {result['device']})",
             f"n = {selection['num_selected']} blocks of {selection['block']} tokens"
             + (f", window {selection['window']}" if selection.get("window") else "")
             + "; recall of dense attention's top-n blocks, dense mass share on the attended tokens"]

    def cells(values: list[float]) -> str:
        if heads <= 8:
            return " ".join(f"{v:5.3f}" for v in values) + f" | {sum(values) / len(values):5.3f}"
        return f"{sum(values) / len(values):5.3f} {min(values):5.3f} {max(values):5.3f}"

    head_names = " ".join(f"{'h' + str(h):>5}" for h in range(heads)) + " |  mean" if heads <= 8 else \
        " mean   min   max"
    width = len(head_names)
    lines.append(f"{'layer':>5}  {'recall':<{width}}   {'mass share':<{width}}")
    lines.append(f"{'':>5}  {head_names}   {head_names}")
    for layer in range(result["layers"]):
        lines.append(f"{layer:>5}  {cells(metrics['recall']['by_layer_head'][layer])}   "
                     f"{cells(metrics['mass_share']['by_layer_head'][layer])}")
    lines.append(f"{'all':>5}  {cells(metrics['recall']['by_head'])}   {cells(metrics['mass_share']['by_head'])}")
    lines.append(f"{'query positions':<16} {'queries':>7} {'recall':>7} {'mass share':>10}")
    for i, cell in enumerate(result["position_bins"]):
        lines.append(f"{cell['first']:>7}-{cell['last']:<8} {cell['queries']:>7} "
                     f"{metrics['recall']['by_bin'][i]:>7.3f} {metrics['mass_share']['by_bin'][i]:>10.3f}")
    selective = result["selective"]
    if selective["queries"]:
        lines.append(f"where the selection has a choice (more visible blocks than n; {selective['queries']} of "
                     f"{result['queries']} queries): recall {selective['recall']:.3f}, mass share "
                     f"{selective['mass_share']:.3f}")
    else:
        lines.append("no query saw more blocks than n: every block was selected (recall and mass share 1 by "
                     "construction); longer prompts or a smaller budget show the selection at work")
    return lines


def figures(result: dict[str, Any]) -> dict[str, dict[str, bytes]]:
    """{name: {format: bytes}}: layer x KV head and layer x query-position bin, recall and mass share side by side."""
    import numpy as np

    from nsa_eval.report.figures import matrix_panels

    metrics = result["metrics"]
    layers = [str(layer) for layer in range(result["layers"])]
    title = f"{result['model']} on {result['task']}: selection fidelity ({result['queries']} queries)"
    by_head = matrix_panels(title, {METRICS[m]: np.array(metrics[m]["by_layer_head"]) for m in METRICS},
                            [f"h{h}" for h in range(result["kv_heads"])], layers, "KV head", "layer")
    bins = [f"{b['first']}-{b['last']}" for b in result["position_bins"]]
    by_position = matrix_panels(title + ", mean over KV heads",
                                {METRICS[m]: np.array(metrics[m]["by_bin_layer"]).T for m in METRICS}, bins, layers,
                                "query position (tokens)", "layer")
    return dict(zip(FIGURES, (by_head, by_position)))


def prompt_ids(model: Any, sample: Sample, max_new_tokens: int | None) -> tuple[list[int], bool]:
    """A sample's prompt tokens as the engine takes them: a generative sample's request (cut in the middle to leave
    its generation budget, after the --max-new-tokens cap), else the prompt (a log-likelihood context, a rolling
    document) encoded and cut in the middle to the model's max length."""
    from nsa_eval.model_adapters.prompts import truncate_middle
    from nsa_eval.runner import generation_request

    if sample.generative:
        if max_new_tokens is not None:
            sample = dataclasses.replace(sample, max_new_tokens=min(sample.max_new_tokens, max_new_tokens))
        return model.prompt_ids(generation_request(sample, 0))
    return truncate_middle(model.encode(sample.prompt), model.max_length)


def inspect_task(model: Any, task_name: str, task: Any, config: RunConfig, positions: int, bin_width: int | None,
                 show_progress: bool) -> dict[str, Any]:
    """fidelity.json's content: the task's first --limit prompts through the model (module docstring); each prompt
    is recorded with its sample id, breakdown, length, whether it was cut, its query positions and its own means."""
    import torch

    from nsa_eval import store as run_store
    from nsa_eval.model_adapters.runtime.fidelity import Selection, inspect_prompt, query_positions
    from nsa_eval.progress import heartbeat
    from nsa_eval.tasks.base import TaskContext

    runtime = model.model
    selection = Selection.of(runtime.config)
    use_chat = model.chat if config.chat is None else config.chat
    ctx = TaskContext(count_tokens=model.count_tokens, chat=use_chat, max_length=model.max_length, seed=config.seed,
                      limit=config.limit, max_new_tokens=config.max_new_tokens)
    with heartbeat(f"{task_name}: building its samples", show_progress):
        samples = task.samples(ctx)[:config.limit]
    if not samples:
        raise ValueError(f"task {task_name} has no samples (its data or options select none)")
    encoded = [prompt_ids(model, sample, config.max_new_tokens) for sample in samples]
    width = bin_width or auto_bin_width(max(len(ids) for ids, _ in encoded))
    totals, prompts, started = Totals(), [], time.perf_counter()
    for number, (sample, (ids, truncated)) in enumerate(zip(samples, encoded), 1):
        at = query_positions(len(ids), positions)
        what = f"inspect: prompt {number}/{len(samples)} ({len(ids)} tokens)"
        with heartbeat(what, show_progress):
            recall, share = inspect_prompt(runtime, torch.tensor(ids, dtype=torch.long), at)
        selective = [p // selection.block + 1 > selection.num_selected for p in at]
        totals.add(recall, share, at, width, selective)
        prompts.append({"id": sample.id, "breakdown": sample.breakdown, "tokens": len(ids), "truncated": truncated,
                        "positions": at, "recall": float(recall.mean()), "mass_share": float(share.mean())})
        if show_progress:
            click.echo(f"{what}: recall {float(recall.mean()):.3f}, mass share {float(share.mean()):.3f}; "
                       f"{time.perf_counter() - started:.0f} s so far", err=True)
    c = runtime.config
    kept = {"leading_tokens": c.sparse.leading, "local_tokens": c.sparse.local} if c.attention == "sparse" else \
        {"leading_tokens": selection.block, "local_blocks": 2}
    return {
        "command": "nsa-eval inspect",
        "created": run_store.now(),
        "model": model.name,
        "spec": config.model_spec,
        "attention": c.attention,
        "selection": {"block": selection.block, "num_selected": selection.num_selected, "window": selection.window,
                      **kept},
        "task": task_name,
        "task_version": getattr(task, "version", None),
        "task_config": task.config() if hasattr(task, "config") else None,
        "device": runtime.device.type,
        "kernels": "triton" if runtime.device.type == "cuda" else "reference",
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "prefill_chunk": runtime.prefill_chunk,
        "chat": use_chat,
        "max_length": model.max_length,
        "settings": {**config.settings(), "--positions": positions, "--bin-width": width},
        "positions_per_prompt": positions,
        "bin_width": width,
        "definitions": DEFINITIONS,
        "layers": c.num_hidden_layers,
        "kv_heads": c.num_key_value_heads,
        "query_heads": c.num_attention_heads,
        "prompts": prompts,
        **summarise(totals, width),
        "versions": run_store.versions(),
        "git_sha": run_store.git_sha(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def write(folder: Path, result: dict[str, Any]) -> list[Path]:
    """fidelity.json (strict JSON) and the figures into `folder` -> the files written."""
    from nsa_eval.records import finite

    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / RESULT_FILE]
    written[0].write_text(json.dumps(finite(result), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, files in figures(result).items():
        for kind, data in files.items():
            path = folder / f"{name}.{kind}"
            path.write_bytes(data)
            written.append(path)
    return written


@click.command()
@click.option("--model", "model_spec", default="smollm2-nsa", show_default=True,
              help="The model to inspect: smollm2-nsa, nsa:PATH, or smollm2 / hf:PATH with --attention sparse (the "
                   "native engine: Llama-family checkpoints).")
@click.option("--attention", type=click.Choice(["full", "sparse"]), default="full", show_default=True,
              help="As `run`: sparse gives smollm2 and hf: checkpoints training-free block selection to inspect.")
@click.option("--sparse-budget", metavar="N", help=f"As `run` (one budget). Default: {SparseSettings.budget}.")
@click.option("--sparse-leading", type=click.IntRange(min=1), help="As `run`.")
@click.option("--sparse-local", type=click.IntRange(min=1), help="As `run`.")
@click.option("--sparse-block", type=click.IntRange(min=1), help="As `run`.")
@click.option("--sparse-selection", type=click.Choice(SELECTIONS), help="As `run` (query or tile).")
@click.option("--task", "task_name", required=True, help="One task (`nsa-eval list tasks`); its prompts are inspected.")
@click.option("--task-option", "task_options", multiple=True, metavar="TASK.KEY=VALUE",
              help="A task option, as `run` takes it (e.g. niah.lengths=2k,4k).")
@click.option("--data", "data_pairs", multiple=True, metavar="TASK=PATH", help="The task's local data, as `run`.")
@click.option("--limit", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts to inspect: the task's first N samples.")
@click.option("--positions", type=click.IntRange(min=1), default=16, show_default=True,
              help="Query positions per prompt, spread evenly, the last prompt token's among them (recorded).")
@click.option("--bin-width", default="auto", show_default=True,
              help="Width in tokens of the query-position bins (e.g. 1k); auto: a power of two >= 64 giving at most 8 "
                   "bins over the longest prompt.")
@click.option("--max-length", type=click.IntRange(min=16), help="As `run`: prompts are cut in the middle to fit it.")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="As `run`: the generation budget a prompt leaves room for.")
@click.option("--prefill-chunk", type=click.IntRange(min=0), help="As `run`.")
@click.option("--seed", default=0, show_default=True, help="As `run` (needles, shots).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="cuda: our Triton kernels select; cpu: the PyTorch reference.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="As `run`.")
@click.option("--chat-template/--no-chat-template", "chat", default=None, help="As `run`.")
@click.option("--output", type=click.Path(path_type=Path),
              help="Folder for fidelity.json and the figures. Default: results/runs/<model>-inspect-<task>-<time>.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def inspect(model_spec: str, attention: str, sparse_budget: str | None, task_name: str, positions: int,
            bin_width: str, output: Path | None, **options: Any) -> None:
    """Selection fidelity on a task's real prompts: per layer and KV head, the recall of dense attention's top-n
    blocks by the model's block selection (NSA, or training-free sparse attention) and the share of dense attention
    mass on the tokens it attends, by query position too. Writes fidelity.json and heatmaps (PNG, SVG, PDF) and
    prints the table."""
    from nsa_eval.models import check_model, load_model

    budgets = parse_budgets(sparse_budget)
    if budgets is not None and len(budgets) > 1:
        raise ValueError(f"--sparse-budget {sparse_budget}: inspect takes one budget; run it once per budget")
    check_inspectable(model_spec, attention)
    width = _bin_width(bin_width)
    quiet = options.pop("quiet")
    config = RunConfig.from_cli(
        model_spec=model_spec, attention=attention, sparse_budget=budgets[0] if budgets else None, task_list=task_name,
        niah_lengths=None, niah_depths=None, niah_samples=None, haystack=None, include_path=None,
        allow_code_execution=task_name == "humaneval",  # inspect never scores: no model-written code runs
        engine="native", output=output, quiet=quiet, **options)
    options = dataclasses.replace(config.load_options(), batch_size=1)  # one prompt at a time through the prefill
    spec = check_model(config.model_spec, options)
    if output is not None:
        check_output(output)
    (name, task), = config.build_tasks().items()
    prepare = getattr(task, "prepare", None)
    if prepare is not None:
        prepare()
    if config.max_length is not None and hasattr(task, "check_length"):
        task.check_length(config.max_length, config.max_new_tokens)
    click.echo(f"loading {config.model_spec} ...", err=True)
    model = load_model(spec, options)
    result = inspect_task(model, name, task, config, positions, width, show_progress=not quiet)
    folder = output or config.default_run_dir(f"{model.name}-inspect")
    check_output(folder)
    written = write(folder, result)
    for line in table(result):
        click.echo(line)
    click.echo(f"wrote {folder}: {', '.join(p.name for p in written)}")
