"""The tables a benchmark's users know, in its task's section beside the generic ones: RULER's README table, the
effective length (NIAH, RULER; report/effective.py) and AIME by generation budget (the paper's Table 3 form).

`EXTRA_TABLES` maps a task family to the function that builds its tables; `benchmark_tables` picks a task's families
(the registered names its name starts with; AIME's too for a task whose runs record a generation budget), so build.py
names no benchmark. A new benchmark table is one function here with `@extra_tables("<family>")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from nsa_eval.report import reference
from nsa_eval.report.comparisons import mismatch_notes
from nsa_eval.report.effective import (BELOW, CONFIDENCE, NOLIMA_RATIO, PASS, RULER_THRESHOLD, UNSURE, Effective,
                                       effective_lengths, family_of, length_label)
from nsa_eval.report.runs import Run, TaskResult
from nsa_eval.report.table import DASH, Cell, Drill, Table, budget_label, fmt, slug
from nsa_eval.tasks.ruler_data import SUBTASKS as RULER_TASKS

# A family's builder: (runs, task, the task's breakdown keys, baseline index, with_paper, seed) -> its tables.
Builder = Callable[[list[Run], str, list[str], int | None, bool, int], list[Table]]


@dataclass(frozen=True)
class ExtraTables:
    """A task family's own tables: the function that builds them, and whether its task's section puts them after the
    cost table (AIME's budget table) rather than before it (RULER's table, the effective length)."""

    build: Builder
    after_cost: bool = False


EXTRA_TABLES: dict[str, ExtraTables] = {}  # task family (how a task's name starts) -> its tables


def extra_tables(family: str, *, after_cost: bool = False) -> Callable[[Builder], Builder]:
    """Registers the decorated function as the builder of a task family's tables."""
    def register(build: Builder) -> Builder:
        EXTRA_TABLES[family] = ExtraTables(build, after_cost)
        return build
    return register


def benchmark_families(task: str, runs: list[Run]) -> list[str]:
    """The families whose tables a task's section gets: each registered family its name starts with ("ruler",
    "niah", "aime"), and AIME's for any task whose runs record a generation budget (AIME's table is by budget)."""
    named = [family for family in EXTRA_TABLES if task.startswith(family)]
    budgeted = any("generation_budget" in run.results[task].config for run in runs if task in run.results)
    return named + (["aime"] if budgeted and "aime" not in named else [])


def benchmark_tables(runs: list[Run], task: str, keys: list[str], baseline: int | None, with_paper: bool,
                     seed: int = 0) -> tuple[list[Table], list[Table]]:
    """A task's benchmark tables, built by its families' registered builders: those its section puts before the cost
    table, and those after it."""
    before: list[Table] = []
    after: list[Table] = []
    for family in benchmark_families(task, runs):
        extra = EXTRA_TABLES[family]
        (after if extra.after_cost else before).extend(extra.build(runs, task, keys, baseline, with_paper, seed))
    return before, after


# ---------------------------------------------------------------------------------------------- AIME


def budget_of(result: TaskResult) -> int | None:
    """A generative task's generation budget in tokens, from its config (AIME records `generation_budget`)."""
    budget = result.config.get("generation_budget", result.config.get("max_new_tokens"))
    return int(budget) if isinstance(budget, (int, float)) else None


@extra_tables("aime", after_cost=True)
def aime_tables(runs: list[Run], task: str, keys: list[str], baseline: int | None, with_paper: bool,
                seed: int = 0) -> list[Table]:
    """The paper's Table 3 form: a row per model, a column per generation budget (8k, 16k); a run's score sits
    in the column of its own budget, beside the paper's rows of the same budget."""
    holders = [(i, run, run.results[task]) for i, run in enumerate(runs) if task in run.results]
    budgets = sorted({b for _, _, result in holders if (b := budget_of(result)) is not None})
    table = Table(slug(f"{task}-by-generation-budget"), f"{task} by generation budget (the paper's Table 3 form)",
                  ["Model", *(f"{budget_label(b)} budget" for b in budgets)])
    for index, run, result in holders:
        budget = budget_of(result)
        row = [Cell(run.label + (" (baseline)" if index == baseline else ""),
                    notes=mismatch_notes(table, runs, index, task, baseline))]
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
    return [table]


# ---------------------------------------------------------------------------------------------- RULER, NIAH


@extra_tables("ruler")
def ruler_tables(runs: list[Run], task: str, keys: list[str], baseline: int | None, with_paper: bool,
                 seed: int = 0) -> list[Table]:
    """RULER's README table (from the runs' task x length breakdown), then the effective-length table."""
    readme = [ruler_table(runs, task, baseline, seed)] if "task x length" in keys else []
    return readme + effective_tables(runs, task, keys, baseline, with_paper, seed)


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
                    notes=mismatch_notes(table, runs, index, task, baseline))]
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


@extra_tables("niah")
def effective_tables(runs: list[Run], task: str, keys: list[str], baseline: int | None, with_paper: bool,
                     seed: int = 0) -> list[Table]:
    """Effective length per model under RULER's and NoLiMa's thresholds (report/effective.py): a row per model and
    threshold, the effective length, then per evaluated length the score's margin over the threshold with its 95%
    bootstrap interval and whether it passes. No table for a task without a length breakdown, or when no run holds
    the task's samples by length."""
    found = [(index, run, effective) for index, run in enumerate(runs) if "length" in keys and task in run.results
             and (effective := effective_lengths(run, task, seed=seed)) is not None]
    if not found:
        return []
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
    return [table]
