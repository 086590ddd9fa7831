"""Synthetic run directories for the report tests, in the run store's format (DESIGN.md, nsa_eval/store.py).

Metrics are computed from the sample records by the project's own aggregation (tasks.base.aggregate_scores)
and prompts digests by the run store's function, so a synthetic run holds what `nsa-eval run` would write.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nsa_eval.store import prompts_digest
from nsa_eval.tasks.base import aggregate_scores, prompt_hash


@dataclass
class TaskData:
    records: list[dict[str, Any]]
    headline: str
    breakdown_keys: tuple[str, ...] = ()
    version: str = "1"
    config: dict[str, Any] = field(default_factory=dict)


def record(sample_id: str, prompt: str, target: Any, response: str, scores: dict[str, float],
           breakdown: dict[str, Any] | None = None, rng: random.Random | None = None) -> dict[str, Any]:
    rng = rng or random.Random(0)
    return {
        "id": sample_id, "breakdown": breakdown or {}, "prompt_hash": prompt_hash(prompt), "prompt_excerpt": prompt[:400],
        "target": target, "responses": [response], "scores": scores, "prompt_tokens": len(prompt.split()),
        "truncated": False, "prefill_ms": round(rng.uniform(5, 50), 3),
        "decode_tokens_per_s": round(rng.uniform(20, 40), 3), "new_tokens": [len(response.split())],
        "finish_reasons": ["stop"],
    }


def niah(p_correct: Callable[[int, int], float], *, lengths=(1024, 2048, 4096), depths=(0, 25, 50, 75, 100),
         per_cell: int = 4, seed: int = 0, response: Callable[[str, bool], str] | None = None) -> TaskData:
    """NIAH records: sample (length, depth, k) is right with probability p_correct(length, depth)."""
    rng = random.Random(seed)
    records = []
    for length in lengths:
        for depth in depths:
            for k in range(per_cell):
                value = f"{7000 + 37 * length + 11 * depth + k}"  # the same needle in every model's run
                right = rng.random() < p_correct(length, depth)
                text = response(value, right) if response else (f"The magic number is {value}." if right else "I don't know.")
                prompt = f"haystack {length} {depth} {k} ... The magic number is {value} ... What is the magic number?"
                records.append(record(f"niah-{length}-{depth}-{k}", prompt, value, text,
                                      {"accuracy": float(right)}, {"length": length, "depth": depth}, rng))
    return TaskData(records, "accuracy", ("length", "depth"), config={"lengths": list(lengths), "depths": list(depths)})


def choice_task(p_correct: float, *, n: int = 60, subjects=("algebra", "physics"), seed: int = 0,
                shots: int | None = 5) -> TaskData:
    """Multiple-choice style records (MMLU-like): accuracy per sample, broken down by subject."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        right = rng.random() < p_correct
        records.append(record(f"q{i}", f"Question {i} on {subject}? A) 1 B) 2", "B", "B" if right else "A",
                              {"acc": float(right)}, {"subject": subject}, rng))
    config = {"num_fewshot": shots} if shots is not None else {}
    return TaskData(records, "acc", ("subject",), config=config)


def write_run(root: Path, run_id: str, model_name: str, tasks: dict[str, TaskData], *,
              planned_only: tuple[str, ...] = ()) -> Path:
    """A run directory under root; tasks in planned_only are listed in run.json but absent from metrics.json."""
    path = root / run_id
    (path / "samples").mkdir(parents=True)
    task_info = {
        name: {"version": data.version, "config": data.config,
               "prompts_digest": prompts_digest([r["prompt_hash"] for r in data.records]), "n": len(data.records)}
        for name, data in tasks.items()
    }
    task_info.update({name: {"version": "1", "config": {}, "prompts_digest": "0" * 16, "n": 10} for name in planned_only})
    run = {
        "run_id": run_id, "created": "2025-03-01T12:00:00+00:00",
        "model": {"spec": f"hf:/models/{model_name}", "name": model_name, "max_length": 8192, "chat": True},
        "tasks": task_info, "seed": 0, "config_hash": "abc123",
        "versions": {"nsa_eval": "0.1.0", "python": "3.11", "torch": "2.13.0", "triton": "3.9", "transformers": "5.0"},
        "git_sha": "0123456789abcdef", "hardware": {"platform": "Linux", "cpu_count": 2}, "argv": ["nsa-eval", "run"],
    }
    (path / "run.json").write_text(json.dumps(run, indent=2))
    metrics = {"model": model_name, "tasks": {}}
    for name, data in tasks.items():
        with (path / "samples" / f"{name}.jsonl").open("w") as handle:
            for r in data.records:
                handle.write(json.dumps(r) + "\n")
        generated = data.records
        metrics["tasks"][name] = {
            "version": data.version, "headline": data.headline,
            **aggregate_scores(data.records, data.breakdown_keys),
            "efficiency": {
                "prefill_ms_mean": sum(r["prefill_ms"] for r in generated) / len(generated),
                "decode_tokens_per_s_mean": sum(r["decode_tokens_per_s"] for r in generated) / len(generated),
                "prompt_tokens_mean": sum(r["prompt_tokens"] for r in generated) / len(generated),
            },
        }
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return path
