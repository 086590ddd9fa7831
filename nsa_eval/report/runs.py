"""Reading run directories (the run store's format, DESIGN.md) for reports, with checks that name the bad file.

Runs are keyed by folder (two folders holding the same run id are two runs), and runs of one model with the same
settings (model spec and name, max length, chat, attention and sparse settings, dtype, device) but different tasks
are merged into one column, so per-task runs of a model give one row per model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from nsa_eval.report import RUNS_ROOT
from nsa_eval.records import read_samples, samples_file
from nsa_eval.sweep import sweep_points


@dataclass
class TaskResult:
    """One task of one run: metrics.json's entry joined with run.json's task record.

    metrics: {metric: {"mean", "stderr"}}; breakdowns: {key: {value: {metric: {"mean", "stderr", "n"}}}};
    efficiency: {"prefill_ms_mean", "decode_tokens_per_s_mean", "prompt_tokens_mean"} and, for runs since the cost fields
    (issue 21), "decode_ms_per_token_mean", "new_tokens_mean", "kv_bytes_per_step_mean", "attended_share_mean" (may be
    empty).
    """

    name: str
    version: str
    headline: str
    n: int
    metrics: dict[str, dict[str, float]]
    breakdowns: dict[str, dict[str, dict[str, dict[str, float]]]]
    efficiency: dict[str, float]
    config: dict[str, Any]
    prompts_digest: str | None
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # metrics.json's, where a task says (perplexity)

    @property
    def score(self) -> float:
        return self.metrics[self.headline]["mean"]

    @property
    def lower_is_better(self) -> bool:
        """Whether the headline falls as the model gets better (a perplexity): no average with accuracies."""
        return self.higher_is_better.get(self.headline) is False


@dataclass
class Run:
    """A finished (or partly finished) run read from results/runs/<run-id>/, or several runs of one model merged
    into one column (`parts`, each a run folder holding other tasks)."""

    path: Path
    info: dict[str, Any]  # run.json (merged: the first part's, with every part's tasks)
    results: dict[str, TaskResult]  # the tasks metrics.json holds
    label: str = ""  # what tables print; unique among the runs of one report, at most LABEL_CHARS (set by load_runs)
    full_label: str = ""  # the label before it was cut: model name and run keys (set by load_runs)
    key: str = ""  # unique among the runs of one report, from the folder (set by load_runs); names files
    parts: list["Run"] = field(default_factory=list)  # a merged column's run folders, in the order given
    _samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)  # SampleRecord.to_json()s

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    @property
    def model_name(self) -> str:
        return self.info["model"]["name"]

    @property
    def folders(self) -> list["Run"]:
        """The run folders behind this column: its parts, or itself."""
        return self.parts or [self]

    def source(self, task: str) -> "Run":
        """The run folder that holds a task's results (a merged column's part; else this run)."""
        for part in self.parts:
            if task in part.results:
                return part
        return next((part for part in self.parts if task in part.info["tasks"]), self)

    @cached_property
    def planned_tasks(self) -> list[str]:
        """The tasks run.json lists, in order, then any that only metrics.json holds."""
        return list(dict.fromkeys([*self.info["tasks"], *self.results]))

    def samples(self, task: str) -> list[dict[str, Any]]:
        """The records of samples/<task>.jsonl (empty when the file is absent)."""
        source = self.source(task)
        if source is not self:
            return source.samples(task)
        if task not in self._samples:
            self._samples[task] = [r.to_json() for r in read_samples(samples_file(self.path, task), strict=True)]
        return self._samples[task]


MERGE_KEYS = ("attention", "sparse", "dtype", "device")


def setting_key(run: Run) -> str:
    """What must be equal for two runs to be one model's column: the model record and the attention and numeric
    settings (not the seed, limit or tasks, which each task's cells and notes show)."""
    return json.dumps({"model": run.info["model"], **{k: run.info.get(k) for k in MERGE_KEYS}}, sort_keys=True)


def merge_runs(runs: list[Run]) -> list[Run]:
    """Runs of one model and settings holding different tasks, as one column each, whatever the order they are given
    in: runs are taken oldest first (run.json's `created`, then the folder), each joining the first column of its model
    and settings that holds none of its tasks, else starting one; columns come in the order their first run was
    given, parts in age order."""
    given = {id(run): index for index, run in enumerate(runs)}
    columns: list[list[Run]] = []
    for run in sorted(runs, key=lambda r: (str(r.info.get("created", "")), str(r.path.resolve()))):
        home = next((column for column in columns if setting_key(column[0]) == setting_key(run)
                     and not any(set(part.results) & set(run.results) or set(part.info["tasks"]) & set(run.info["tasks"])
                                 for part in column)), None)
        if home is None:
            columns.append([run])
        else:
            home.append(run)
    columns.sort(key=lambda column: min(given[id(part)] for part in column))
    merged = []
    for column in columns:
        if len(column) == 1:
            merged.append(column[0])
            continue
        first = column[0]
        tasks = {name: entry for part in column for name, entry in part.info["tasks"].items()}
        results = {name: result for part in column for name, result in part.results.items()}
        merged.append(Run(path=first.path, info={**first.info, "tasks": tasks}, results=results,
                          key="+".join(part.key for part in column), parts=column))
    return merged


def value_order(value: str) -> tuple:
    """Sort key for breakdown values: numbers numerically and before text; "2048|50" by its parts."""
    def part(text: str) -> tuple:
        try:
            return (0, float(text), "")
        except ValueError:
            return (1, 0.0, text)
    return tuple(part(p) for p in str(value).split("|"))


def resolve_run_dir(run_arg: str | Path) -> Path:
    """A run argument: a directory path, or a run id under results/runs/."""
    path = Path(run_arg)
    if path.is_dir():
        return path
    by_id = RUNS_ROOT / str(run_arg)
    if by_id.is_dir():
        return by_id
    raise ValueError(f"run '{run_arg}' not found: give a run directory or a run id under {RUNS_ROOT}/")


def expand_sweeps(run_args: list[str | Path]) -> list[str | Path]:
    """The run arguments with each budget sweep's folder (nsa_eval/sweep.py) replaced by its points' run folders, by
    budget."""
    out: list[str | Path] = []
    for run_arg in run_args:
        path = Path(run_arg)
        points = sweep_points(path) if path.is_dir() and not (path / "run.json").is_file() else None
        if points is None:
            out.append(run_arg)
        elif not points:
            raise ValueError(f"{path} is a budget sweep none of whose points has started; run it with `nsa-eval run`")
        else:
            out += points
    return out


def load_run(run_arg: str | Path) -> Run:
    """Read run.json and metrics.json of one run directory; ValueError naming the file when either is bad."""
    path = resolve_run_dir(run_arg)
    run_file = path / "run.json"
    if not run_file.is_file():
        raise ValueError(f"{path} is not a run directory (no run.json); give a folder written by `nsa-eval run`")
    info = _read_json(run_file)
    for key, kind in (("run_id", str), ("model", dict), ("tasks", dict)):
        if not isinstance(info.get(key), kind):
            raise ValueError(f"{run_file} lacks '{key}' ({kind.__name__}); it was not written by `nsa-eval run`")
    if not isinstance(info["model"].get("name"), str):
        raise ValueError(f"{run_file} lacks model.name; it was not written by `nsa-eval run`")
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise ValueError(
            f"{path} has no metrics.json (the run did not finish); resume it with `nsa-eval run` into the same directory"
        )
    metrics = _read_json(metrics_file)
    if not isinstance(metrics.get("tasks"), dict):
        raise ValueError(f"{metrics_file} is corrupt: no 'tasks' object; rerun `nsa-eval run` to rewrite it")
    results = {name: _task_result(metrics_file, name, entry, info["tasks"].get(name, {}))
               for name, entry in metrics["tasks"].items()}
    cap = info.get("max_new_tokens")
    for result in results.values():  # runs before issue 23 recorded the budget asked for, not the one capped to
        budget = result.config.get("generation_budget")
        if isinstance(cap, int) and isinstance(budget, int) and budget > cap:
            result.config = {**result.config, "generation_budget": cap}
    return Run(path=path, info=info, results=results)


def load_runs(run_args: list[str | Path], merge: bool = True) -> list[Run]:
    """Load runs, key each by its folder, merge one model's per-task runs into one column (unless merge=False),
    and give each column a unique label: the model name, with the run key where names repeat."""
    if not run_args:
        raise ValueError("no run given; pass one or more run directories (results/runs/<run-id>)")
    runs = [load_run(run_arg) for run_arg in expand_sweeps(run_args)]
    folders = [run.path.resolve() for run in runs]
    repeated = next((run for run, folder in zip(runs, folders) if folders.count(folder) > 1), None)
    if repeated is not None:
        raise ValueError(f"run {repeated.path} is given twice; pass each run once")
    ids = [run.run_id for run in runs]
    for run in runs:  # the run id, or parent/run-id where two folders hold the same run id
        run.key = run.run_id if ids.count(run.run_id) == 1 else f"{run.path.resolve().parent.name}-{run.run_id}"
    keys = [run.key for run in runs]
    for index, run in enumerate(runs):
        if keys.count(run.key) > 1:
            run.key = f"{run.key}-{index + 1}"
    columns = merge_runs(runs) if merge else runs
    names = [column.model_name for column in columns]
    labels: list[str] = []
    for column in columns:
        full = column.model_name if names.count(column.model_name) == 1 else f"{column.model_name} ({column.key})"
        label = short_label(full)
        while label in labels:  # two long names cut to the same text
            label = short_label(full, len(labels) + 1)
        labels.append(label)
        column.label, column.full_label = label, full
        for part in column.parts:
            part.label, part.full_label = column.label, full
    return columns


LABEL_CHARS = 40  # a longer label is cut (tables' heads, figure legends); the Runs table's note gives it whole


def short_label(full: str, number: int | None = None) -> str:
    """A column's label of at most LABEL_CHARS characters: the full one, or its start, an ellipsis and a number."""
    if len(full) <= LABEL_CHARS and number is None:
        return full
    tail = f"\u2026 #{number}" if number is not None else "\u2026"
    return full[: LABEL_CHARS - len(tail)].rstrip(" (+-") + tail


def _task_result(metrics_file: Path, name: str, entry: Any, planned: dict[str, Any]) -> TaskResult:
    where = f"{metrics_file} task '{name}'"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is corrupt (not an object); rerun `nsa-eval run` to rewrite it")
    try:
        number = lambda value: float("nan") if value is None else float(value)  # noqa: E731 - null: none recorded
        metrics = {m: {"mean": number(v["mean"]), "stderr": number(v.get("stderr"))} for m, v in entry["metrics"].items()}
        headline = str(entry["headline"])
        n = int(entry["n"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{where} is corrupt (bad or missing {error}); rerun `nsa-eval run` to rewrite it") from None
    if headline not in metrics:
        raise ValueError(f"{where} is corrupt: headline '{headline}' is not among its metrics")
    return TaskResult(
        name=name,
        version=str(entry.get("version", planned.get("version", "?"))),
        headline=headline,
        n=n,
        metrics=metrics,
        breakdowns=entry.get("breakdowns") or {},
        efficiency=entry.get("efficiency") or {},
        config=planned.get("config") or {},
        prompts_digest=planned.get("prompts_digest"),
        higher_is_better={k: v for k, v in (entry.get("higher_is_better") or {}).items() if isinstance(v, bool)},
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt (invalid JSON: {error}); rerun `nsa-eval run` to rewrite it") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object); rerun `nsa-eval run` to rewrite it")
    return data

