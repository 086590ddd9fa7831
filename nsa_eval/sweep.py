"""A sparse budget sweep: `nsa-eval run ... --attention sparse --sparse-budget 512,1024,2048` runs the same tasks once
per budget, each point a normal run folder under the sweep's folder, one after another in one process:

  <output>/
    sweep.json          what the sweep is: its budgets, each point's folder, the settings its points share
    budget-512/         a run folder as `nsa-eval run --sparse-budget 512 --output <output>/budget-512` writes it
    budget-1024/
    report/             the sweep's report (accuracy against budget: a table and a figure), written at its end

Each point is resumable as any run is: a rerun of the same command finds the finished points complete (no model
loads for them) and resumes a partial one; a rerun with more budgets adds points. Everything is checked before the
first model loads: the budgets (each one's sparse settings), sweep.json against this command's shared settings, and
every point's folder (`RunStore.check`). `nsa-eval report <output>` reads the sweep's folder as its points' runs.
Imports nothing heavier than the run store: the reporter reads sweep.json through `sweep_points`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsa_eval.store import RunStore, now, settings_diff

if TYPE_CHECKING:
    from nsa_eval.run_config import RunConfig

SWEEP_FILE = "sweep.json"
BUDGET_FLAG = "--sparse-budget"


def point_folder(budget: int) -> str:
    return f"budget-{budget}"


@dataclasses.dataclass
class Point:
    budget: int
    config: RunConfig
    state: str = "new"  # new, resume (done/total samples), complete
    done: int = 0
    total: int = 0

    @property
    def folder(self) -> Path:
        assert self.config.output is not None
        return self.config.output


@dataclasses.dataclass
class Sweep:
    root: Path
    points: list[Point]
    settings: dict[str, Any]  # what every point shares: a point's settings without --sparse-budget
    overwrite: bool = False

    @classmethod
    def of(cls, configs: list[RunConfig]) -> Sweep:
        """The sweep of configs that differ only in their sparse budget (RunConfig.points_from_cli): the output
        folder (--output, else results/runs/<model>-<tasks>-budget-sweep-<time>) and one folder in it per budget."""
        first = configs[0]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"a budget sweep ({BUDGET_FLAG} with several budgets) runs its points one after another in "
                             "one process; under torchrun, run each budget as a run of its own")
        root = first.output or default_root(first)
        points = [Point(config.sparse.budget, dataclasses.replace(config, output=root / point_folder(config.sparse.budget)))
                  for config in configs]
        shared = {k: v for k, v in first.settings().items() if k != BUDGET_FLAG}
        return cls(root, points, shared, first.overwrite)

    def check(self) -> None:
        """Everything before the first model loads: the folder is a sweep of these settings (or new), each point's
        folder holds nothing else (RunStore.check); sets each point's state. ValueError naming what is wrong."""
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--output {self.root} is a file; give a folder for the budget sweep")
        if (self.root / "run.json").is_file():
            raise ValueError(f"--output {self.root} is a run folder; a budget sweep needs a folder of its own (it "
                             "holds one run folder per budget): choose another --output")
        manifest = read_manifest(self.root)
        if manifest is None and self.root.is_dir() and any(self.root.iterdir()):
            raise ValueError(f"--output {self.root} is not empty and holds no {SWEEP_FILE}; choose an empty or new "
                             "folder for the budget sweep")
        if manifest is not None and manifest.get("settings") != self.settings and not self.overwrite:
            differences = [d.replace(" in the run", " in the sweep")
                           for d in settings_diff(self.settings, manifest.get("settings") or {})]
            raise ValueError(f"--output {self.root} holds a budget sweep with other settings ("
                             f"{'; '.join(differences) or 'unreadable settings'}); choose another --output, or pass "
                             "--overwrite to start it over")
        for point in self.points:
            store = RunStore(point.folder, settings=point.config.settings(), overwrite=point.config.overwrite)
            existing = store.check()
            if existing is None or self.overwrite:
                continue
            point.done, point.total = store.counts(existing)
            if existing.finished and (point.folder / "metrics.json").is_file():
                point.state = "complete"
            elif store.has_samples():
                point.state = "resume"

    def write_manifest(self) -> None:
        """sweep.json: the budgets asked now and those an earlier run of this sweep held (unless --overwrite)."""
        manifest = (None if self.overwrite else read_manifest(self.root)) or {}
        budgets = sorted({*map(int, manifest.get("budgets", [])), *(p.budget for p in self.points)})
        data = {"sweep": "sparse budget", "flag": BUDGET_FLAG, "budgets": budgets,
                "points": {str(b): point_folder(b) for b in budgets}, "settings": self.settings,
                "created": manifest.get("created", now()), "argv": list(self.points[0].config.argv) or sys.argv}
        self.root.mkdir(parents=True, exist_ok=True)
        temp = self.root / f"{SWEEP_FILE}.tmp"
        temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        temp.replace(self.root / SWEEP_FILE)

    def describe(self) -> str:
        """One line: the folder and each point's state."""
        states = []
        for point in self.points:
            if point.state == "complete":
                states.append(f"{point.budget} complete")
            elif point.state == "resume":
                states.append(f"{point.budget} resuming {point.done}/{point.total}")
            else:
                states.append(f"{point.budget} new")
        return f"budget sweep of {len(self.points)} points in {self.root}: " + ", ".join(states)


def default_root(config: RunConfig) -> Path:
    """results/runs/<model>-<tasks>-budget-sweep-<time> (the model as its spec names it: no model has loaded yet)."""
    model = Path(config.model_spec.split(":", 1)[-1].rstrip("/")).name or config.model_spec
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model}-{'-'.join(config.tasks)}").strip("-")
    return Path("results") / "runs" / f"{slug}-budget-sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """sweep.json's content; None when the folder holds none; ValueError when it is corrupt."""
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error}); rerun the sweep with --overwrite, or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), dict):
        raise ValueError(f"{path} is corrupt (no 'points' object); rerun the sweep with --overwrite, or remove it")
    return data


def sweep_points(folder: str | Path) -> list[Path] | None:
    """The run folders of a sweep folder, by budget, that a run has started (run.json written); None when the folder
    is not a sweep folder."""
    manifest = read_manifest(Path(folder))
    if manifest is None:
        return None
    ordered = sorted(manifest["points"].items(), key=lambda item: int(item[0]) if str(item[0]).isdigit() else 0)
    return [Path(folder) / name for _, name in ordered if (Path(folder) / name / "run.json").is_file()]
