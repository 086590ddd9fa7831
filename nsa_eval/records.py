"""A run folder's records, typed, and the one reader and writer of its samples files.

  run.json                                 RunInfo: the hashed part (RunKey) and what the run recorded beside it
  metrics.json                             {"model", "spec", "tasks": {task: TaskMetrics}}
  samples/<task>.jsonl                     one SampleRecord a line (the task's name as a file name: task_file_stem)
  samples/shards/<task>.rank<R>.jsonl      a data-parallel process's records until rank 0 merges them

Every record's `to_json` is the JSON the run writes, key for key and in its order (optional keys absent, not null),
and `from_json` keeps what it reads, so a folder written before these types reads, and is rewritten, byte for byte.
Imports nothing of ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT_EXCERPT_CHARS = 400


@dataclass(frozen=True)
class SampleRecord:
    """One answered sample: a line of samples/<task>.jsonl."""

    id: str
    breakdown: dict[str, Any]  # the sample's cell, e.g. {"length": 2048, "depth": 50}
    prompt_hash: str  # tasks.base.prompt_hash of the whole prompt
    prompt_excerpt: str  # its start and end (prompt_excerpt)
    target: Any
    answer: dict[str, Any]  # what the answer added, in order (runner.generation_fields, loglikelihoods, rolling)
    scores: dict[str, float]  # metric -> the sample's score
    details: Any = None  # the task's own record of the sample; the key is absent when None

    FIXED = ("id", "breakdown", "prompt_hash", "prompt_excerpt", "target", "scores", "details")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "breakdown": self.breakdown, "prompt_hash": self.prompt_hash,
                "prompt_excerpt": self.prompt_excerpt, "target": self.target, **self.answer, "scores": self.scores,
                **({"details": self.details} if self.details is not None else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleRecord:
        """KeyError naming a missing field; TypeError when `data` is not an object."""
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return cls(id=data["id"], breakdown=data["breakdown"], prompt_hash=data["prompt_hash"],
                   prompt_excerpt=data["prompt_excerpt"], target=data["target"],
                   answer={k: v for k, v in data.items() if k not in cls.FIXED}, scores=data["scores"],
                   details=data.get("details"))


@dataclass(frozen=True)
class RunKey:
    """run.json's hashed part, what decides a run's results; `hash` is run.json's config_hash. Left out: batch size and
    prefill slices (they change results by float rounding only), which GPU, the engine, versions, timings."""

    model: dict[str, Any]  # {"spec", "name", "max_length", "chat"}
    tasks: dict[str, dict[str, Any]]  # task -> {"version", "config", "prompts_digest", "n"}
    seed: int
    limit: int | None
    device: str  # the device type ("cpu", "cuda")
    dtype: str
    max_new_tokens: int | None = None  # absent when None, so hashes from before the flag hold
    sparse: dict[str, Any] | None = None  # SparseSettings.record(), beside "attention": "sparse"; absent when None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": self.tasks, "seed": self.seed, "limit": self.limit,
                **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}),
                "device": self.device, "dtype": self.dtype,
                **({"attention": "sparse", "sparse": self.sparse} if self.sparse is not None else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunKey:
        """The hashed part of a run.json (runs that predate a setting have None)."""
        return cls(model=data["model"], tasks=data["tasks"], seed=data.get("seed"), limit=data.get("limit"),
                   device=data.get("device"), dtype=data.get("dtype"), max_new_tokens=data.get("max_new_tokens"),
                   sparse=data.get("sparse"))

    @property
    def hash(self) -> str:
        """16 hex digits of sha256 over the JSON with sorted keys."""
        text = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


KEY_FIELDS = ("model", "tasks", "seed", "limit", "max_new_tokens", "device", "dtype", "attention", "sparse")
LATER = ("settings", "world_size", "compile_s", "finished", "resumed")  # run.json's keys set after the start, if ever


@dataclass(frozen=True)
class RunInfo:
    """run.json. The runner records the run (run_id to argv), the store adds the command line's settings and, on a
    resume, `resumed`; `updated` adds the rest as they become known (world_size, compile_s, finished)."""

    run_id: str  # the folder's name
    created: str  # ISO 8601, UTC, seconds
    key: RunKey  # written flat, between created and config_hash
    config_hash: str  # key.hash when the run started
    batch_size: int | None = None
    prefill_chunk: int | None = None  # prompt tokens per prefill pass; null: one pass
    engine: str | None = None  # the backend's class: Engine (native runtime), HFModel (transformers), ...
    model_attention: str | None = None  # the checkpoint's own attention (e.g. "nsa"), whatever --attention asked
    budgets_used: dict[str, int] | None = None  # generative task -> its largest generation budget after the cap
    versions: dict[str, str] | None = None
    git_sha: str | None = None
    hardware: dict[str, Any] | None = None
    argv: list[str] | None = None
    settings: dict[str, Any] | None = None  # RunConfig.settings(), checked before a rerun's model loads
    world_size: int | None = None  # processes of a data-parallel run
    compile_s: float | None = None  # warm-up seconds (kernel compiles, graph captures)
    finished: str | None = None  # when metrics.json was written
    resumed: int | None = None  # how many times the run was resumed
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as read
    keys: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the file's key order (): as written new

    def to_json(self) -> dict[str, Any]:
        values = {"run_id": self.run_id, "created": self.created, **self.key.to_json(),
                  "config_hash": self.config_hash,
                  **{name: getattr(self, name) for name in TAIL if name not in LATER},
                  **{name: getattr(self, name) for name in LATER if getattr(self, name) is not None}, **self.extra}
        if not self.keys:
            return values
        return {**{k: values[k] for k in self.keys if k in values},
                **{k: v for k, v in values.items() if k not in self.keys and v is not None}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunInfo:
        """KeyError naming a missing field (run_id, created, config_hash, model, tasks); TypeError for a non-object."""
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        known = {"run_id", "created", "config_hash", *KEY_FIELDS, *TAIL}
        return cls(run_id=data["run_id"], created=data["created"], key=RunKey.from_json(data),
                   config_hash=data["config_hash"], **{name: data.get(name) for name in TAIL},
                   extra={k: v for k, v in data.items() if k not in known}, keys=tuple(data))

    def updated(self, **fields: Any) -> RunInfo:
        """These fields set, as dict.update sets keys: one already in the file keeps its place, a new one goes last."""
        order = tuple(self.to_json())
        return dataclasses.replace(self, **fields, keys=order + tuple(k for k in fields if k not in order))


TAIL = tuple(f.name for f in dataclasses.fields(RunInfo)
             if f.name not in ("run_id", "created", "key", "config_hash", "extra", "keys"))  # batch_size ... resumed


@dataclass(frozen=True)
class TaskMetrics:
    """One task in metrics.json."""

    version: str
    headline: str  # the metric tables lead with
    aggregate: dict[str, Any]  # Task.aggregate in its order: n, metrics {name: {"mean", "stderr"}}, breakdowns, ...
    efficiency: dict[str, float]  # runner.efficiency: means over the generative samples (ms, tokens/s, bytes)

    @property
    def n(self) -> int:
        return self.aggregate["n"]

    @property
    def metrics(self) -> dict[str, dict[str, float | None]]:
        return self.aggregate["metrics"]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "headline": self.headline, **self.aggregate, "efficiency": self.efficiency}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskMetrics:
        rest = {k: v for k, v in data.items() if k not in ("version", "headline", "efficiency")}
        return cls(version=data["version"], headline=data["headline"], aggregate=rest, efficiency=data["efficiency"])


def prompt_excerpt(prompt: Any) -> str:
    """The start and end of a prompt (chat messages flattened), at most PROMPT_EXCERPT_CHARS plus the cut mark."""
    text = prompt if isinstance(prompt, str) else "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)
    half = PROMPT_EXCERPT_CHARS // 2
    return text if len(text) <= PROMPT_EXCERPT_CHARS else f"{text[:half]} [...] {text[-half:]}"


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def task_file_stem(task: str) -> str:
    """A task's name as a file name: `lm-eval:gsm8k` -> `lm-eval_gsm8k` (no ':' in paths, which Windows and some
    tools refuse)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", task)


def samples_file(root: Path, task: str) -> Path:
    """A run folder's samples/<task>.jsonl (the task's own name in runs written before task_file_stem)."""
    legacy = Path(root) / "samples" / f"{task}.jsonl"
    if legacy.name != f"{task_file_stem(task)}.jsonl" and legacy.is_file():
        return legacy
    return Path(root) / "samples" / f"{task_file_stem(task)}.jsonl"


def shard_file(root: Path, task: str, rank: int) -> Path:
    return Path(root) / "samples" / "shards" / f"{task_file_stem(task)}.rank{rank}.jsonl"


def shard_files(root: Path, task: str) -> list[Path]:
    """The shards of a task that a data-parallel run holds, by name."""
    return sorted((Path(root) / "samples" / "shards").glob(f"{task_file_stem(task)}.rank*.jsonl"))


def read_samples(path: Path, *, strict: bool = False, cut: bool = False) -> list[SampleRecord]:
    """The records of a samples file (none when it is absent); blank lines are skipped. At the first line that is not a
    whole record (a crash mid-write tears the last one): strict, a ValueError naming the file and line; else reading
    stops there, and with `cut` the file is cut back to the records before it (the run's own file, before it appends)."""
    records: list[SampleRecord] = []
    whole = 0  # bytes up to the end of the last whole record
    if not path.is_file():
        return records
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    data = json.loads(line)
                except ValueError as error:  # bad JSON or bytes that are not UTF-8
                    if strict:
                        raise ValueError(f"{path} line {number} is corrupt ({error}); rerun `nsa-eval run` to "
                                         "rewrite it") from None
                    break
                try:
                    records.append(SampleRecord.from_json(data))
                except (KeyError, TypeError) as error:
                    if strict:
                        what = f"no {error}" if isinstance(error, KeyError) else str(error)
                        raise ValueError(f"{path} line {number} is not a sample record ({what})") from None
                    break
            whole += len(line)
    if cut and whole < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(whole)
    return records


def _line(record: SampleRecord) -> str:
    return json.dumps(finite(record.to_json()), ensure_ascii=False, allow_nan=False) + "\n"


def append_sample(path: Path, record: SampleRecord) -> None:
    """Append one record and flush it to the disk, so a crash loses at most the sample in flight."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(_line(record))
        handle.flush()
        os.fsync(handle.fileno())


def write_samples(path: Path, records: list[SampleRecord], ids: list[str]) -> None:
    """Replace a samples file by `records` sorted by their id's place in `ids` (unknown ids last), atomically."""
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    temp = path.with_suffix(".jsonl.tmp")
    with temp.open("w", encoding="utf-8") as handle:
        handle.writelines(_line(r) for r in sorted(records, key=lambda r: position.get(r.id, len(position))))
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)
