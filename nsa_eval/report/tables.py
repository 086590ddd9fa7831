"""Report tables: what each cell says, built once from the runs, rendered as Markdown, LaTeX and CSV here
and as HTML by nsa_eval.report.html.

A table is a list of rows of `Cell`s with numbered notes; a cell's note marks print as "[1]" after its text.
Scores are printed as stored (0..1 fractions, 3 decimals), every cell with its n; in the `paper` style, cells hold
the number only, headers are short, and a note gives the n of each column. A cell also carries its numbers (mean,
stderr, n; a delta's interval), which the CSV files hold as numeric columns.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from nsa_eval.report import reference
from nsa_eval.report.effective import (BELOW, CONFIDENCE, NOLIMA_RATIO, PASS, RULER_THRESHOLD, UNSURE, Effective,
                                       effective_lengths, family_of, length_label)
from nsa_eval.report.runs import Run, TaskResult, value_order
from nsa_eval.stats import PairedDelta, paired_bootstrap
from nsa_eval.tasks.perplexity import bin_label
from nsa_eval.tasks.ruler_data import SUBTASKS as RULER_TASKS

DASH = "\u2014"
SIGNIFICANT = "*"
SHOT_KEYS = ("num_fewshot", "fewshot", "shots", "n_shot", "k_shot")


@dataclass(frozen=True)
class Drill:
    """Where a cell's samples are: run index, task, and the breakdown values they must have."""

    run: int
    task: str
    filters: tuple[tuple[str, str], ...] = ()


@dataclass
class Cell:
    text: str
    sort: float | None = None  # numeric sort key for HTML tables (None: sort by text)
    drill: Drill | None = None
    notes: tuple[int, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)  # {"mean", "stderr", "n"} or {"delta", "low", "high", "n"}

    @property
    def plain(self) -> str:
        """The text with its note marks, as Markdown, LaTeX and CSV print it."""
        return self.text + "".join(f"[{n}]" for n in self.notes)


@dataclass
class Table:
    slug: str  # file and anchor name
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paper: bool = False  # the paper style: no n in cells (a note gives them), short headers

    def note(self, text: str) -> int:
        """The 1-based number of a note, adding it the first time it is used."""
        if text not in self.notes:
            self.notes.append(text)
        return self.notes.index(text) + 1

    def n_text(self, n: int | None) -> str:
        """" (n=12)" after a cell's number, or nothing in the paper style."""
        return "" if self.paper or n is None else f" (n={n})"

    def note_ns(self) -> None:
        """The paper style's note with the n of each column (a range where its cells differ)."""
        if not self.paper:
            return
        parts = []
        for index, column in enumerate(self.columns):
            ns = sorted({int(row[index].numbers["n"]) for row in self.rows
                         if index < len(row) and "n" in row[index].numbers})
            if ns:
                parts.append(f"{column} {ns[0]}" if len(ns) == 1 else f"{column} {ns[0]}-{ns[-1]}")
        if parts:
            self.note("n (samples per cell): " + "; ".join(parts))


# A report's parts, as build.py assembles them and html.py renders them.


@dataclass
class FigureFile:
    slug: str
    title: str
    files: dict[str, bytes]  # format -> bytes: png, svg, pdf
    wide: bool = False  # HTML: a full-width figure (several panels) rather than one of a pair

    @property
    def png(self) -> bytes:
        return self.files["png"]

    @property
    def base64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


@dataclass
class Details:
    title: str
    tables: list[Table]


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureFile] = field(default_factory=list)
    details: list[Details] = field(default_factory=list)  # HTML only (folded): per-run grids for drill-down
    notes: list[str] = field(default_factory=list)  # lines about the section as a whole (e.g. a skipped file)


@dataclass(frozen=True)
class Comparison:
    """A run's task metric against the baseline's: a paired interval, or why there is none."""

    delta: PairedDelta | None
    reason: str | None = None


# ---------------------------------------------------------------------------------------------- joining


def report_tasks(runs: list[Run]) -> list[str]:
    """Every task any run planned or holds, in first-seen order."""
    return list(dict.fromkeys(task for run in runs for task in run.planned_tasks))


def mismatch(reference_result: TaskResult, result: TaskResult) -> str | None:
    """Why two runs of a task cannot be joined (different task version or prompts), or None."""
    if reference_result.version != result.version:
        return f"task version {result.version} vs {reference_result.version}"
    if reference_result.prompts_digest != result.prompts_digest:
        return f"prompts differ (digest {result.prompts_digest} vs {reference_result.prompts_digest})"
    return None


def reference_run(runs: list[Run], task: str, baseline: int | None) -> int | None:
    """The run others are checked against for a task: the baseline when it has the task, else the first that does."""
    if baseline is not None and task in runs[baseline].results:
        return baseline
    return next((i for i, run in enumerate(runs) if task in run.results), None)


def compare(runs: list[Run], baseline: int, *, seed: int = 0, resamples: int = 2000) -> dict[tuple[int, str, str], Comparison]:
    """Paired bootstrap of every other run against runs[baseline], per (run index, task, metric)."""
    base = runs[baseline]
    out: dict[tuple[int, str, str], Comparison] = {}
    for task, base_result in base.results.items():
        base_scores = _scores_by_id(base, task)
        for index, run in enumerate(runs):
            result = run.results.get(task)
            if index == baseline or result is None:
                continue
            reason = mismatch(base_result, result)
            run_scores = {} if reason else _scores_by_id(run, task)
            for metric in result.metrics:
                if metric not in base_result.metrics:
                    continue
                if reason:
                    out[index, task, metric] = Comparison(None, f"not compared: {reason}")
                    continue
                candidate = run_scores.get(metric, {})
                paired = base_scores.get(metric, {})
                if not candidate.keys() & paired.keys():
                    out[index, task, metric] = Comparison(None, "no per-sample scores to pair by id")
                    continue
                out[index, task, metric] = Comparison(
                    paired_bootstrap(candidate, paired, seed=seed, resamples=resamples)
                )
    return out


def _scores_by_id(run: Run, task: str) -> dict[str, dict[str, float]]:
    """metric -> {sample id: score} from the run's samples file."""
    out: dict[str, dict[str, float]] = {}
    for record in run.samples(task):
        for metric, value in (record.get("scores") or {}).items():
            if isinstance(value, (int, float)):
                out.setdefault(metric, {})[str(record["id"])] = float(value)
    return out


# ---------------------------------------------------------------------------------------------- cells


def fmt(value: float) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:.3f}"


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


def _flags(table: Table, runs: list[Run], index: int, task: str, baseline: int | None) -> tuple[int, ...]:
    ref = reference_run(runs, task, baseline)
    if ref is None or ref == index:
        return ()
    reason = mismatch(runs[ref].results[task], runs[index].results[task])
    if reason is None:
        return ()
    return (table.note(f"{runs[index].label}: {task} is not comparable with {runs[ref].label} ({reason}); "
                       "no delta or difference map is computed between them"),)


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
            flags = _flags(table, runs, index, task, baseline)
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
                                    value["mean"], Drill(index, task), _flags(table, runs, index, task, baseline),
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
                                Drill(index, task, ((key, value),)), _flags(table, runs, index, task, baseline),
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
        row, scores = [Cell(run.label, notes=_flags(table, runs, index, task, baseline))], []
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
                    notes=_flags(table, runs, index, task, baseline))]
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


def budget_of(result: TaskResult) -> int | None:
    """A generative task's generation budget in tokens, from its config (AIME records `generation_budget`)."""
    budget = result.config.get("generation_budget", result.config.get("max_new_tokens"))
    return int(budget) if isinstance(budget, (int, float)) else None


def budget_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def aime_table(runs: list[Run], task: str, baseline: int | None, with_paper: bool) -> Table:
    """The paper's Table 3 form: a row per model, a column per generation budget (8k, 16k); a run's score sits
    in the column of its own budget, beside the paper's rows of the same budget."""
    holders = [(i, run, run.results[task]) for i, run in enumerate(runs) if task in run.results]
    budgets = sorted({b for _, _, result in holders if (b := budget_of(result)) is not None})
    table = Table(slug(f"{task}-by-generation-budget"), f"{task} by generation budget (the paper's Table 3 form)",
                  ["Model", *(f"{budget_label(b)} budget" for b in budgets)])
    for index, run, result in holders:
        budget = budget_of(result)
        row = [Cell(run.label + (" (baseline)" if index == baseline else ""),
                    notes=_flags(table, runs, index, task, baseline))]
        for column in budgets:
            if column == budget:
                row.append(Cell(f"{fmt(result.score)} (n={result.n})", result.score, Drill(index, task)))
            else:
                row.append(Cell(DASH))
        table.rows.append(row)
    if any(budget_of(result) is None for _, _, result in holders):
        table.note("a run without a recorded generation budget (max_new_tokens) has no column")
    if with_paper:
        paper_rows = reference.aime_rows()
        shown = [b for b in budgets if any(b in values for values in paper_rows.values())]
        if not shown:
            reported = ", ".join(budget_label(b) for b in sorted({b for v in paper_rows.values() for b in v}))
            table.note(f"the NSA paper's Table 3 reports generation budgets {reported} only; none of these runs used one")
        else:
            source = table.note(f"reference rows: the NSA paper (arXiv:2502.11089) Table 3, {reference.PAPER_MODEL} "
                                f"models fine-tuned for reasoning; {reference.aime_settings()}")
            for label, values in paper_rows.items():
                row = [Cell(label, notes=(source,))]
                row += [Cell(fmt(values[b]), values[b]) if b in values else Cell(DASH) for b in budgets]
                table.rows.append(row)
    return table


def ruler_table(runs: list[Run], task: str, baseline: int | None, seed: int = 0) -> Table:
    """RULER's README table: a row per model, a column per context length (the mean over RULER's tasks of each
    task's score at that length, in percent), then the average over lengths and the averages weighted by length
    rank, increasing and decreasing; the claimed length is the run's max length, the effective length the longest
    up to which every length is at least RULER's threshold (85.6, Llama-2-7B at 4K) by its bootstrap interval
    (report/effective.py, as the effective-length table)."""
    cross = "task x length"
    holders = [(i, run, run.results[task]) for i, run in enumerate(runs)
               if task in run.results and cross in run.results[task].breakdowns]
    lengths = sorted({int(key.split("|")[1]) for _, _, result in holders for key in result.breakdowns[cross]})
    table = Table(slug(f"{task}-ruler"), f"{task}: RULER's table (score in percent, mean over tasks per length)",
                  ["Models", "Claimed Length", "Effective Length", *map(length_label, lengths), "Avg.",
                   "wAvg. (inc)", "wAvg. (dec)"])
    for index, run, result in holders:
        by_length: dict[int, list[float]] = {}
        names: dict[int, set[str]] = {}
        for key, cell in result.breakdowns[cross].items():
            name, length = key.split("|")
            if result.headline in cell:
                by_length.setdefault(int(length), []).append(100 * cell[result.headline]["mean"])
                names.setdefault(int(length), set()).add(name)
        means = {length: sum(v) / len(v) for length, v in by_length.items()}
        row = [Cell(run.label + (" (baseline)" if index == baseline else ""),
                    notes=_flags(table, runs, index, task, baseline))]
        claimed = run.info.get("model", {}).get("max_length")
        row.append(Cell(length_label(claimed) if isinstance(claimed, int) else DASH, claimed))
        covered = sorted(set().union(*names.values())) if names else []
        partial = len(covered) < len(RULER_TASKS)
        if partial:  # RULER's threshold is a 13-task average
            row.append(Cell(DASH, notes=(table.note(
                f"effective length: RULER's threshold ({RULER_THRESHOLD}) is a 13-task average; none for a partial "
                "set"),)))
        else:
            row.append(_effective_cell(table, run, (effective_lengths(run, task, seed=seed) or [None])[0]))
        for length in lengths:
            if length in means:
                row.append(Cell(f"{means[length]:.1f}", means[length], Drill(index, task, (("length", str(length)),))))
            else:
                row.append(Cell(DASH, notes=(table.note(f"{run.label}: no samples of length {length}"),)))
        if partial:  # an average over fewer tasks is not RULER's 13-task average
            row[0].notes += (table.note(
                f"{run.label}: {len(covered)} of RULER's {len(RULER_TASKS)} tasks ({', '.join(covered)}); its "
                "averages are over these tasks only, not RULER's 13-task averages"),)
        counts = {len(n) for n in names.values()}
        if len(counts) > 1:
            row[0].notes += (table.note(f"{run.label}: the lengths hold different numbers of tasks "
                                        f"({', '.join(f'{length_label(k)}: {len(v)}' for k, v in sorted(names.items()))})"),)
        if len(means) < len(lengths):
            row += [Cell(DASH, notes=(table.note("the averages need every length of the row"),))] * 3
        else:
            values = [means[length] for length in lengths]
            n = len(values)
            for weights in ([1] * n, list(range(1, n + 1)), list(range(n, 0, -1))):
                average = sum(w * v for w, v in zip(weights, values)) / sum(weights)
                row.append(Cell(f"{average:.1f}", average))
        table.rows.append(row)
    table.note(f"as RULER's README: scores in percent; a length's score is the mean of its tasks' scores; "
               f"wAvg. weighs the lengths by rank (1..{len(lengths)}), increasing (inc) or decreasing (dec) with "
               f"length; claimed length: the run's max length (prompt + generation); effective length: the longest "
               f"length up to which every length's score is at least {RULER_THRESHOLD}, a length counting when the "
               f"whole {CONFIDENCE:.0%} bootstrap interval of its score (resampled within each task) is at or above "
               f"{RULER_THRESHOLD} (the effective-length table below shows each length's margin)")
    return table


def _effective_cell(table: Table, run: Run, effective: Effective | None) -> Cell:
    """An effective length as a cell, its "<X" / "\u2265X" and any point-estimate difference as notes."""
    if effective is None:
        return Cell(DASH, notes=(table.note(f"{run.label}: no per-sample scores by length to bootstrap"),))
    notes = []
    if effective.reason:
        notes.append(f"{run.label}: {effective.reason}")
    else:
        notes += [text for text in (effective.explanation(),) if text]
        notes += [f"{run.label} ({effective.rule} threshold): {text}" for text in (effective.point_note(),) if text]
    marks = tuple(table.note(text) for text in notes)
    return Cell(effective.text(), effective.length, notes=marks)


def effective_table(runs: list[Run], task: str, baseline: int | None, seed: int = 0) -> Table | None:
    """Effective length per model under RULER's and NoLiMa's thresholds (report/effective.py): a row per model and
    threshold, the effective length, then per evaluated length the score's margin over the threshold with its 95%
    bootstrap interval and whether it passes. None when no run holds the task's samples by length."""
    found = [(index, run, effective) for index, run in enumerate(runs) if task in run.results
             and (effective := effective_lengths(run, task, seed=seed)) is not None]
    if not found:
        return None
    family = family_of(task)
    lengths = sorted({length for _, _, pair in found for e in pair for length in e.lengths})
    table = Table(slug(f"{task}-effective-length"), f"{task}: effective length ({family.name}; scores in percent)",
                  ["Model", "Threshold", "Effective length", *map(length_label, lengths)])
    for index, run, pair in found:
        for effective in pair:
            label = run.label + (" (baseline)" if index == baseline else "")
            if effective.rule == "RULER":
                threshold = f"RULER {RULER_THRESHOLD}"
            else:
                threshold = (f"NoLiMa {NOLIMA_RATIO} x {effective.base.score:.1f} ({length_label(effective.base.length)})"
                             f" = {effective.threshold:.1f}")
            row = [Cell(label), Cell(threshold), _effective_cell(table, run, effective)]
            row[-1].notes += tuple(table.note(note) for note in effective.notes)
            checks = {check.length: check for check in effective.checks}
            for length in lengths:
                check = checks.get(length)
                if check is None:
                    row.append(Cell(DASH, notes=(table.note(f"{run.label}: no samples of length {length}"),)))
                    continue
                margin = check.margin
                interval = "" if math.isnan(margin.low) else f" [{margin.low:+.1f}, {margin.high:+.1f}]"
                row.append(Cell(f"{margin.margin:+.1f}{interval} {check.mark}", margin.margin,
                                Drill(index, task, (("length", str(length)),)),
                                numbers={"delta": margin.margin, "low": margin.low, "high": margin.high, "n": check.n}))
            table.rows.append(row)
    stratified = ("its tasks' means, each task resampled within itself" if family.stratum
                  else "its samples' scores, resampled together")
    table.note(f"effective length: the longest evaluated length L such that every evaluated length up to L passes; a "
               f"length passes ({PASS}) when the whole {CONFIDENCE:.0%} percentile bootstrap interval of its score minus "
               f"the threshold is at or above 0 (the score is at least the threshold beyond its sampling noise); "
               f"{BELOW}: the whole interval is below 0; {UNSURE}: the interval holds 0, which does not pass. Cells: "
               f"score minus threshold in percentage points [{CONFIDENCE:.0%} interval]; a length's score is the mean "
               f"of {stratified}")
    table.note(f"thresholds, on RULER's 0-100 scale: RULER's {RULER_THRESHOLD} (Llama-2-7B's RULER score at 4K); "
               f"NoLiMa's {NOLIMA_RATIO} x the model's own score at its shortest evaluated length, whose interval "
               "resamples that length's samples too (other prompts than the longer lengths': not paired)")
    return table


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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# ---------------------------------------------------------------------------------------------- long form


def long_records(runs: list[Run], comparisons: dict[tuple[int, str, str], Comparison]) -> list[dict[str, Any]]:
    """One record per run, task, metric and breakdown cell (breakdown "" for the whole task): results.csv."""
    records = []
    for index, run in enumerate(runs):
        for task, result in run.results.items():
            source = run.source(task)
            common = {"run_id": source.run_id, "run_dir": str(source.path), "column": run.label, "model": run.model_name,
                      "task": task, "task_version": result.version, "prompts_digest": result.prompts_digest}
            for metric, value in result.metrics.items():
                comparison = comparisons.get((index, task, metric))
                delta = comparison.delta if comparison else None
                records.append({**common, "metric": metric, "headline": metric == result.headline,
                                "breakdown": "", "value": "", "mean": value["mean"], "stderr": value["stderr"],
                                "n": result.n,
                                "delta": delta.delta if delta else None, "delta_low": delta.low if delta else None,
                                "delta_high": delta.high if delta else None, "delta_n": delta.n if delta else None,
                                "delta_excludes_zero": delta.excludes_zero if delta else None,
                                "delta_note": comparison.reason if comparison else None})
            for key, cells in result.breakdowns.items():
                for value, by_metric in cells.items():
                    for metric, cell in by_metric.items():
                        records.append({**common, "metric": metric, "headline": metric == result.headline,
                                        "breakdown": key, "value": value, "mean": cell["mean"],
                                        "stderr": cell.get("stderr"), "n": cell.get("n")})
    return records


# ---------------------------------------------------------------------------------------------- rendering


PRIMARY = ("mean", "delta", "value")  # the number a cell shows; its other numbers get columns of their own


def _cell_numbers(cell: Cell) -> dict[str, float]:
    if cell.numbers:
        return cell.numbers
    return {"value": cell.sort} if cell.sort is not None else {}


def to_frame(table: Table) -> pd.DataFrame:
    """The table for CSV, with numbers as numbers: a column of text cells stays text (with note marks); a column of
    numbers gives its shown number (mean, delta or value) under the column's name, then one column per other number
    ("<column> stderr", "<column> n", "<column> low", ...). A cell without a number (a dash) is empty there."""
    data: dict[str, list[Any]] = {}
    for index, column in enumerate(table.columns):
        cells = [row[index] for row in table.rows]
        numbered = [_cell_numbers(cell) for cell in cells]
        texts_only = [cell for cell, numbers in zip(cells, numbered) if not numbers and cell.text not in (DASH, "n/a", "")]
        if not any(numbered) or texts_only:
            data[column] = [cell.plain for cell in cells]
            continue
        extra = list(dict.fromkeys(k for numbers in numbered for k in numbers if k not in PRIMARY))
        data[column] = [next((numbers[k] for k in PRIMARY if k in numbers), None) for numbers in numbered]
        for key in extra:
            data[f"{column} {key}"] = [numbers.get(key) for numbers in numbered]
    frame = pd.DataFrame(data)
    for name in frame.columns:
        if name.endswith(" n"):
            frame[name] = frame[name].astype("Int64")
    return frame


def to_markdown(table: Table) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    numeric = [any(row[i].sort is not None for row in table.rows) for i in range(len(table.columns))]
    lines = [f"### {table.title}", "", "| " + " | ".join(esc(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if right else ":---" for right in numeric) + "|"]
    lines += ["| " + " | ".join(esc(cell.plain) for cell in row) + " |" for row in table.rows]
    if table.notes:
        lines.append("")
        lines += [f"[{n}] {esc(text)}  " for n, text in enumerate(table.notes, 1)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "\u00b1": r"$\pm$", "\u0394": r"$\Delta$", "\u2212": "-", DASH: "---", "\u2265": r"$\geq$",
                  PASS: r"$\surd$", BELOW: r"$\times$"}
LATEX_PATTERN = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    return LATEX_PATTERN.sub(lambda m: _LATEX_SPECIAL[m.group()], text)


def _latex_mark(number: int) -> str:
    """A note mark; never a bare "[n]", which LaTeX would read as the optional argument of a preceding \\\\."""
    return rf"\textsuperscript{{[{number}]}}"


def to_latex(table: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); notes follow the tabular in small type."""
    spec = "l" * min(2, len(table.columns)) if table.columns[:2] == ["Task", "Metric"] else "l"
    spec += "r" * (len(table.columns) - len(spec))
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\label{{tab:{table.slug}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(cell.text) + "".join(map(_latex_mark, cell.notes)) for cell in row) + r" \\"
              for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\footnotesize")
        lines += [rf"{_latex_mark(n)} {latex_escape(text)}\\" for n, text in enumerate(table.notes, 1)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
