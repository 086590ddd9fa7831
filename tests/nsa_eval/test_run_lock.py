"""A run folder is held by the run writing it: a second run into it at the same time is one line naming the first
process, and a lock left by a process killed with SIGKILL does not block the next run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nsa_eval.store import LOCK_NAME, RunStore

COMMAND = [sys.executable, "-m", "nsa_eval", "run", "--model", "smollm2", "--tasks", "niah",
           "--task-option", "niah.lengths=512", "--task-option", "niah.depths=0,25,50,75,100", "--quiet"]


@pytest.mark.slow  # two real processes with the real model
def test_two_runs_into_one_folder_at_once_one_runs_the_other_is_one_line(tmp_path):
    out = tmp_path / "run"
    first, second = (subprocess.Popen([*COMMAND, "--output", str(out)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2))
    outputs = {p.pid: p.communicate(timeout=300) for p in (first, second)}
    codes = {p.pid: p.returncode for p in (first, second)}
    assert sorted(codes.values()) == [0, 1], outputs
    winner = next(pid for pid, code in codes.items() if code == 0)
    loser = next(pid for pid, code in codes.items() if code == 1)
    stdout, stderr = outputs[loser]
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.strip() == (f"Error: --output {out} is being written by another run (process {winner}); wait for "
                              "it to end, or choose another --output")
    ids = [json.loads(line)["id"] for line in (out / "samples" / "niah.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 5  # each sample once
    assert json.loads((out / "metrics.json").read_text())["tasks"]["niah"]["n"] == 5


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([*COMMAND, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    assert process.stderr.readline().startswith("loading smollm2")  # the folder is held from before the model loads
    assert (out / LOCK_NAME).read_text().strip() == str(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / LOCK_NAME).is_file()  # kill -9 leaves the file, not the lock
    rerun = subprocess.run([*COMMAND, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["tasks"]["niah"]["n"] == 5


def test_the_lock_is_held_in_process_and_released_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nsa_eval.store import RunStore\n"
                               f"store = RunStore({str(tmp_path / 'run')!r})\nstore.lock()\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"being written by another run \\(process {holder.pid}\\)"):
        RunStore(tmp_path / "run").lock()
    holder.kill()
    holder.wait()
    RunStore(tmp_path / "run").lock()  # taken once the holder is gone
