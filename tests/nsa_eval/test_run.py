"""`nsa-eval run` end to end: run store, resume after a kill, and every bad input as one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_checks import assert_one_line_error, invoke
from nsa_eval.records import RunInfo, RunKey, SampleRecord
from nsa_eval.store import RunStore

NIAH_SMALL = ["--tasks", "niah", "--niah-lengths", "256,512", "--niah-depths", "0,50,100", "--quiet"]


def without_timings(metrics):
    return {name: {k: v for k, v in task.items() if k != "efficiency"} for name, task in metrics["tasks"].items()}


def read_samples(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "samples" / "niah.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_end_to_end_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", *NIAH_SMALL, "--output", str(out), "--seed", "5")
    assert result.exit_code == 0, result.output
    run_info = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    samples = read_samples(out)
    assert len(samples) == 6 and {s["id"] for s in samples} == {f"len{n}-depth{d}-0" for n in (256, 512) for d in (0, 50, 100)}
    for record in samples:
        assert set(record) >= {"id", "breakdown", "prompt_hash", "prompt_excerpt", "target", "responses", "scores",
                               "prompt_tokens", "truncated", "prefill_ms", "decode_tokens_per_s"}
        assert abs(record["prompt_tokens"] - record["breakdown"]["length"]) <= 0.01 * record["breakdown"]["length"]
    niah = metrics["tasks"]["niah"]
    assert niah["n"] == 6 and niah["headline"] == "accuracy"
    mean = sum(r["scores"]["accuracy"] for r in samples) / 6
    assert niah["metrics"]["accuracy"]["mean"] == pytest.approx(mean)
    assert set(niah["breakdowns"]["length"]) == {"256", "512"} and niah["breakdowns"]["length"]["256"]["accuracy"]["n"] == 3
    assert len(niah["breakdowns"]["length x depth"]) == 6
    assert niah["efficiency"]["prefill_ms_mean"] > 0
    # what is needed to reproduce the run
    assert run_info["seed"] == 5 and run_info["model"]["spec"] == f"hf:{tiny_llama_dir}"
    assert run_info["tasks"]["niah"]["config"]["lengths"] == [256, 512]
    assert len(run_info["tasks"]["niah"]["prompts_digest"]) == 16
    assert {"torch", "transformers", "triton", "nsa_eval", "python"} <= set(run_info["versions"])
    assert run_info["git_sha"] and run_info["config_hash"] and run_info["finished"]
    # a rerun into the same folder with the same settings resumes: nothing asked again, same results
    again = invoke("run", "--model", f"hf:{tiny_llama_dir}", *NIAH_SMALL, "--output", str(out), "--seed", "5")
    assert again.exit_code == 0 and read_samples(out) == samples


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_metrics(smollm2_dir, tmp_path):
    """A real process killed (SIGKILL) mid-run, then resumed, ends with the metrics of an uninterrupted run."""
    args = ["--model", f"hf:{smollm2_dir}", *NIAH_SMALL]
    command = [sys.executable, "-m", "nsa_eval.cli", "run", *args]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = killed / "samples" / "niah.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if samples.is_file() and len(samples.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written_before = len(samples.read_text().splitlines())
    assert 2 <= written_before < 6
    assert not (killed / "metrics.json").exists()
    # a torn half line, as a crash mid-write leaves, is cut off on resume
    with samples.open("a") as handle:
        handle.write('{"id": "len512-dep')
    resumed = subprocess.run([*command, "--output", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    subprocess.run([*command, "--output", str(straight)], capture_output=True, text=True, timeout=300, check=True)
    killed_metrics = json.loads((killed / "metrics.json").read_text())
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    assert without_timings(killed_metrics) == without_timings(straight_metrics)
    strip = lambda records: sorted((r["id"], r["responses"], r["scores"]) for r in records)  # noqa: E731
    assert strip(read_samples(killed)) == strip(read_samples(straight))
    assert json.loads((killed / "run.json").read_text())["resumed"] == 1


@pytest.mark.slow
def test_two_cells_with_the_real_smollm2(tmp_path):
    out = tmp_path / "smol"
    result = invoke("run", "--model", "smollm2", "--tasks", "niah", "--niah-lengths", "512", "--niah-depths", "0,100",
                    "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    samples = read_samples(out)
    assert len(samples) == 2
    # SmolLM2-135M-Instruct finds a needle at the very start or end of 512 tokens
    assert all(s["scores"]["accuracy"] == 1.0 for s in samples), [s["responses"] for s in samples]
    assert json.loads((out / "run.json").read_text())["model"]["chat"] is True
    assert "niah: accuracy = 1.0000" in result.output


@pytest.mark.slow
def test_a_short_ruler_run_with_the_real_smollm2_and_its_report(tmp_path):
    """RULER end to end: samples at 1K tokens in SmolLM2's own tokens, answered, scored, RULER's table reported."""
    out = tmp_path / "ruler"
    result = invoke("run", "--model", "smollm2", "--tasks", "ruler", "--task-option", "ruler.lengths=1024",
                    "--task-option", "ruler.tasks=niah_single_1,vt", "--limit", "1", "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    samples = [json.loads(line) for line in (out / "samples" / "ruler.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == ["niah_single_1/1024/0", "vt/1024/0"]
    for record in samples:
        budget = {"niah_single_1": 128, "vt": 30}[record["breakdown"]["task"]]
        assert 0.99 * 1024 <= record["prompt_tokens"] + budget <= 1024  # the model's own count, chat template included
        assert record["details"]["length_tokens"] == record["prompt_tokens"] + budget
        found = sum(t.lower() in record["responses"][0].lower() for t in record["target"]) / len(record["target"])
        assert record["scores"]["score"] == found
    # SmolLM2-135M-Instruct finds a single needle in 1K tokens of RULER's noise
    assert samples[0]["scores"]["score"] == 1.0, samples[0]["responses"]
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]["ruler"]
    assert set(metrics["breakdowns"]) == {"task", "length", "task x length"} and metrics["n"] == 2
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["tasks"]["ruler"]["config"]["lengths"] == [1024]
    report = invoke("report", str(out), "--out", str(tmp_path / "report"), "--format", "md")
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| Models | Claimed Length | Effective Length | 1K | Avg. | wAvg. (inc) | wAvg. (dec) |" in text


def test_unknown_task_suggests_the_near_name(tmp_path):
    assert_one_line_error(invoke("run", "--tasks", "niha", "--output", str(tmp_path / "x")), "unknown task 'niha'", "Did you mean 'niah'")
    assert not (tmp_path / "x").exists()


def test_unknown_model_spec_suggests_the_near_name(tmp_path):
    result = invoke("run", "--model", "hff:some/model", "--tasks", "niah", "--output", str(tmp_path / "x"))
    assert_one_line_error(result, "unknown model spec 'hff:some/model'", "Did you mean 'hf'")


@pytest.mark.parametrize("make", ["missing", "not-a-checkpoint", "corrupt"])
def test_missing_or_unreadable_model_directory(tmp_path, make):
    folder = tmp_path / "model"
    if make != "missing":
        folder.mkdir()
    if make == "corrupt":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    result = invoke("run", "--model", f"hf:{folder}", "--tasks", "niah", "--output", str(tmp_path / "out"))
    assert_one_line_error(result, str(folder))


def test_grid_that_does_not_fit_max_length(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", "--tasks", "niah", "--niah-lengths", "1k,2k",
                    "--max-length", "1024", "--output", str(out))
    assert_one_line_error(result, "NIAH length 2048 does not fit --max-length 1024")
    assert not out.exists()


@pytest.mark.parametrize("value", ["1k,abc", ""])
def test_bad_grid_values(value):
    assert_one_line_error(invoke("run", "--tasks", "niah", "--niah-lengths", value),
                          f"niah.lengths={value}: lengths takes comma-separated token counts (4096 or 4k)")


@pytest.mark.slow
def test_output_holding_a_different_run_is_refused_and_kept(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke("run", "--model", f"hf:{tiny_llama_dir}", *NIAH_SMALL, "--output", str(out)).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", *NIAH_SMALL, "--seed", "1", "--output", str(out))
    assert_one_line_error(result, "holds a run with other settings (--seed: 1 here, 0 in the run)", "choose another --output")
    # a run from before settings were recorded is checked after the load, by its config, naming what differs
    run_info = json.loads((out / "run.json").read_text())
    del run_info["settings"]
    (out / "run.json").write_text(json.dumps(run_info))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", *NIAH_SMALL, "--seed", "1", "--output", str(out))
    assert_one_line_error(result, "holds a different run (seed: 1 here, 0 in the run;", "--overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", *NIAH_SMALL, "--output", str(foreign))
    assert_one_line_error(result, "not empty")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_run_store_cuts_a_torn_last_line(tmp_path):
    store = RunStore(tmp_path)
    key = RunKey(model={}, tasks={}, seed=0, limit=None, device="cpu", dtype="float32")
    store.open(RunInfo(run_id="r", created="t", key=key, config_hash=key.hash))
    record = lambda sample_id: SampleRecord(sample_id, {}, "h", "p", None, {}, {"accuracy": 1.0})  # noqa: E731
    store.append("t", record("a"))
    store.append("t", record("b"))
    with store.samples_path("t").open("a") as handle:
        handle.write('{"id": "c", "sco')
    assert store.finished_ids("t") == {"a", "b"}
    assert [r.id for r in store.records("t")] == ["a", "b"]
    store.append("t", record("c"))
    assert [r.id for r in store.records("t")] == ["a", "b", "c"]


def test_list_commands():
    assert "niah" in invoke("list", "tasks").output
    models = invoke("list", "models").output
    assert "smollm2" in models and "hf:PATH_OR_ID" in models


def test_task_options_reach_the_task_and_unknown_ones_are_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", "--tasks", "niah", "--niah-lengths", "256",
                    "--niah-depths", "50", "--task-option", "niah.samples_per_cell=2", "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["tasks"]["niah"]["config"]["samples_per_cell"] == 2
    assert len(read_samples(out)) == 2
    assert_one_line_error(invoke("run", "--tasks", "niah", "--task-option", "niah.needles=3"),
                          "task 'niah' has no option 'needles'", "samples_per_cell")
    assert_one_line_error(invoke("run", "--tasks", "niah", "--task-option", "niah"), "write TASK.KEY=VALUE")
    assert_one_line_error(invoke("run", "--tasks", "niah", "--task-option", "mmlu.x=1"), "not among --tasks")


def test_git_sha_is_the_checkout_or_the_override(monkeypatch):
    """A copy of the tree with a stale .git (a remote GPU box) records the commit it is told."""
    from nsa_eval.store import git_sha

    monkeypatch.delenv("NSA_EVAL_GIT_SHA", raising=False)
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert len(git_sha().split("-")[0]) == 40  # this checkout's HEAD
    monkeypatch.setenv("NSA_EVAL_GIT_SHA", "2c568a66ba1e76a3dab8565fa321bd6594d8cb26")
    assert git_sha() == "2c568a66ba1e76a3dab8565fa321bd6594d8cb26"
