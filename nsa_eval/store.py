"""The run directory, written as the run goes so that a crash loses at most the sample in flight.

results/runs/<run-id>/
  run.json               model spec, resolved config and its hash, seeds, versions, git sha, hardware, tasks
  samples/<task>.jsonl   one JSON object a line, appended and flushed as each sample finishes
  metrics.json           per task: headline metric with standard error, breakdowns, n, efficiency
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PROMPT_EXCERPT_CHARS = 400


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


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
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        pass
    return info


def write_in_order(path: Path, records: list[dict[str, Any]], ids: list[str]) -> None:
    """Replace a samples file by `records` sorted by their id's place in `ids` (unknown ids last), atomically."""
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    lines = [json.dumps(r, ensure_ascii=False) + "\n"
             for r in sorted(records, key=lambda r: position.get(r["id"], len(position)))]
    temp = path.with_suffix(".jsonl.tmp")
    with temp.open("w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """One run directory. `open()` creates it, or checks a resumed one holds the same configuration."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def samples_path(self, task: str) -> Path:
        return self.root / "samples" / f"{task}.jsonl"

    def open(self, run_info: dict[str, Any]) -> None:
        """Start the run, or resume it when run.json holds the same config hash; refuse a different run."""
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--output {self.root} is a file; give a directory for the run")
        if self.run_json.is_file():
            try:
                existing = json.loads(self.run_json.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{self.run_json} is corrupt; move it away or choose another --output") from None
            if existing.get("config_hash") != run_info["config_hash"]:
                raise ValueError(
                    f"--output {self.root} holds a different run (model {existing.get('model', {}).get('spec')}, "
                    f"tasks {', '.join(existing.get('tasks', {}))}, config {existing.get('config_hash')}); "
                    "choose another --output or delete that folder"
                )
            run_info = {**existing, "resumed": existing.get("resumed", 0) + 1, "argv": run_info.get("argv")}
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise ValueError(f"--output {self.root} is not empty and holds no run.json; choose an empty or new folder")
        (self.root / "samples").mkdir(parents=True, exist_ok=True)
        self.write_json("run.json", run_info)

    def finished_ids(self, task: str) -> set[str]:
        """Ids already in samples/<task>.jsonl. A torn last line (a crash mid-write) is cut off."""
        path = self.samples_path(task)
        if not path.is_file():
            return set()
        ids, good_bytes = set(), 0
        with path.open("rb") as handle:
            for line in handle:
                try:
                    ids.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                    break
                good_bytes += len(line)
        if good_bytes < path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return ids

    def owns(self, index: int) -> bool:
        """Whether this process answers a task's sample number `index`: always, except in a data-parallel run
        (nsa_eval/distributed.py)."""
        return True

    def gather(self, order: dict[str, list[str]]) -> bool:
        """Bring the samples of every process together (a data-parallel run merges its shards) and put each task's
        file in task order (the engine stores samples as they finish); returns whether this process writes
        metrics.json. order: task -> sample ids in task order."""
        for task, ids in order.items():
            records = list(self.records(task))
            if [r["id"] for r in records] != [i for i in ids if i in {r["id"] for r in records}]:
                write_in_order(self.samples_path(task), records, ids)
        return True

    def append(self, task: str, record: dict[str, Any]) -> None:
        with self.samples_path(task).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self, task: str) -> Iterator[dict[str, Any]]:
        path = self.samples_path(task)
        if path.is_file():
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Atomic write (temp file + rename), so a crash never leaves half a file."""
        target = self.root / name
        temp = target.with_suffix(target.suffix + ".tmp")
        temp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        temp.replace(target)

    def update_run(self, **fields: Any) -> None:
        data = json.loads(self.run_json.read_text())
        data.update(fields)
        self.write_json("run.json", data)


def prompt_excerpt(prompt: Any) -> str:
    """The start and end of a prompt (chat messages flattened), for reports' drill-down."""
    text = prompt if isinstance(prompt, str) else "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)
    half = PROMPT_EXCERPT_CHARS // 2
    return text if len(text) <= PROMPT_EXCERPT_CHARS else f"{text[:half]} [...] {text[-half:]}"

