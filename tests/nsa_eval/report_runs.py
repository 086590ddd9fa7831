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


def write_bench(directory: Path, card: str = "nvidia-h100", lengths=(8192, 16384, 32768, 65536)) -> Path:
    """A kernels-<card>.json as `nsa-eval bench kernels` writes it (nsa_eval/bench/kernels.py): rows of op, impl, T,
    median ms and "vs <baseline>" ratios (baseline ms / row ms), one failed row, the correctness checks."""
    cost = {("prefill fwd", "ours full"): 1.0, ("prefill fwd", "sdpa flash"): 1.1,
            ("prefill fwd+bwd", "ours full"): 3.4, ("prefill fwd+bwd", "sdpa flash"): 3.0,
            ("decode b=1", "ours full"): 0.9, ("decode b=1", "sdpa"): 1.5}
    rows = []
    for (op, impl), scale in cost.items():
        for T in lengths:
            rows.append({"op": op, "impl": impl, "T": T, "ms": scale * (T / 8192) ** (1 if "decode" in op else 2)})
    for row in rows:
        for base in ("sdpa flash", "sdpa"):
            same = [r for r in rows if (r["op"], r["impl"], r["T"]) == (row["op"], base, row["T"])]
            if same and row["impl"] != base:
                row[f"vs {base}"] = same[0]["ms"] / row["ms"]
    rows.append({"op": "prefill fwd", "impl": "sdpa cudnn", "T": 65536, "error": "OutOfMemoryError: CUDA out of memory"})
    payload = {"device": "NVIDIA H100 80GB HBM3", "card": card, "torch": "2.13.0", "triton": "3.9",
               "checks": [{"name": "full attention vs reference", "error": 2e-3, "bound": 1e-2, "ok": True}],
               "rows": rows, "tile_sweep": []}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"kernels-{card}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def longbench(quality: float, *, subsets=("hotpotqa", "qasper", "lcc"), per_cell: int = 3, seed: int = 0) -> TaskData:
    """LongBench-like records: a 0..1 score per sample, broken down by subset and length bucket."""
    rng = random.Random(seed)
    records = []
    for subset in subsets:
        for bucket in ("0-4k", "4-8k", "8k+"):
            for k in range(per_cell):
                score = min(1.0, max(0.0, rng.gauss(quality, 0.2)))
                records.append(record(f"{subset}/{bucket}/{k}", f"{subset} document {bucket} {k}", {"answers": ["x"]},
                                      "an answer", {"score": score}, {"subset": subset, "length": bucket}, rng))
    return TaskData(records, "score", ("subset", "length"), config={"subsets": list(subsets)})
