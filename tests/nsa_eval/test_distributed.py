"""Data parallel runs: `torchrun --nproc-per-node 2 -m nsa_eval run ...` on CPUs (gloo) gives the metrics and the
samples a one-process run gives, and resumes a run that stopped with its samples spread over shards."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from interop_helpers import write_lm_eval_tasks

from nsa_eval.cli import main
from nsa_eval.records import task_file_stem

pytest.importorskip("lm_eval")
TASKS = ["lm-eval:toy_mc", "lm-eval:toy_gen"]


def run_args(model_dir, task_dir, out):
    return ["run", "--model", f"hf:{model_dir}", "--tasks", ",".join(TASKS), "--include-path", str(task_dir),
            "--output", str(out), "--device", "cpu", "--quiet", "--seed", "11"]


def torchrun(args, processes=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "nsa_eval",
         *args], capture_output=True, text=True, timeout=300, env={**env, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def samples(out, task):
    return [json.loads(line) for line in (out / "samples" / f"{task_file_stem(task)}.jsonl").read_text().splitlines()]


def scores_only(metrics):
    return {name: {k: v for k, v in task.items() if k != "efficiency"} for name, task in metrics["tasks"].items()}


def answers(record):
    return {k: record.get(k) for k in ("id", "prompt_hash", "responses", "loglikelihoods", "scores", "details")}


@pytest.fixture(scope="module")
def one_process_run(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    task_dir = write_lm_eval_tasks(root / "tasks")
    out = root / "one"
    result = CliRunner().invoke(main, run_args(tiny_llama_dir, task_dir, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return task_dir, out


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(tiny_llama_dir, one_process_run, tmp_path):
    task_dir, one = one_process_run
    two = tmp_path / "two"
    result = torchrun(run_args(tiny_llama_dir, task_dir, two))
    assert result.stdout.count("run directory:") == 1  # rank 0 reports; the other process stays quiet
    assert scores_only(json.loads((two / "metrics.json").read_text())) == scores_only(json.loads((one / "metrics.json").read_text()))
    for task in TASKS:
        assert [answers(r) for r in samples(two, task)] == [answers(r) for r in samples(one, task)]  # merged in order
    assert not (two / "samples" / "shards").exists()
    run_info = json.loads((two / "run.json").read_text())
    assert run_info["world_size"] == 2
    assert run_info["config_hash"] == json.loads((one / "run.json").read_text())["config_hash"]


@pytest.mark.slow
def test_a_run_stopped_with_shards_resumes_with_two_processes(tiny_llama_dir, one_process_run, tmp_path):
    """As a killed two-process run leaves it: a merged file from an earlier pass, one shard per process (one with
    a torn last line); only the samples in none of them are asked again."""
    task_dir, one = one_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed)
    (resumed / "metrics.json").unlink()
    records = samples(one, "lm-eval:toy_gen")
    kept = [{**r, "kept": True} for r in records]  # a mark a recomputed record would not carry
    line = lambda r: json.dumps(r) + "\n"  # noqa: E731
    (resumed / "samples" / "lm-eval_toy_gen.jsonl").write_text(line(kept[0]) + line(kept[1]))
    shards = resumed / "samples" / "shards"
    shards.mkdir()
    (shards / "lm-eval_toy_gen.rank0.jsonl").write_text(line(kept[2]) + line(kept[4]) + '{"id": "6", "respo')
    (shards / "lm-eval_toy_gen.rank1.jsonl").write_text(line(kept[5]))
    torchrun(run_args(tiny_llama_dir, task_dir, resumed))
    final = samples(resumed, "lm-eval:toy_gen")
    assert [r["id"] for r in final] == [str(i) for i in range(8)]
    assert [bool(r.get("kept")) for r in final] == [True, True, True, False, True, True, False, False]
    assert [answers(r) for r in final] == [answers(r) for r in records]
    assert scores_only(json.loads((resumed / "metrics.json").read_text())) == scores_only(json.loads((one / "metrics.json").read_text()))
    assert not shards.exists()
