"""Reading run directories (the run store's format, DESIGN.md) for reports, with checks that name the bad file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from nsa_eval.report import RUNS_ROOT



@dataclass
class TaskResult:
    """One task of one run: metrics.json's entry joined with run.json's task record.

    metrics: {metric: {"mean", "stderr"}}; breakdowns: {key: {value: {metric: {"mean", "stderr", "n"}}}};
    efficiency: {"prefill_ms_mean", "decode_tokens_per_s_mean", "prompt_tokens_mean"} (may be empty).
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

    @property
    def score(self) -> float:
        return self.metrics[self.headline]["mean"]


@dataclass
class Run:
    """A finished (or partly finished) run read from results/runs/<run-id>/."""

    path: Path
    info: dict[str, Any]  # run.json
    results: dict[str, TaskResult]  # the tasks metrics.json holds
    label: str = ""  # what tables print; unique among the runs of one report (set by load_runs)
    _samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    @property
    def model_name(self) -> str:
        return self.info["model"]["name"]

    @cached_property
    def planned_tasks(self) -> list[str]:
        """The tasks run.json lists, in order, then any that only metrics.json holds."""
        return list(dict.fromkeys([*self.info["tasks"], *self.results]))

    def samples(self, task: str) -> list[dict[str, Any]]:
        """The records of samples/<task>.jsonl (empty when the file is absent)."""
        if task not in self._samples:
            self._samples[task] = _read_jsonl(self.path / "samples" / f"{task}.jsonl")
        return self._samples[task]


def value_order(value: str) -> tuple:
    """Sort key for breakdown values: numbers numerically and before text; "2048|50" by its parts."""
    def part(text: str) -> tuple:
        try:
            return (0, float(text), "")
        except ValueError:
            return (1, 0.0, text)
    return tuple(part(p) for p in str(value).split("|"))


def resolve_run_dir(spec: str | Path) -> Path:
    """A run argument: a directory path, or a run id under results/runs/."""
    path = Path(spec)
    if path.is_dir():
        return path
    by_id = RUNS_ROOT / str(spec)
    if by_id.is_dir():
        return by_id
    raise ValueError(f"run '{spec}' not found: give a run directory or a run id under {RUNS_ROOT}/")


def load_run(spec: str | Path) -> Run:
    """Read run.json and metrics.json of one run directory; ValueError naming the file when either is bad."""
    path = resolve_run_dir(spec)
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
    return Run(path=path, info=info, results=results)


def load_runs(specs: list[str | Path]) -> list[Run]:
    """Load runs and give each a unique label: the model name, with the run id where names repeat."""
    if not specs:
        raise ValueError("no run given; pass one or more run directories (results/runs/<run-id>)")
    runs = [load_run(spec) for spec in specs]
    ids = [run.run_id for run in runs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"run {repeated[0]} is given twice; pass each run once")
    names = [run.model_name for run in runs]
    for run in runs:
        run.label = run.model_name if names.count(run.model_name) == 1 else f"{run.model_name} ({run.run_id})"
    return runs


def _task_result(metrics_file: Path, name: str, entry: Any, planned: dict[str, Any]) -> TaskResult:
    where = f"{metrics_file} task '{name}'"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is corrupt (not an object); rerun `nsa-eval run` to rewrite it")
    try:
        metrics = {m: {"mean": float(v["mean"]), "stderr": float(v.get("stderr", float("nan")))}
                   for m, v in entry["metrics"].items()}
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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is corrupt ({error}); rerun `nsa-eval run` to rewrite it") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{path} line {number} is not a sample record (no 'id')")
            records.append(record)
    return records
