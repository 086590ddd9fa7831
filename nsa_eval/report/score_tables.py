"""The tables built from the scores of any task: by model (the paper's Table 1 form, with its reference rows), by task
and metric with the deltas against the baseline, and by breakdown key (a column per run; by subset in the paper's
Table 2 form; by position in the window; one run's two-key grid for drill-down).
"""

from __future__ import annotations

import math
import re
from typing import Any

from nsa_eval.report import reference
from nsa_eval.report.comparisons import Comparison, mismatch_notes, report_tasks
from nsa_eval.report.runs import Run, TaskResult, value_order
from nsa_eval.report.table import DASH, Cell, Drill, Table, budget_label, fmt, slug
from nsa_eval.stats import PairedDelta
from nsa_eval.tasks.perplexity import bin_label

SIGNIFICANT = "*"
SHOT_KEYS = ("num_fewshot", "fewshot", "shots", "n_shot", "k_shot")


def fmt_delta(delta: PairedDelta, with_n: bool = True) -> str:
    n = f" (n={delta.n})" if with_n else ""
    if math.isnan(delta.low):
        return f"{delta.delta:+.3f}{n}"
    mark = SIGNIFICANT if delta.excludes_zero else ""
    return f"{delta.delta:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]{mark}{n}"


def shots_of(result: TaskResult) -> int | None:
    """The few-shot count a run recorded as used (GSM8K's cot is 0-shot for chat models), or None."""
    return next((result.config[k] for k in SHOT_KEYS if isinstance(result.config.get(k), int)), None)


def setting(result: TaskResult) -> str:
    """A benchmark's setting as run (run.json's recorded values), as the paper's column heads print it, e.g. "5-shot
    acc", "cot, 0-shot flexible_extract", "2-5-shot acc" (a subject had fewer shot rows) or "accuracy, 16 samples,
    48 budget". Runs of one task with different settings are different columns."""
    shots = shots_of(result)
    fewest = result.config.get("fewest_shots")
    shown = f"{fewest}-{shots}" if isinstance(fewest, int) and shots is not None and fewest < shots else shots
    text = f"{shown}-shot {result.headline}" if shots is not None else result.headline
    variant = result.config.get("variant")
    text = f"{variant}, {text}" if isinstance(variant, str) and result.name == "gsm8k" else text
    samples = result.config.get("n_samples")
    text = f"{text}, {samples} samples" if isinstance(samples, int) and samples > 1 else text
    budget = result.config.get("generation_budget")
    return f"{text}, {budget_label(int(budget))} budget" if isinstance(budget, int) else text


def _missing(table: Table, run: Run, task: str) -> Cell:
    if task in run.info["tasks"]:
        text = f"{run.label}: {task} is listed in run.json but has no results in metrics.json (partial run)"
    else:
        text = f"{run.label}: {task} was not run"
    return Cell(DASH, notes=(table.note(text),))


# ---------------------------------------------------------------------------------------------- tables


SHORT_NAMES = {"mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval", "longbench": "LongBench", "niah": "NIAH",
               "aime": "AIME"}


def short_name(task: str) -> str:
    """A task's name as the paper's column heads print it ("MMLU"; an lm-eval task without its prefix)."""
    return SHORT_NAMES.get(task, task.split(":", 1)[-1])


def model_table(runs: list[Run], baseline: int | None, with_paper: bool, paper: bool = False) -> Table:
    """The paper's form (Tables 1-3): a row per model, a column per benchmark and setting as run (runs of one task
    with different settings, e.g. GSM8K 0-shot and 5-shot, are different columns), an average. The paper style puts
    the settings in a note and heads columns with the benchmark's short name."""
    tasks = report_tasks(runs)
    columns: list[tuple[str, str]] = []  # (task, setting), first seen first
    results: dict[tuple[str, str], TaskResult] = {}
    for task in tasks:
        for result in (run.results[task] for run in runs if task in run.results):
            results.setdefault((task, setting(result)), result)
        columns += [key for key in results if key[0] == task] or [(task, "")]
    split = {task for task, _ in columns if sum(t == task for t, _ in columns) > 1}
    heads = {key: (short_name(key[0]) + (f" ({key[1]})" if key[0] in split else "") if paper
                   else (f"{key[0]} ({key[1]})" if key in results else key[0])) for key in columns}
    lower = sorted({task for (task, _), result in results.items() if result.lower_is_better})
    averaged = [task for task in tasks if task not in lower]
    with_avg = len(averaged) > 1
    table = Table("by-model", "Scores by model (headline metric of each task)",
                  ["Model", *heads.values(), *(["Avg"] if with_avg else [])], paper=paper)
    if with_avg and lower:
        table.note(f"Avg leaves out {', '.join(lower)}: lower is better there (a perplexity), not a score to average")
    if paper and any(s for _, s in columns):
        table.note("settings: " + "; ".join(f"{heads[key]} {key[1]}" for key in columns if key[1] and key[0] not in split))
    if split:
        table.note(f"{', '.join(sorted(split))}: runs with different settings (shots, variant, budget, as run.json "
                   "records them) are different columns; an average mixes the settings of its row")
    for index, run in enumerate(runs):
        row = [Cell(run.label + (" (baseline)" if index == baseline else ""))]
        scores, notes = [], set()
        for task, column_setting in columns:
            result = run.results.get(task)
            if result is None:
                row.append(_missing(table, run, task))
                continue
            if setting(result) != column_setting:
                row.append(Cell(DASH, notes=(table.note(f"{run.label}: {task} ran as {setting(result)}"),)))
                continue
            flags = mismatch_notes(table, runs, index, task, baseline)
            notes.update(flags)
            if task not in lower:
                scores.append(result.score)
            row.append(Cell(f"{fmt(result.score)}{table.n_text(result.n)}", result.score, Drill(index, task), flags,
                            {"mean": result.score, "stderr": result.metrics[result.headline]["stderr"], "n": result.n}))
        if with_avg:
            row.append(_average(table, scores, len(averaged), tuple(sorted(notes))))
        table.rows.append(row)
    if with_paper:
        _paper_rows(table, tasks, columns, results, with_avg, len(averaged))
    table.note_ns()
    return table


def _average(table: Table, scores: list[float], expected: int, notes: tuple[int, ...]) -> Cell:
    if len(scores) < expected:
        return Cell(DASH, notes=(table.note("the average needs every task of the row"),))
    avg = sum(scores) / len(scores)
    return Cell(fmt(avg), avg, None, notes, {"mean": avg})


def _paper_rows(table: Table, tasks: list[str], columns: list[tuple[str, str]],
                results: dict[tuple[str, str], TaskResult], with_avg: bool, averaged: int) -> None:
    """The paper's Table 1 rows, a number only in a column whose recorded shot count is the paper's."""
    rows = reference.general_rows(tasks)
    settings = reference.general_settings(tasks)
    if not settings:
        table.note("the NSA paper reports none of these tasks in its Table 1 (no reference rows)")
        return
    described = ", ".join(f"{task}: {s}" for task, s in settings.items())
    source = table.note(f"reference rows: the NSA paper (arXiv:2502.11089) Table 1, a {reference.PAPER_MODEL} model; "
                        f"its settings: {described}")
    for label, values in rows.items():
        row = [Cell(label, notes=(source,))]
        shown: dict[str, float] = {}
        for key in columns:
            task = key[0]
            paper_shots = re.search(r"(\d+)-shot", settings.get(task, ""))
            result = results.get(key)
            ours = shots_of(result) if result is not None else None
            fewest = result.config.get("fewest_shots") if result is not None else None
            if task not in values:
                row.append(Cell(DASH, notes=(table.note(f"{task} is not in the paper's Table 1"),)))
            elif paper_shots and ours is not None and (ours != int(paper_shots[1]) or isinstance(fewest, int)):
                row.append(Cell(DASH, notes=(table.note(
                    f"{task} ({key[1]}): the paper's {task} is {settings[task]}; not shown beside a run of another "
                    "shot count"),)))
            else:
                row.append(Cell(fmt(values[task]), values[task]))
                shown[task] = values[task]
        if with_avg:
            row.append(_average(table, list(shown.values()), averaged, ()))
        table.rows.append(row)


def task_table(runs: list[Run], baseline: int | None, comparisons: dict[tuple[int, str, str], Comparison],
               paper: bool = False) -> Table:
    """The transposed form: a row per task and metric, a column per run, then the deltas against the baseline."""
    others = [i for i in range(len(runs)) if baseline is not None and i != baseline]
    delta_heads = [f"\u0394 {runs[i].label} vs {runs[baseline].label}" for i in others]
    table = Table("by-task", "Scores by task and metric (mean \u00b1 standard error)",
                  ["Task", "Metric", *(run.label for run in runs), *delta_heads], paper=paper)
    for task in report_tasks(runs):
        metrics = list(dict.fromkeys(
            [r.headline for r in (run.results.get(task) for run in runs) if r] +
            [m for run in runs if task in run.results for m in run.results[task].metrics]))
        if not metrics:
            table.rows.append([Cell(task), Cell(DASH), *(_missing(table, run, task) for run in runs),
                               *(Cell(DASH) for _ in others)])
            continue
        for metric in metrics:
            row = [Cell(task), Cell(metric)]
            for index, run in enumerate(runs):
                result = run.results.get(task)
                if result is None:
                    row.append(_missing(table, run, task))
                elif metric not in result.metrics:
                    row.append(Cell(DASH, notes=(table.note(f"{run.label}: {task} has no metric {metric}"),)))
                else:
                    value = result.metrics[metric]
                    row.append(Cell(f"{fmt(value['mean'])} \u00b1 {fmt(value['stderr'])}{table.n_text(result.n)}",
                                    value["mean"], Drill(index, task),
                                    mismatch_notes(table, runs, index, task, baseline),
                                    {"mean": value["mean"], "stderr": value["stderr"], "n": result.n}))
            for index in others:
                comparison = comparisons.get((index, task, metric))
                if comparison is None and metric in getattr(runs[index].results.get(task), "metrics", {}):
                    comparison = Comparison(None, f"the baseline has no {task} {metric} to compare with")
                row.append(_delta_cell(table, comparison))
            table.rows.append(row)
    if others:
        table.note(f"\u0394: mean over samples matched by id of (run \u2212 baseline), with a paired bootstrap "
                   f"95% interval; {SIGNIFICANT} where the interval excludes zero")
    table.note_ns()
    return table


def _delta_cell(table: Table, comparison: Comparison | None) -> Cell:
    if comparison is None:
        return Cell(DASH)
    if comparison.delta is None:
        return Cell("n/a", notes=(table.note(comparison.reason or "not compared"),))
    delta = comparison.delta
    return Cell(fmt_delta(delta, not table.paper), delta.delta,
                numbers={"delta": delta.delta, "low": delta.low, "high": delta.high, "n": delta.n})


def breakdown_table(runs: list[Run], task: str, key: str, baseline: int | None, paper: bool = False) -> Table:
    """One breakdown key of a task: a row per value, a column per run (headline metric, each cell with its n)."""
    table = Table(slug(f"{task}-by-{key}"), f"{task} by {key}", [key, *(run.label for run in runs)], paper=paper)
    values = sorted({v for run in runs if task in run.results
                     for v in run.results[task].breakdowns.get(key, {})}, key=value_order)
    for value in values:
        row = [Cell(value, _number(value))]
        for index, run in enumerate(runs):
            result = run.results.get(task)
            cell = result.breakdowns.get(key, {}).get(value, {}).get(result.headline) if result else None
            if result is None:
                row.append(_missing(table, run, task))
            elif cell is None:
                row.append(Cell(DASH, notes=(table.note(f"{run.label}: no samples with {key} {value}"),)))
            else:
                row.append(Cell(f"{fmt(cell['mean'])}{table.n_text(cell['n'])}", cell["mean"],
                                Drill(index, task, ((key, value),)), mismatch_notes(table, runs, index, task, baseline),
                                _numbers(cell)))
        table.rows.append(row)
    table.note_ns()
    return table


def subset_table(runs: list[Run], task: str, key: str, baseline: int | None, with_paper: bool,
                 paper: bool = False) -> Table:
    """A task split by subset in the paper's Table 2 form: a row per model, a column per subset, an average."""
    values = sorted({v for run in runs if task in run.results
                     for v in run.results[task].breakdowns.get(key, {})}, key=value_order)
    table = Table(slug(f"{task}-by-{key}"), f"{task} by {key}", ["Model", *values, "Avg"], paper=paper)
    for index, run in enumerate(runs):
        result = run.results.get(task)
        if result is None:
            continue
        row, scores = [Cell(run.label, notes=mismatch_notes(table, runs, index, task, baseline))], []
        for value in values:
            cell = result.breakdowns.get(key, {}).get(value, {}).get(result.headline)
            if cell is None:
                row.append(Cell(DASH, notes=(table.note(f"{run.label}: no samples of {key} {value}"),)))
                continue
            scores.append(cell["mean"])
            row.append(Cell(f"{fmt(cell['mean'])}{table.n_text(cell['n'])}", cell["mean"],
                            Drill(index, task, ((key, value),)), numbers=_numbers(cell)))
        row.append(_average(table, scores, len(values), ()))
        table.rows.append(row)
    if with_paper and task.lower().startswith("longbench"):
        source = table.note(f"reference rows: the NSA paper Table 2 ({reference.PAPER_MODEL})")
        for label, paper_values in reference.longbench_rows().items():
            row = [Cell(label, notes=(source,))]
            row += [Cell(fmt(paper_values[v]), paper_values[v]) if v in paper_values else Cell(DASH) for v in values]
            row.append(_average(table, [paper_values[v] for v in values if v in paper_values], len(values), ()))
            table.rows.append(row)
    table.note_ns()
    return table


POSITION_KEYS = ("position",)  # breakdowns by position in the window (perplexity): bins as columns


def position_label(start: str, widths: set[Any]) -> str:
    """A position bin's column head: "0-1k", "1k-2k" when every run used one bin width, else "from 512"."""
    width = next(iter(widths)) if len(widths) == 1 else None
    if isinstance(width, int) and start.isdigit():
        return bin_label(int(start), width)
    return f"from {start}"


def position_table(runs: list[Run], task: str, key: str, baseline: int | None, paper: bool = False) -> Table:
    """A task's headline (perplexity) by position bin: a row per model, a column per bin (bin widths as the runs'
    configs record them), then every token's ("all"). Lower is better for a perplexity."""
    holders = [(i, run, run.results[task]) for i, run in enumerate(runs)
               if task in run.results and key in run.results[task].breakdowns]
    starts = sorted({v for _, _, result in holders for v in result.breakdowns[key]}, key=value_order)
    widths = {result.config.get("bin_width") for _, _, result in holders}
    headline = holders[0][2].headline if holders else "perplexity"
    table = Table(slug(f"{task}-by-{key}"), f"{task}: {headline} by {key} in the window (a row per model)",
                  ["Model", *(position_label(v, widths) for v in starts), "all"], paper=paper)
    for index, run, result in holders:
        row = [Cell(run.label + (" (baseline)" if index == baseline else ""),
                    notes=mismatch_notes(table, runs, index, task, baseline))]
        for value in starts:
            cell = result.breakdowns[key].get(value, {}).get(result.headline)
            if cell is None:
                row.append(Cell(DASH, notes=(table.note(f"{run.label}: no tokens at positions "
                                                        f"{position_label(value, widths)}"),)))
                continue
            row.append(Cell(f"{_fmt_quantity(cell['mean'])}{table.n_text(cell['n'])}", cell["mean"],
                            Drill(index, task), numbers=_numbers(cell)))
        overall = result.metrics[result.headline]
        row.append(Cell(f"{_fmt_quantity(overall['mean'])}{table.n_text(result.n)}", overall["mean"], Drill(index, task),
                        numbers={"mean": overall["mean"], "stderr": overall["stderr"], "n": result.n}))
        table.rows.append(row)
    windows = sorted({str(result.config.get("window", "disjoint")) for _, _, result in holders})
    if len(widths) > 1:
        table.note(f"the runs used different bin widths ({', '.join(sorted(map(str, widths)))}): a column is a bin's "
                   "first position")
    lower = " (lower is better)" if holders and holders[0][2].lower_is_better else ""
    table.note(f"{headline}{lower} over the tokens predicted at the positions of a bin: a token's position is its place "
               f"in the window that predicted it ({' / '.join(windows)} windows of the run's max length), so a "
               f"document within one window has its tokens at their own index; n: documents with tokens in the bin; "
               f"all: every token")
    table.note_ns()
    return table


def _fmt_quantity(value: float | None) -> str:
    """A perplexity-like number: 2 decimals (3 significant digits below 1)."""
    if value is None or math.isnan(value):
        return DASH
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def cross_table(runs: list[Run], index: int, task: str, cross_key: str) -> Table:
    """One run's two-key breakdown as a grid (rows: second key, columns: first key), for drill-down."""
    run = runs[index]
    result = run.results[task]
    first, second = cross_key.split(" x ")
    cells = result.breakdowns[cross_key]
    firsts = sorted({k.split("|")[0] for k in cells}, key=value_order)
    seconds = sorted({k.split("|")[1] for k in cells}, key=value_order)
    table = Table(slug(f"{task}-{cross_key}-{run.source(task).key}"),
                  f"{run.label}: {task} by {second} (rows) and {first} (columns)", [f"{second} \\ {first}", *firsts])
    for value in seconds:
        row = [Cell(value, _number(value))]
        for column in firsts:
            cell = cells.get(f"{column}|{value}", {}).get(result.headline)
            row.append(Cell(DASH) if cell is None else Cell(
                f"{fmt(cell['mean'])} (n={cell['n']})", cell["mean"],
                Drill(index, task, ((first, column), (second, value))), numbers=_numbers(cell)))
        table.rows.append(row)
    return table


def _numbers(cell: dict[str, Any]) -> dict[str, float]:
    """A breakdown cell's mean, stderr and n, for CSV."""
    return {k: cell[k] for k in ("mean", "stderr", "n") if isinstance(cell.get(k), (int, float))}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
