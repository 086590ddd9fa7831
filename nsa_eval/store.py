"""The run directory, written as the run goes so that a crash loses at most the sample in flight.

results/runs/<run-id>/
  run.json               model spec, resolved config and its hash, seeds, versions, git sha, hardware, tasks
  samples/<task>.jsonl   one record a line, appended and flushed as each sample finishes (the task name
                         with characters other than letters, digits, '.', '_' and '-' as '_': lm-eval_gsm8k.jsonl)
  metrics.json           per task: headline metric with standard error, breakdowns, n, efficiency

The records and the samples files' reader and writer are nsa_eval/records.py's; this module owns the folder's life:
its checks, lock, start or resume, and the writes.

While a run writes the folder it holds `.lock` (an flock released when the run command ends, and by the OS when the
process ends, kill -9 included; the file holds the writer's process id), so a second run into the folder is refused
naming that process.

run.json also holds `settings`: the command-line settings the run was asked with (outside the config hash), so a
rerun is checked against the run before any model loads (`RunStore.plan`) and a mismatch names the settings that
differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from nsa_eval.records import (RunInfo, SampleRecord, append_sample, finite, read_samples, samples_file, shard_files,
                              write_samples)

LOCK_NAME = ".lock"  # the run folder's lock file (RunStore.lock)


def prompts_digest(prompt_hashes: list[str]) -> str:
    """One hash over a task's sample prompt hashes (order-free): two runs with equal digests saw equal prompts."""
    return hashlib.sha256("\n".join(sorted(prompt_hashes)).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("nsa-eval", "torch", "triton", "transformers", "tokenizers", "lm-eval"):
        try:
            out[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package.replace("-", "_")] = "not installed"
    return out


def git_sha() -> str:
    """The project's commit, with '-dirty' when the work tree has changes; 'unknown' outside a checkout.
    $NSA_EVAL_GIT_SHA overrides it, for a copy of the tree whose .git is absent or stale (e.g. a remote GPU box)."""
    if os.environ.get("NSA_EVAL_GIT_SHA"):
        return os.environ["NSA_EVAL_GIT_SHA"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict[str, Any]:
    """The machine a run's timings come from: platform, CPU count, architecture and model (`cpu`, where the OS names
    it), and the GPU's name and count where CUDA sees one (the report compares timings only on the same card)."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    cpu = cpu_model()
    if cpu:
        info["cpu"] = cpu
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        pass
    return info


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo's first 'model name'; elsewhere platform.processor()), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _shown(value: Any) -> str:
    if value is None:
        return "not given"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def settings_diff(here: dict[str, Any], there: dict[str, Any]) -> list[str]:
    """'--limit: 1 here, 3 in the run' for each setting that differs between two runs' command-line settings."""
    keys = list(dict.fromkeys([*here, *there]))
    return [f"{key}: {_shown(here.get(key))} here, {_shown(there.get(key))} in the run"
            for key in keys if here.get(key) != there.get(key)]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_diff(here: dict[str, Any], there: dict[str, Any]) -> list[str]:
    """The resolved configurations' differences (what the config hash covers), e.g. 'tasks.niah.prompts_digest: a
    here, b in the run', for runs made before `settings` were recorded or whose data changed since."""
    flat_here, flat_there = _flatten(here), _flatten(there)
    tasks_here, tasks_there = set(here.get("tasks", {})), set(there.get("tasks", {}))
    lines = []
    if tasks_here != tasks_there:
        lines.append(f"tasks: {','.join(sorted(tasks_here))} here, {','.join(sorted(tasks_there))} in the run")
    keys = list(dict.fromkeys([*flat_here, *flat_there]))
    for key in sorted(keys, key=lambda k: k.startswith("tasks.")):  # run-wide settings first
        task = key.split(".")[1] if key.startswith("tasks.") else None
        if task is not None and (task not in tasks_here or task not in tasks_there):
            continue
        if flat_here.get(key) != flat_there.get(key):
            lines.append(f"{key}: {_shown(flat_here.get(key))} here, {_shown(flat_there.get(key))} in the run")
    return lines


@dataclass
class Plan:
    """What a run directory holds before the model loads: `new` (nothing, or --overwrite), `resume` (done of total
    samples answered) or `complete` (metrics written with the same settings)."""

    state: str
    done: int = 0
    total: int = 0


class RunStore:
    """One run directory. `open()` creates it, or checks a resumed one holds the same configuration."""

    def __init__(self, root: str | Path, settings: dict[str, Any] | None = None, overwrite: bool = False):
        self.root = Path(root)
        self.settings = settings  # the command line's settings, stored in run.json by open()
        self.overwrite = overwrite  # open() replaces a run already there
        self._lock: Any = None  # the open lock file while this process holds the folder

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def samples_path(self, task: str) -> Path:
        return samples_file(self.root, task)

    def _existing(self) -> RunInfo | None:
        """run.json's record; None when there is none; ValueError when it is corrupt (unless overwriting)."""
        if not self.run_json.is_file():
            return None
        try:
            return RunInfo.from_json(json.loads(self.run_json.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):  # JSONDecodeError included; not a run's record
            if self.overwrite:
                return None
            raise ValueError(f"{self.run_json} is corrupt; pass --overwrite to start the run over, or choose another "
                             "--output") from None

    def _check_folder(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--output {self.root} is a file; give a directory for the run")
        if self.root.is_dir() and not self.run_json.is_file() and any(p.name != LOCK_NAME for p in self.root.iterdir()):
            raise ValueError(f"--output {self.root} is not empty and holds no run.json; choose an empty or new folder "
                             "(--overwrite replaces only a run folder)")

    def check(self) -> RunInfo | None:
        """The checks `plan` makes before it takes the folder, without creating or locking anything (a budget sweep
        checks every point before the first loads a model): a file, a foreign folder, a corrupt run.json or a run
        asked with other settings is a ValueError naming what differs. Returns run.json's record (None: no run)."""
        self._check_folder()
        existing = self._existing()
        stored = existing.settings if existing is not None else None
        if stored is not None and self.settings is not None and stored != self.settings and not self.overwrite:
            raise ValueError(f"--output {self.root} holds a run with other settings ("
                             + "; ".join(settings_diff(self.settings, stored))
                             + "); choose another --output, or pass --overwrite to start it over")
        return existing

    def plan(self) -> Plan:
        """Check the folder against this store's settings before any model loads: a file, a foreign folder, a corrupt
        run.json or a run asked with other settings is a ValueError naming what differs."""
        existing = self.check()
        self.lock()  # held from here to the process's end; nothing was written if a check above failed
        if existing is None or self.overwrite:
            return Plan("new")
        done, total = self.counts(existing)
        if existing.settings is not None and existing.finished and (self.root / "metrics.json").is_file():
            return Plan("complete", done, total)
        if not self.has_samples() and not (self.root / "metrics.json").exists():
            self.overwrite = True  # a run that stopped before its first sample holds nothing to keep: start it anew
            return Plan("new")
        return Plan("resume", done, total)

    def lock(self) -> None:
        """Hold the run folder (created if need be) for this process until it ends: an flock on `.lock`, which the
        OS releases with the process (kill -9 too, so a stale file never blocks). Another process holding it is a
        ValueError naming that process."""
        import fcntl

        if self._lock is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / LOCK_NAME).open("a+", encoding="utf-8")
        except OSError as error:  # read-only, under a file, /proc: before any model loads
            raise ValueError(f"--output {self.root}: cannot write a run folder there ({error.strerror or error}); "
                             "choose another --output") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its id just after it takes the lock
                handle.seek(0)
                holder = handle.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            handle.close()
            raise ValueError(f"--output {self.root} is being written by another run (process {holder or 'unknown'}); "
                             "wait for it to end, or choose another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        """Release the folder's lock (a run that ends in this process, well or not, so a later run in the same
        process can take it: the OS releases it only when the process ends)."""
        import fcntl

        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def counts(self, info: RunInfo | None = None) -> tuple[int, int]:
        """(samples answered, samples planned) over the run's tasks, read without changing any file."""
        info = info if info is not None else self._existing()
        done = total = 0
        for task, entry in (info.key.tasks if info is not None else {}).items():
            n = int(entry.get("n", 0)) if isinstance(entry, dict) else 0
            ids = {record.id for path in [samples_file(self.root, task), *shard_files(self.root, task)]
                   for record in read_samples(path)}  # the merged file and any shards, also for a sharded store
            done, total = done + min(len(ids), n), total + n
        return done, total

    def open(self, run_info: RunInfo) -> None:
        """Start the run, or resume it when run.json holds the same config hash; refuse a different run, naming
        the settings that differ. With `overwrite`, a run already there is removed first."""
        self._check_folder()
        self.lock()
        if self.overwrite:
            self.clear()
        existing = self._existing()
        if self.settings is not None:
            run_info = run_info.updated(settings=self.settings)
        if existing is not None:
            if existing.config_hash != run_info.config_hash:
                differences = (settings_diff(self.settings, existing.settings)
                               if self.settings is not None and existing.settings is not None else [])
                differences = differences or config_diff(run_info.key.to_json(), existing.key.to_json())
                raise ValueError(
                    f"--output {self.root} holds a different run ({'; '.join(differences) or 'config ' + existing.config_hash}); "
                    "choose another --output, or pass --overwrite to start it over"
                )
            run_info = existing.updated(resumed=(existing.resumed or 0) + 1, argv=run_info.argv)
            if self.settings is not None:
                run_info = run_info.updated(settings=self.settings)
        (self.root / "samples").mkdir(parents=True, exist_ok=True)
        self.write_json("run.json", run_info.to_json())

    def clear(self) -> None:
        """Remove what a run writes here (run.json, samples/, metrics.json); other files are left alone."""
        for name in ("run.json", "run.json.tmp", "metrics.json", "metrics.json.tmp"):
            (self.root / name).unlink(missing_ok=True)
        if (self.root / "samples").is_dir():
            shutil.rmtree(self.root / "samples")

    def has_samples(self) -> bool:
        """Whether any sample record has been written (in samples/ or its shards)."""
        folder = self.root / "samples"
        return folder.is_dir() and any(p.stat().st_size > 0 for p in folder.rglob("*.jsonl"))

    def discard_unstarted(self, keep_from: Path) -> None:
        """After a run that stopped before its first sample: remove what open() wrote, then the folders made for the
        run up to (not including) `keep_from`, the nearest folder that existed before. Never removes other files, and
        nothing unless this process holds the folder (a run refused by another's lock leaves that run alone)."""
        if self._lock is None or self.has_samples():  # not held: another run's folder, never ours to clear
            return
        self.clear()
        (self.root / LOCK_NAME).unlink(missing_ok=True)  # this process's lock file goes with the folder it made
        folder = self.root
        keep = keep_from.resolve()
        while folder.is_dir() and folder.resolve() != keep and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent

    def finished_ids(self, task: str) -> set[str]:
        """Ids already in samples/<task>.jsonl. A torn last line (a crash mid-write) is cut off."""
        return {record.id for record in read_samples(self.samples_path(task), cut=True)}

    def owns(self, index: int) -> bool:
        """Whether this process answers a task's sample number `index`: always, except in a data-parallel run
        (nsa_eval/distributed.py)."""
        return True

    def gather(self, order: dict[str, list[str]]) -> bool:
        """Bring the samples of every process together (a data-parallel run merges its shards) and put each task's
        file in task order (the engine stores samples as they finish); returns whether this process writes
        metrics.json. order: task -> sample ids in task order."""
        for task, ids in order.items():
            records = self.records(task)
            if [r.id for r in records] != [i for i in ids if i in {r.id for r in records}]:
                write_samples(self.samples_path(task), records, ids)
        return True

    def append(self, task: str, record: SampleRecord) -> None:
        append_sample(self.samples_path(task), record)

    def records(self, task: str) -> list[SampleRecord]:
        """The task's records (a line that is not one is a ValueError naming it: finished_ids cut a torn one)."""
        return read_samples(self.samples_path(task), strict=True)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Atomic write (temp file + rename), so a crash never leaves half a file. Strict JSON: a NaN or infinity
        (a metric of one sample) is written as null; the task says why beside it (e.g. `stderr_reason`)."""
        target = self.root / name
        temp = target.with_suffix(target.suffix + ".tmp")
        temp.write_text(json.dumps(finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        temp.replace(target)

    def update_run(self, **fields: Any) -> None:
        """Set run.json's fields (RunInfo's: world_size, compile_s, finished), each in its place or last if new."""
        info = RunInfo.from_json(json.loads(self.run_json.read_text(encoding="utf-8")))
        self.write_json("run.json", info.updated(**fields).to_json())


def nearest_existing(path: Path) -> Path:
    """The path itself when it exists, else its nearest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

