"""`nsa-eval bench suite` on the CPU, through the CLI as a user runs it: tiny random models of both shapes, every task
at a tiny scale, each row's numbers, the lm-eval HF comparison on the same requests (or its one skip line when lm_eval
does not import), the one-slot rows, and bad input in one line."""

import json
import sys

import pytest
from click.testing import CliRunner

from nsa_eval.bench.suite import LM_EVAL_TASKS, TASKS, plan_tasks
from nsa_eval.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["bench", "suite", "--shapes", "tiny", "--device", "cpu", "--scale", "0.01", "--batch", "4",
        "--niah-lengths", "256", "--ruler-lengths", "1k", "--max-new-tokens", "8",
        "--task-option", "mmlu.subjects=abstract_algebra", "--task-option", "mmlu.num_fewshot=0"]


def suite(args, tmp_path, shared_data, smollm2_dir):
    result = CliRunner().invoke(main, [*TINY, *args, "--data-dir", str(shared_data), "--tokenizer", str(smollm2_dir),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((tmp_path / "suite-cpu.json").read_text()), (tmp_path / "suite-cpu.md").read_text()


@pytest.mark.slow
def test_the_suite_times_every_task_on_both_models_and_beside_lm_eval(tmp_path, shared_data, smollm2_dir):
    output, results, report = suite(["--task-option", "ruler.tasks=niah_single_1,vt"], tmp_path, shared_data,
                                    smollm2_dir)
    ours = {(r["model"], r["task"]): r for r in results["rows"] if r["engine"] == "nsa-eval"}
    labels = [*TASKS, "mmlu@1", "gsm8k@1"]
    assert set(ours) == {(model, task) for model in ("llama-full", "nsa") for task in labels}
    for (model, task), row in ours.items():
        assert row["samples"] >= 1 and row["wall_s"] > 0 and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
        assert row["prompt_tokens"] > 0, (model, task)
        assert row["batch"] == (1 if task.endswith("@1") else 4)
        if not task.startswith("mmlu"):  # EOS off: every random answer runs to its budget (8 tokens here)
            assert row["generated_tokens"] == 8 * row["completions"] and row["full_budget_share"] == 1.0
        assert f"| {task} | {model} | nsa-eval |" in report
        assert f" {model} " in output and f" {task} " in output  # the printed table
    assert ours[("llama-full", "aime")]["completions"] == 16  # n=16 samples of its one problem
    assert ours[("llama-full", "niah")]["samples"] == 3  # one length x 3 depths
    assert all(r["build_s"] > 0 for r in ours.values())
    assert results["summary"]["llama-full:mmlu_vs_one_at_a_time"] > 0
    assert results["versions"]["torch"] and results["git_sha"] and results["seed"] == 0
    assert results["shapes"]["nsa"]["num_hidden_layers"] == 2

    theirs = {r["task"]: r for r in results["rows"] if r["engine"] == "lm-eval hf"}
    try:
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError:
        assert not theirs and "lm-eval: skipped" in output
        return
    assert set(theirs) == set(LM_EVAL_TASKS)
    for task, row in theirs.items():
        assert row["wall_s"] > 0 and row["samples"] == ours[("llama-full", task)]["samples"]
        assert ours[("llama-full", task)]["vs_lm_eval"] > 0 and f"| {task} | llama-full | lm-eval hf |" in report
    # the same requests in float32: lm-eval's HF backend scores and writes what ours does
    assert theirs["mmlu"]["agreement"] == 1.0 and theirs["mmlu"]["max_abs_logprob_diff"] < 1e-2
    assert theirs["gsm8k"]["agreement"] == 1.0 and theirs["humaneval"]["agreement"] == 1.0
    assert theirs["gsm8k"]["generated_tokens"] >= 8 * theirs["gsm8k"]["samples"]  # min_new_tokens: EOS cannot end it
    assert results["summary"]["suite_vs_lm_eval"] > 0 and "tasks both run (mmlu, gsm8k, humaneval)" in report
    assert "mmlu: largest |log-probability difference|" in report


def test_without_lm_eval_the_suite_says_so_in_one_line_and_runs_the_rest(tmp_path, shared_data, smollm2_dir,
                                                                          monkeypatch):
    for name in ("lm_eval", "lm_eval.api.instance", "lm_eval.models.huggingface"):
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval...` raises ImportError
    output, results, report = suite(["--tasks", "mmlu", "--models", "llama-full", "--no-one-at-a-time"], tmp_path,
                                    shared_data, smollm2_dir)
    lines = [line for line in output.splitlines() if line.startswith("lm-eval: skipped")]
    assert len(lines) == 1 and "lm_eval's HF backend does not import here" in lines[0]
    assert [(r["task"], r["engine"]) for r in results["rows"]] == [("mmlu", "nsa-eval")]
    assert "lm-eval: skipped" in report and results["rows"][0]["samples"] == 1


@pytest.mark.parametrize("args, message", [
    (["--tasks", "mmlu,bogus"], "--tasks: unknown bogus; use niah, ruler"),
    (["--models", "gpt"], "--models: unknown gpt; use llama-full, nsa"),
    (["--niah-lengths", "4k,lots"], "'lots' is not a whole number"),
    (["--data-dir", "/nonexistent"], "/nonexistent/mmlu_stem/test.jsonl is missing (mmlu's local rows); give --data-dir"),
    (["--task-option", "mmlu.bogus=1"], "task 'mmlu' has no option 'bogus'"),
])
def test_bad_input_ends_in_one_line(args, message, tmp_path):
    result = CliRunner().invoke(main, ["bench", "suite", *args, "--out", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_scale_sets_each_task_s_samples_and_the_one_slot_rows(tmp_path):
    budgets = {"gsm8k": 256, "humaneval": 512, "aime": 2048}
    plans = {p.label: p for p in plan_tasks(list(TASKS), 1.0, "4k,64k", "4k,32k", tmp_path, budgets, True)}
    assert list(plans) == [*TASKS, "mmlu@1", "gsm8k@1"]
    assert plans["mmlu"].limit == 10 and plans["gsm8k"].limit == 32 and plans["aime"].limit == 2
    assert plans["aime"].options == {"n_samples": "16", "max_new_tokens": "2048"}
    assert (plans["mmlu@1"].batch, plans["gsm8k@1"].batch, plans["gsm8k"].batch) == (1, 1, None)
    small = {p.label: p for p in plan_tasks(["mmlu", "ruler"], 0.01, "4k", "4k", tmp_path, budgets, False,
                                            {"mmlu": {"num_fewshot": "0"}})}
    assert list(small) == ["mmlu", "ruler"] and small["mmlu"].limit == 1 and small["ruler"].options["samples"] == "1"
    assert small["mmlu"].options == {"variant": "loglikelihood", "num_fewshot": "0"}


def test_past_the_deadline_no_task_starts_and_the_report_says_so(tmp_path, shared_data, smollm2_dir):
    output, results, report = suite(["--tasks", "mmlu", "--deadline", "0.001"], tmp_path, shared_data, smollm2_dir)
    assert results["rows"] == [] and results["skipped"] == ["llama-full (every task)", "nsa (every task)"]
    assert "skipped llama-full (every task): past --deadline" in output and "not run (past --deadline)" in report


def test_a_task_that_fails_is_one_line_the_rest_still_runs_and_the_exit_code_is_1(tmp_path, shared_data, smollm2_dir,
                                                                                  monkeypatch):
    import nsa_eval.bench.suite as suite_module

    real = suite_module.run_task

    def gsm8k_breaks(lm, model, plan, *args):
        if plan.label == "gsm8k":
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        return real(lm, model, plan, *args)

    monkeypatch.setattr(suite_module, "run_task", gsm8k_breaks)
    result = CliRunner().invoke(main, [*TINY, "--tasks", "gsm8k,mmlu", "--models", "llama-full", "--no-lm-eval",
                                       "--no-one-at-a-time", "--data-dir", str(shared_data), "--tokenizer",
                                       str(smollm2_dir), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "  failed llama-full gsm8k: RuntimeError: CUDA error: out of memory\n" in result.output
    results = json.loads((tmp_path / "suite-cpu.json").read_text())
    assert [r["task"] for r in results["rows"]] == ["mmlu"]
    assert results["failed"] == ["llama-full gsm8k: RuntimeError: CUDA error: out of memory"]
    assert "- failed: llama-full gsm8k" in (tmp_path / "suite-cpu.md").read_text()
