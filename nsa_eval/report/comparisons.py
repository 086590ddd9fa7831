"""Runs joined by task and compared: which tasks a report covers, whether two runs of a task can be joined (same task
version and prompts), the run others are checked against, the paired bootstrap of every run against the baseline
(`compare`, `Comparison`), the note a table gives a cell that cannot be compared, and results.csv's long records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nsa_eval.report.runs import Run, TaskResult
from nsa_eval.report.table import Table
from nsa_eval.stats import PairedDelta, paired_bootstrap


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


def mismatch_notes(table: Table, runs: list[Run], index: int, task: str, baseline: int | None) -> tuple[int, ...]:
    """The note (its number in the table) that runs[index]'s task cannot be joined with the reference run's, or none."""
    ref = reference_run(runs, task, baseline)
    if ref is None or ref == index:
        return ()
    reason = mismatch(runs[ref].results[task], runs[index].results[task])
    if reason is None:
        return ()
    return (table.note(f"{runs[index].label}: {task} is not comparable with {runs[ref].label} ({reason}); "
                       "no delta or difference map is computed between them"),)


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
