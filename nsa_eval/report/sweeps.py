"""Budget sweeps in the report: runs of one model and settings that differ only in the sparse budget (a sweep folder of
`nsa-eval run --sparse-budget A,B,...`, nsa_eval/sweep.py, or runs given one by one), found by what their run.json
records, and their section: a table of the headline score per budget (per task, and per context length where the task
has one; full attention's column when the report holds a full-attention run of the model) and the accuracy-vs-budget
curve (figures.budget_curve)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from nsa_eval.report import figures
from nsa_eval.report.comparisons import mismatch, report_tasks
from nsa_eval.report.runs import Run, value_order
from nsa_eval.report.table import DASH, Cell, Drill, FigureFile, Section, Table, fmt, slug
from nsa_eval.tasks.base import is_number


@dataclass
class BudgetSweep:
    """Runs of one model and settings that differ only in the sparse budget (a budget sweep, nsa_eval/sweep.py, or
    runs given one by one): points (budget, run index) by budget; full: a full-attention run of the same model and
    settings, drawn as the reference."""

    model: str
    fixed: str  # the sparse settings the points share, e.g. "leading 64, local 128, block 64"
    points: list[tuple[int, int]]
    full: int | None = None
    repeated: list[int] = field(default_factory=list)  # run indexes of a budget already taken by an earlier run

    @property
    def slug(self) -> str:
        return slug(f"budget-sweep-{self.model}-{self.fixed}")


def _model_key(run: Run) -> dict[str, Any]:
    """What two runs must share to be points of one sweep: the model record without its name (a sparse run's name
    carries its budget), dtype and device."""
    model = {k: v for k, v in (run.info.get("model") or {}).items() if k != "name"}
    return {"model": model, "dtype": run.info.get("dtype"), "device": run.info.get("device")}


def budget_sweeps(runs: list[Run]) -> list[BudgetSweep]:
    """The budget sweeps among the runs: sparse runs of one model and settings with two budgets or more, in the order
    their first run was given; each with the first full-attention run of the same model and settings, if any."""
    groups: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        sparse = run.info.get("sparse")
        if run.info.get("attention") == "sparse" and isinstance(sparse, dict) and isinstance(sparse.get("budget"), int):
            key = json.dumps({**_model_key(run), "sparse": {k: v for k, v in sparse.items() if k != "budget"}},
                             sort_keys=True)
            groups.setdefault(key, []).append(index)
    sweeps = []
    for key, indexes in groups.items():
        budgets: dict[int, int] = {}
        repeated = []
        for index in indexes:
            budget = runs[index].info["sparse"]["budget"]
            if budget in budgets:
                repeated.append(index)
            else:
                budgets[budget] = index
        if len(budgets) < 2:
            continue
        first = runs[indexes[0]]
        model_key = json.dumps(_model_key(first), sort_keys=True)
        full = next((i for i, run in enumerate(runs) if run.info.get("attention") in (None, "full")
                     and run.info.get("model_attention") in (None, "full")
                     and json.dumps(_model_key(run), sort_keys=True) == model_key), None)
        fixed = ", ".join(f"{k} {v}" for k, v in first.info["sparse"].items() if k != "budget")
        model = re.sub(r"\+sparse\d+$", "", first.model_name)
        sweeps.append(BudgetSweep(model, fixed, sorted(budgets.items()), full, repeated))
    return sweeps


def sweep_series(run: Run, task: str) -> dict[str, dict[str, float]]:
    """A run's headline score on a task, whole and per length: {"all": {"mean", "stderr", "n"}, "1024": ...}."""
    result = run.results[task]
    series = {"all": {"mean": result.score, "stderr": result.metrics[result.headline]["stderr"], "n": result.n}}
    for value, cell in sorted(result.breakdowns.get("length", {}).items(), key=lambda item: value_order(item[0])):
        if result.headline in cell:
            series[value] = {k: cell[result.headline][k] for k in ("mean", "stderr", "n") if k in cell[result.headline]}
    return series


def sweep_table(runs: list[Run], sweep: BudgetSweep) -> Table:
    """Accuracy against sparse budget: a row per task (and per context length where the task has one), a column per
    budget, then full attention's column when the report holds a full-attention run of the model."""
    columns = [str(budget) for budget, _ in sweep.points] + (["full attention"] if sweep.full is not None else [])
    holders = [index for _, index in sweep.points] + ([sweep.full] if sweep.full is not None else [])
    table = Table(sweep.slug, f"{sweep.model}: score by sparse budget ({sweep.fixed})", ["Task", "Samples", *columns])
    tasks = [task for task in report_tasks([runs[i] for i in holders]) if any(task in runs[i].results for i in holders)]
    first = sweep.points[0][1]
    for task in tasks:
        series = {index: sweep_series(runs[index], task) for index in holders if task in runs[index].results}
        keys = list(dict.fromkeys(k for s in series.values() for k in s))
        headline = next(runs[i].results[task].headline for i in holders if task in runs[i].results)
        for key in keys:
            label = f"{headline}, all samples" if key == "all" else f"length {key}"
            row = [Cell(task), Cell(label, float(key) if is_number(key) else None)]
            for index in holders:
                cell = series.get(index, {}).get(key)
                if cell is None:
                    row.append(Cell(DASH, notes=(table.note(f"{runs[index].label}: no {task} samples"
                                                            + ("" if key == "all" else f" of length {key}")),)))
                    continue
                reason = (mismatch(runs[first].results[task], runs[index].results[task])
                          if task in runs[first].results else None)
                notes = (table.note(f"{runs[index].label}: {task} is not comparable with the smallest budget's run "
                                    f"({reason})"),) if reason else ()
                filters = () if key == "all" else (("length", key),)
                row.append(Cell(f"{fmt(cell['mean'])}{table.n_text(int(cell['n']) if 'n' in cell else None)}",
                                cell["mean"], Drill(index, task, filters), notes,
                                {k: v for k, v in cell.items() if isinstance(v, (int, float))}))
            table.rows.append(row)
    table.note("columns: --sparse-budget, the tokens each query attends (leading + local + selected blocks); each "
               "column is one run: " + "; ".join(f"{b}: {runs[i].label}" for b, i in sweep.points)
               + (f"; full attention: {runs[sweep.full].label}" if sweep.full is not None else ""))
    for index in sweep.repeated:
        table.note(f"{runs[index].label}: a second run of budget {runs[index].info['sparse']['budget']}, not shown here "
                   "(the first given is)")
    return table


def sweep_section(runs: list[Run], sweep: BudgetSweep) -> Section:
    """A budget sweep: its table (a column per budget) and a curve per task (score against budget, a line for all
    samples and one per context length, full attention dashed)."""
    section = Section(f"Budget sweep: {sweep.model} ({sweep.fixed})", [sweep_table(runs, sweep)])
    holders = [index for _, index in sweep.points]
    for task in report_tasks([runs[i] for i in holders]):
        points = [(budget, runs[index]) for budget, index in sweep.points if task in runs[index].results]
        if len(points) < 2:
            continue
        series: dict[str, dict[int, dict[str, float]]] = {}
        for budget, run in points:
            for key, cell in sweep_series(run, task).items():
                label = "all samples" if key == "all" else f"length {key}"
                series.setdefault(label, {})[budget] = cell
        reference = {}
        if sweep.full is not None and task in runs[sweep.full].results:
            reference = {("all samples" if key == "all" else f"length {key}"): cell
                         for key, cell in sweep_series(runs[sweep.full], task).items()}
        headline = points[0][1].results[task].headline
        section.figures.append(FigureFile(slug(f"{sweep.slug}-{task}"), f"{sweep.model}: {task} {headline} by sparse "
                                          f"budget ({sweep.fixed})", figures.budget_curve(
                                              f"{sweep.model}: {task} by sparse budget", series, reference, headline)))
    return section
