"""`nsa-eval run` as a new user meets it: every bad input is one `Error:` line before any model loads and leaves the
folder as it was; a failed run never blocks its fix; --overwrite, resume and "already complete" lines; Ctrl-C keeps
what was answered (exit 130); --max-new-tokens caps generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_checks import assert_one_line_error, invoke

LONGBENCH_ROWS = Path(__file__).parents[1] / "tasks" / "fixtures" / "longbench_rows.jsonl"
GSM8K_ROWS = [{"question": f"Tom has {n} apples and buys 2 more. How many apples does he have?",
               "answer": f"{n} + 2 = {n + 2}\n#### {n + 2}"} for n in range(3, 7)]
NIAH = ["--tasks", "niah", "--niah-lengths", "256,512", "--niah-depths", "0,50,100", "--quiet"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with data files of every kind a case needs; default run folders would land in it."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        Path(name).write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS), encoding="utf-8")
    Path("empty.jsonl").write_text("", encoding="utf-8")
    Path("qasper.jsonl").write_text("".join(line + "\n" for line in LONGBENCH_ROWS.read_text(encoding="utf-8").splitlines()
                                            if json.loads(line)["dataset"] == "qasper"), encoding="utf-8")
    Path("latin1.jsonl").write_bytes(b'{"question": "a", "answer": "1 #### 1"}\n{"question": "caf\xe9", "answer": "1 #### 1"}\n')
    Path("broken.parquet").write_bytes(b"PAR1 not a parquet file")
    Path("aime.json").write_text('[{"id": 1, "problem": "1+1?", "answer": 2}, {"id": 2,,}]', encoding="utf-8")
    return tmp_path


BAD_INPUTS = [
    (["--tasks", "mmlu", "--task-option", "mmlu.num_fewshot=abc"],
     ["--task-option mmlu.num_fewshot=abc: num_fewshot takes a whole number", "e.g. mmlu.num_fewshot=5"]),
    (["--tasks", "gsm8k", "--task-option", "gsm8k.num_fewshot=abc"], ["num_fewshot takes a whole number"]),
    (["--tasks", "niah", "--task-option", "niah.lengths=5x"], ["lengths takes comma-separated token counts (4096 or 4k)"]),
    (["--tasks", "aime", "--task-option", "aime.temperature=hot"], ["aime.temperature=hot: temperature takes a number"]),
    (["--tasks", "aime", "--task-option", "aime.n_samples=2.5"], ["n_samples takes a whole number"]),
    (["--tasks", "aime", "--task-option", "aime.top_p=2"], ["AIME top_p 2.0", "at most 1"]),
    (["--tasks", "aime", "--task-option", "aime.n_samples=3", "--task-option", "aime.n_samples=4"], ["given twice"]),
    (["--tasks", "niah", "--task-option", "niah.seed=3"], ["seed has its own flag; use --seed N"]),
    (["--tasks", "NIAH"], ["unknown task 'NIAH'. Did you mean 'niah'?"]),
    (["--tasks", "gsm8k", "--data", "gsm8k="], ["--data gsm8k=: the path after '=' is empty"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=a.jsonl", "--data", "gsm8k=b.jsonl"],
     ["--data names gsm8k twice (a.jsonl and b.jsonl)"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=missing.jsonl"], ["missing.jsonl does not exist"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=empty.jsonl"], ["empty.jsonl holds no rows"]),
    (["--tasks", "niah", "--data", "niah=a.jsonl"], ["niah generates its samples", "--task-option niah.haystack_dir=DIR"]),
    (["--tasks", "aime", "--data", "aime=aime.json"], ["aime.json: line 1, column 54: not valid JSON"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=latin1.jsonl"], ["latin1.jsonl: line 2, column 18: not UTF-8 text (byte 0xe9)"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=broken.parquet"], ["broken.parquet: not a readable parquet file"]),
    (["--tasks", "longbench", "--data", "longbench=qasper.jsonl"],
     ["holds 1 of the 21 subsets asked for", "--task-option longbench.subsets=qasper"]),
    (["--tasks", "niah", "--sparse-budget", "384"], ["--sparse-budget applies only with --attention sparse"]),
    (["--tasks", "niah", "--attention", "sparse", "--sparse-budget", "256"],
     ["--sparse-budget 256 tokens hold 4 blocks of 64 tokens, fewer than the 11 blocks (704 tokens)",
      "raise it to at least 704 tokens"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=a.jsonl", "--niah-lengths", "1k"],
     ["--niah-lengths applies to the niah task, which is not among --tasks gsm8k"]),
    (["--tasks", "niah", "--niah-lengths", "1k", "--task-option", "niah.lengths=512"], ["give one of them"]),
    (["--tasks", "niah", "--include-path", "."], ["--include-path applies to lm-eval:TASK tasks"]),
    (["--tasks", "niah", "--allow-code-execution"], ["--allow-code-execution applies to humaneval"]),
    (["--tasks", "niah", "--max-length", "600", "--task-option", "niah.lengths=1k"],
     ["NIAH length 1024 does not fit --max-length 600 (prompt + 32 generated tokens)"]),
    (["--tasks", "ruler", "--max-length", "2000", "--task-option", "ruler.lengths=4k"],
     ["RULER length 4096 does not fit --max-length 2000"]),
    (["--tasks", "niah", "--output", "/proc/nsa-eval-run"],
     ["--output /proc/nsa-eval-run: cannot write a run folder there (No such file or directory)"]),
    (["--tasks", "niah", "--output", "a.jsonl/run"], ["--output a.jsonl/run: cannot write a run folder there (Not a directory)"]),
    (["--tasks", "gsm8k", "--data", "gsm8k=a.jsonl", "--task-option", "gsm8k.variant=standard"],
     ["gsm8k.variant=standard needs 5 shots other than the item asked; a.jsonl holds 4 test rows (give at least 6"]),
]


@pytest.mark.parametrize("args, fragments", BAD_INPUTS, ids=[" ".join(a[1:]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_the_model_loads_and_writes_nothing(workdir, tiny_llama_dir, args, fragments):
    before = snapshot(workdir)
    result = invoke("run", "--model", f"hf:{tiny_llama_dir}", *args)
    assert_one_line_error(result, *fragments)
    assert "loading" not in result.output
    assert snapshot(workdir) == before


@pytest.mark.parametrize("spec, fragment", [
    ("gpt5", "unknown model spec 'gpt5'"), ("hf:/nowhere/model", "model folder /nowhere/model does not exist"),
    ("nsa:", "needs a checkpoint folder"), ("openai:localhost:8000", "give the server's URL"),
    ("openai:http://127.0.0.1:9/v1?tokenizer=/nonexistent#m", "tokenizer folder /nonexistent does not exist"),
])
def test_a_bad_model_spec_is_refused_before_loading(workdir, spec, fragment):
    before = snapshot(workdir)
    result = invoke("run", "--model", spec, *NIAH)
    assert_one_line_error(result, fragment)
    assert "loading" not in result.output and snapshot(workdir) == before


def test_a_run_that_fails_at_generation_leaves_nothing_and_the_fixed_command_runs(workdir, tiny_llama_dir):
    """The generation budget is found too large only when the model answers (after the run folder was opened):
    the folder goes, and the corrected command (capped by --max-new-tokens) runs into the same --output."""
    out = workdir / "runs" / "gsm8k"
    common = ["run", "--model", f"hf:{tiny_llama_dir}", "--tasks", "gsm8k", "--data", "gsm8k=a.jsonl", "--limit", "2",
              "--max-length", "1024", "--task-option", "gsm8k.max_new_tokens=2000", "--output", out, "--quiet"]
    before = snapshot(workdir)
    failed = invoke(*common)
    assert_one_line_error(failed, "max_new_tokens 2000 leaves no room for a prompt")
    assert snapshot(workdir) == before  # not even runs/ is left
    fixed = invoke(*common, "--max-new-tokens", "3")
    assert fixed.exit_code == 0, fixed.output
    records = [json.loads(line) for line in (out / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(n <= 3 for r in records for n in r["new_tokens"])
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["max_new_tokens"] == 3 and run_info["settings"]["--max-new-tokens"] == 3
    assert run_info["tasks"]["gsm8k"]["config"]["max_new_tokens"] == 2000  # the task's own budget, capped at 3


@pytest.mark.slow
def test_a_run_folder_with_other_settings_names_them_and_overwrite_starts_over(workdir, tiny_llama_dir):
    out = workdir / "run"
    model = ["--model", f"hf:{tiny_llama_dir}"]
    first = invoke("run", *model, *NIAH, "--limit", "3", "--output", out)
    assert first.exit_code == 0, first.output
    before = snapshot(workdir)
    refused = invoke("run", *model, *NIAH, "--limit", "1", "--seed", "2", "--output", out)
    assert_one_line_error(refused, f"--output {out} holds a run with other settings", "--limit: 1 here, 3 in the run",
                          "--seed: 2 here, 0 in the run", "--overwrite")
    assert "loading" not in refused.output and snapshot(workdir) == before
    again = invoke("run", *model, *NIAH, "--limit", "3", "--output", out)
    assert again.exit_code == 0 and "already complete" in again.output and "loading" not in again.output
    assert "niah: accuracy" in again.output and snapshot(workdir) == before
    assert_one_line_error(invoke("run", *model, *NIAH, "--output", workdir / "a.jsonl"), "is a file")
    replaced = invoke("run", *model, *NIAH, "--limit", "1", "--seed", "2", "--output", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    run_info = json.loads((out / "run.json").read_text())
    assert (run_info["seed"], run_info["limit"], run_info.get("resumed")) == (2, 1, None)
    assert len((out / "samples" / "niah.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_ctrl_c_keeps_the_samples_and_the_rerun_resumes(smollm2_dir, tmp_path):
    """A real process interrupted (SIGINT) mid-run: exit code 130 and how many samples are kept; its progress went to
    the pipe as plain lines; the same command then says `resuming k/3` before loading, and once finished says
    `already complete` without loading the model."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "nsa_eval", "run", "--model", f"hf:{smollm2_dir}", "--tasks", "niah",
               "--niah-lengths", "256", "--niah-depths", "0,50,100", "--output", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:  # the plain progress line after the first answer (stderr is a pipe, not a terminal)
        seen.append(line)
        if line.startswith("niah: 1/3 samples"):
            break
    assert process.poll() is None, "".join(seen)[-2000:]
    os.kill(process.pid, signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest
    samples = out / "samples" / "niah.jsonl"
    kept = samples.read_text().count("\n")
    assert process.returncode == 130, stderr[-2000:]
    assert 1 <= kept < 3 and f"interrupted: {kept}/3 samples kept in {out}; rerun the same command to resume" in stderr
    assert "niah: 3 of 3 samples to answer" in stderr and "niah: 1/3 samples, first after 0:0" in stderr
    assert "ETA" not in "".join(seen)  # no projection from the first answer alone
    assert "Traceback" not in stderr and "Aborted" not in stderr
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.index(f"resuming {kept}/3 samples in {out}") < resumed.stderr.index("loading")
    assert len(samples.read_text().splitlines()) == 3
    complete = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert complete.returncode == 0 and "already complete" in complete.stderr and "loading" not in complete.stderr


def test_a_read_only_output_is_one_line_before_the_model_loads(tmp_path):
    """--output on a read-only file system (a tmpfs mounted read-only in a private mount namespace)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {folder} && exec {sys.executable} -m nsa_eval run --model smollm2 "
              f"--tasks niah --output {folder}/run --quiet")
    try:
        result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if "mount:" in result.stderr or "unshare:" in result.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {result.stderr.strip()}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"Error: --output {folder}/run: cannot write a run folder there (Read-only file "
                                     "system); choose another --output")
