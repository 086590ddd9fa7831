"""Cost beside accuracy (issue 21): what the runs' generative samples record of their own speed and KV reads
(nsa_eval/runner.py: prefill ms, decode ms per token, new tokens, KV bytes per decode step, share of the context
attended; model_adapters/decode_cost.py says what the KV count holds), shown per task and context length beside the
score, with speedups against the report's baseline, and the Pareto figure of score against decode time and KV bytes.

A speedup is a ratio of two runs' timings, so it is printed only for runs measured on one card (`measured_on`: the
GPU's name for a CUDA run, the CPU's model and core count for a CPU run); between runs on different cards or devices,
or against a server whose hardware the run cannot know, the cell is a dash and a note says why.
The Speed section's table of each run's means (`efficiency_table`) lives here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nsa_eval.report import figures
from nsa_eval.report.comparisons import mismatch, report_tasks
from nsa_eval.report.runs import Run, value_order
from nsa_eval.report.table import DASH, Cell, Drill, FigureFile, Table, fmt, slug
from nsa_eval.tasks.base import is_number

SERVER_ENGINES = ("OpenAIModel",)  # timings taken over HTTP: the server's hardware is not in the run's record
MB = 1e6


def hardware_text(run: Run) -> str:
    """The run's GPU, else its CPU (model where recorded), core count and architecture, from run.json's hardware record
    (the Runs table; `measured_on` names the device the timings came from)."""
    hw = run.info.get("hardware") or {}
    if hw.get("gpu"):
        return f"{hw['gpu']}" + (f" x{hw['gpu_count']}" if hw.get("gpu_count", 1) > 1 else "")
    if hw.get("cpu_count"):
        return (f"CPU{' ' + hw['cpu'] if hw.get('cpu') else ''}, {hw['cpu_count']} cores"
                + (f" ({hw['machine']})" if hw.get("machine") else ""))
    return str(hw.get("platform") or "unknown hardware")


def measured_on(run: Run) -> str | None:
    """The card a run's timings come from: the GPU's name (a CUDA run), else the CPU's model (run.json's `cpu`, else
    its architecture) and core count; None for a run against a server (its hardware is unknown here)."""
    if run.info.get("engine") in SERVER_ENGINES:
        return None
    hw = run.info.get("hardware") or {}
    device = str(run.info.get("device") or "")
    if hw.get("gpu") and (device.startswith("cuda") or device in ("", "None")):
        return str(hw["gpu"])
    cpu = hw.get("cpu") or hw.get("machine") or hw.get("platform") or "unknown CPU"
    return f"CPU {cpu}, {hw.get('cpu_count', '?')} cores"


# ---------------------------------------------------------------------------------------------- the Speed table


EFFICIENCY = (("prefill_ms_mean", "prefill ms (mean)", "{:.1f}"),
              ("decode_tokens_per_s_mean", "decode tokens/s (mean)", "{:.1f}"),
              ("decode_ms_per_token_mean", "decode ms per token (mean)", "{:.2f}"),
              ("new_tokens_mean", "new tokens (mean)", "{:.1f}"),
              ("kv_bytes_per_step_mean", "KV MB read per decode step (mean)", "{:.3f}"),
              ("attended_share_mean", "share of the context attended (mean)", "{:.3f}"),
              ("prompt_tokens_mean", "prompt tokens (mean)", "{:.1f}"))


def efficiency_table(runs: list[Run]) -> Table | None:
    """Model speed and cost as the runs measured them: a row per task and quantity (those some run recorded), a column
    per run."""
    table = Table("efficiency", "Model speed measured during the runs", ["Task", "Quantity", *(r.label for r in runs)])
    for task in report_tasks(runs):
        if not any(task in run.results and run.results[task].efficiency for run in runs):
            continue
        for key, label, form in EFFICIENCY:
            values = [run.results[task].efficiency.get(key) if task in run.results else None for run in runs]
            if all(value is None for value in values):
                continue
            row = [Cell(task), Cell(label)]
            for index, (run, value) in enumerate(zip(runs, values)):
                shown = value / MB if key == "kv_bytes_per_step_mean" and value is not None else value
                n = run.results[task].n if task in run.results else None
                row.append(Cell(DASH) if value is None else Cell(
                    f"{form.format(shown)} (n={n})", shown, Drill(index, task), numbers={"mean": shown, "n": n}))
            table.rows.append(row)
    if not table.rows:
        return None
    table.note("measured on: " + "; ".join(f"{run.label}: {measured_on(run) or 'a server (hardware unknown)'}"
                                           for run in runs))
    if any("kv_bytes_per_step_mean" in r.efficiency for run in runs for r in run.results.values()):
        table.note(KV_NOTE)
    return table


KV_NOTE = ("KV MB: 10^6 bytes of the KV cache one decode step reads, over every layer and KV head, from the model's "
           "attention and its settings (full: every cached token; NSA: compressed blocks, selected blocks and the "
           "window; sparse: block-mean keys and the budget's blocks); share attended: the context's tokens a step "
           "attends over the context (NSA: an upper bound). model_adapters/decode_cost.py says exactly what is counted")


# ---------------------------------------------------------------------------------------------- per length


@dataclass
class CostPoint:
    """One run's samples of one length (value "" for a task without lengths): score and cost means."""

    run: int
    value: str
    score: float
    stderr: float | None
    n: int
    cost: dict[str, float | None]  # prefill_ms, decode_ms_per_token, new_tokens, kv_bytes_per_step, attended_share


COST_KEYS = ("prefill_ms", "decode_ms_per_token", "new_tokens", "kv_bytes_per_step", "attended_share")


def _finite(value: Any) -> float | None:
    """A standard error as a number, None where none was recorded (null, NaN: fewer than 2 samples)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _cost_means(records: list[dict[str, Any]]) -> dict[str, float | None]:
    def value(record: dict[str, Any], key: str) -> Any:
        if key == "new_tokens":
            counts = record.get("new_tokens")
            return sum(counts) / len(counts) if isinstance(counts, list) and counts else None
        return record.get(key)

    return {key: _mean([value(r, key) for r in records]) for key in COST_KEYS}


def cost_points(runs: list[Run], task: str) -> list[CostPoint]:
    """Every run's score and cost means per context length of a task (breakdown "length"; the whole task where it has
    none), from its samples; none for runs whose samples record no decode cost (not generative, or before issue 21)."""
    points = []
    for index, run in enumerate(runs):
        result = run.results.get(task)
        records = [r for r in run.samples(task) if "prefill_ms" in r] if result else []
        if not any(r.get("decode_ms_per_token") is not None or r.get("kv_bytes_per_step") is not None for r in records):
            continue
        lengths = result.breakdowns.get("length")
        if not lengths:
            stderr = _finite(result.metrics[result.headline].get("stderr"))
            points.append(CostPoint(index, "", result.score, stderr, result.n, _cost_means(records)))
            continue
        for value in sorted(lengths, key=value_order):
            cell = lengths[value].get(result.headline)
            if cell is None:
                continue
            mine = [r for r in records if str((r.get("breakdown") or {}).get("length")) == value]
            points.append(CostPoint(index, value, cell["mean"], _finite(cell.get("stderr")),
                                    int(cell.get("n", len(mine))), _cost_means(mine)))
    return points


def speedup_reason(runs: list[Run], index: int, baseline: int, task: str) -> str | None:
    """Why runs[index]'s timings are not divided by the baseline's: another card or device, a server, other prompts."""
    run, base = runs[index], runs[baseline]
    here, there = measured_on(run), measured_on(base)
    if here is None or there is None:
        return "timed by a server whose hardware the run does not record"
    if here != there:
        return f"measured on {here}, the baseline on {there}: a ratio across cards says nothing about the method"
    if task in base.results:
        reason = mismatch(base.results[task], run.results[task])
        if reason:
            return f"not the same samples ({reason})"
    return None


def _quantity(value: float | None, form: str, scale: float = 1.0) -> Cell:
    return Cell(DASH) if value is None else Cell(form.format(value / scale), value / scale,
                                                 numbers={"value": value / scale})


def cost_table(runs: list[Run], task: str, baseline: int | None, points: list[CostPoint]) -> Table:
    """A task's score and cost per context length, a row per length and run; with a baseline, its prefill and decode
    speedups (the baseline's ms over the run's, on one card only)."""
    by_length = any(point.value for point in points)
    base_label = runs[baseline].label if baseline is not None else ""
    speed_columns = [f"prefill speedup vs {base_label}", f"decode speedup vs {base_label}"] if baseline is not None else []
    headline = runs[points[0].run].results[task].headline
    table = Table(slug(f"{task}-cost"), f"{task}: {headline} and cost" + (" by context length" if by_length else ""),
                  [*(["Length"] if by_length else []), "Model", headline, "prefill ms", "decode ms/token", "new tokens",
                   "KV MB/step", "share attended", *speed_columns])
    base_points = {point.value: point for point in points if point.run == baseline}
    order = sorted({point.value for point in points}, key=value_order)
    for value in order:
        for point in (p for p in points if p.value == value):
            run = runs[point.run]
            filters = (("length", value),) if value else ()
            row = [*([Cell(value, float(value) if is_number(value) else None)] if by_length else []),
                   Cell(run.label + (" (baseline)" if point.run == baseline else "")),
                   Cell(f"{fmt(point.score)}{table.n_text(point.n)}", point.score, Drill(point.run, task, filters),
                        numbers={"mean": point.score, **({"stderr": point.stderr} if point.stderr is not None else {}),
                                 "n": point.n}),
                   _quantity(point.cost["prefill_ms"], "{:.1f}"), _quantity(point.cost["decode_ms_per_token"], "{:.2f}"),
                   _quantity(point.cost["new_tokens"], "{:.1f}"), _quantity(point.cost["kv_bytes_per_step"], "{:.3f}", MB),
                   _quantity(point.cost["attended_share"], "{:.3f}")]
            if baseline is not None:
                row += _speedup_cells(table, runs, point, baseline, base_points.get(value), task)
            table.rows.append(row)
    table.note(KV_NOTE)
    table.note("prefill ms: the prompt's forward pass; decode ms/token: wall time per decode step (per output token "
               "after the first; a batched engine's step decodes its other rows too); means over the samples"
               + (" of the length" if by_length else ""))
    if baseline is not None:
        table.note(f"speedup: {base_label}'s mean ms over the run's, at the same length, only between runs measured on "
                   "one card (" + "; ".join(f"{run.label}: {measured_on(run) or 'a server'}" for run in runs) + ")")
    return table


def _speedup_cells(table: Table, runs: list[Run], point: CostPoint, baseline: int, base: CostPoint | None,
                   task: str) -> list[Cell]:
    if point.run == baseline:
        return [Cell("baseline"), Cell("baseline")]
    if base is None:
        note = table.note(f"{runs[baseline].label} has no {task} samples" + (f" of length {point.value}" if point.value
                                                                              else "") + " with timings")
        return [Cell(DASH, notes=(note,)), Cell(DASH, notes=(note,))]
    reason = speedup_reason(runs, point.run, baseline, task)
    if reason:
        note = table.note(f"{runs[point.run].label}: no speedup, {reason}")
        return [Cell(DASH, notes=(note,)), Cell(DASH, notes=(note,))]
    notes = ()
    batch, base_batch = runs[point.run].info.get("batch_size"), runs[baseline].info.get("batch_size")
    if batch != base_batch:
        notes = (table.note(f"{runs[point.run].label}: batch size {batch}, the baseline's {base_batch}: a decode step's "
                            "time covers every row of its batch"),)
    cells = []
    for key in ("prefill_ms", "decode_ms_per_token"):
        mine, theirs = point.cost[key], base.cost[key]
        if not mine or theirs is None:
            cells.append(Cell(DASH))
            continue
        ratio = theirs / mine
        cells.append(Cell(f"{ratio:.2f}x", ratio, notes=notes, numbers={"value": ratio}))
    return cells


def cost_parts(runs: list[Run], task: str, baseline: int | None) -> tuple[list[Table], list[FigureFile]]:
    """A task's cost table and Pareto figure (score against decode ms per token and against KV bytes per step, per
    length), or nothing when no run's samples of the task record their cost."""
    points = cost_points(runs, task)
    if not points:
        return [], []
    table = cost_table(runs, task, baseline, points)
    headline = runs[points[0].run].results[task].headline
    drawn = [figures.ParetoPoint(runs[p.run].label, f"length {p.value}" if p.value else "all samples", p.score,
                               p.stderr, p.cost["decode_ms_per_token"], p.cost["kv_bytes_per_step"]) for p in points]
    pictures = []
    if any(p.decode_ms_per_token is not None or p.kv_bytes_per_step is not None for p in drawn):
        on = sorted({measured_on(runs[p.run]) or "a server" for p in points})
        pictures.append(FigureFile(slug(f"{task}-pareto"), f"{task}: {headline} against decode time and KV bytes",
                                   figures.cost_pareto(f"{task}: {headline} against cost (decode timed on "
                                                       f"{'; '.join(on)})", drawn, headline), wide=True))
    return [table], pictures
