"""The sandbox for model-written code: hostile completions fail with a reason and harm nothing.

Each hostile program is a completion of a real HumanEval problem (HumanEval/0, has_close_elements) as a
model would write it, checked as the task checks it (prompt + completion + test + check(entry_point)).
After every test no process of the sandbox users is left on the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from nsa_eval.tasks import sandbox
from nsa_eval.tasks.humaneval import check_program, load_problems
from nsa_eval.tasks.sandbox import BOOTSTRAP, SANDBOX_UID_BASE, Limits, run_programs, sandbox_protections

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox uses Linux process APIs")

PROBLEM = load_problems()[0]  # has_close_elements(numbers, threshold) -> bool
ROOT = os.geteuid() == 0


def completion(body: str) -> str:
    """A function body as a base model writes it after the prompt."""
    return textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


def run_completion(body: str, limits: Limits = Limits()) -> sandbox.ExecutionResult:
    return run_programs([check_program(PROBLEM, completion(body), chat=False)], limits)[0]


def sandbox_user_pids() -> list[int]:
    """Processes on this machine owned by any sandbox user."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as status:
                uid = int(next(line for line in status if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + 1000:
            pids.append(int(entry))
    return pids


def pids_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert sandbox_user_pids() == [], "a sandboxed process outlived its run"


def test_namespaces_are_used_where_the_machine_allows_them():
    protections = sandbox_protections()
    if ROOT and shutil.which("unshare"):
        assert protections["isolation"] == "namespaces"
        assert protections["pid_namespace"] and protections["network_namespace"] and protections["private_tmp"]
    assert protections["unprivileged_user"] == ROOT


def test_a_correct_completion_passes_and_a_wrong_one_fails():
    good, wrong = run_programs([
        check_program(PROBLEM, PROBLEM["canonical_solution"], chat=False),
        check_program(PROBLEM, completion("return False"), chat=False),
    ])
    assert good == sandbox.ExecutionResult(True, "passed")
    assert wrong == sandbox.ExecutionResult(False, "failed: AssertionError")


@pytest.mark.parametrize(
    "body, reason",
    [
        ("import sys\nsys.exit(0)", "failed: SystemExit: 0"),
        ("import os\nos._exit(0)", "failed: exited with status 0 before the program finished"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by signal 9 (SIGKILL)"),
        ("return (", "failed: SyntaxError"),
    ],
    ids=["sys.exit", "os._exit", "self-kill", "syntax-error"],
)
def test_a_program_that_stops_early_has_not_passed(body, reason):
    result = run_completion(body)
    assert not result.passed
    assert result.reason.startswith(reason)


def test_fork_bomb():
    result = run_completion("import os\nwhile True:\n    os.fork()")
    assert result == sandbox.ExecutionResult(False, "failed: BlockingIOError: [Errno 11] Resource temporarily unavailable")
    assert subprocess.run(["true"]).returncode == 0  # the machine still forks


def test_memory_bomb():
    """Growing until the limit (256 MiB here: filling the default 1 GiB takes seconds on a slow VM), and
    asking for a terabyte at once under the default limit."""
    growing = run_completion("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))", Limits(memory_mib=256, timeout_s=20))
    assert growing == sandbox.ExecutionResult(False, "failed: MemoryError")
    assert run_completion("return len(bytearray(1 << 40)) > 0") == sandbox.ExecutionResult(False, "failed: MemoryError")


def test_endless_loop_is_killed_at_the_timeout():
    result = run_completion("while True:\n    pass", Limits(timeout_s=1))
    assert result == sandbox.ExecutionResult(False, "timed out")


def test_files_outside_the_sandbox_survive(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    harness_file = BOOTSTRAP.read_bytes()
    escaped_to_tmp = Path("/tmp") / f"nsa-sandbox-escape-{uuid.uuid4().hex}"
    escaped_to_repo = BOOTSTRAP.parent / f"escape-{uuid.uuid4().hex}.txt"
    bodies = (
        f"import os\nos.remove({str(canary)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.remove({str(BOOTSTRAP)!r})",
        f"open({str(BOOTSTRAP)!r}, 'w').write('owned')",
        f"open({str(escaped_to_repo)!r}, 'w').write('escaped')",
        f"open({str(escaped_to_tmp)!r}, 'w').write('escaped')\nreturn None",
    )
    try:
        # one at a time: a broken sandbox would otherwise lose its bootstrap in the middle of the others
        results = [run_completion(body) for body in bodies]
        assert canary.read_text() == "alive"
        assert BOOTSTRAP.read_bytes() == harness_file
        assert not escaped_to_repo.exists()
        assert not escaped_to_tmp.exists()
        for result in results:
            assert not result.passed and result.reason.startswith("failed: "), result
    finally:  # a sandbox that failed this test must not leave the checkout damaged
        if not BOOTSTRAP.exists() or BOOTSTRAP.read_bytes() != harness_file:
            BOOTSTRAP.write_bytes(harness_file)
        escaped_to_repo.unlink(missing_ok=True)
        escaped_to_tmp.unlink(missing_ok=True)


def test_the_program_works_in_an_empty_directory_that_is_removed_afterwards():
    body = """
    import os
    assert os.listdir(".") == [], os.listdir(".")
    with open("scratch.txt", "w") as scratch:
        scratch.write("x" * 1000)
    assert os.path.getsize("scratch.txt") == 1000
    return None  # wrong answer: the check then fails with AssertionError (not one of the asserts above)
    """
    before = set(Path(tempfile.gettempdir()).glob("nsa-sandbox-*"))
    result = run_completion(body)
    assert result.reason == "failed: AssertionError"
    assert set(Path(tempfile.gettempdir()).glob("nsa-sandbox-*")) == before


def test_no_connection_leaves_the_sandbox():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_completion(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')")
        assert not result.passed and result.reason.startswith("failed: OSError"), result
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing arrived
            listener.accept()


def test_sockets_are_refused_without_namespaces():
    """The fallback for machines where `unshare` cannot run: socket creation refused in the child."""
    program = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)"
    result = sandbox._run(program, Limits(), "process")
    assert result == sandbox.ExecutionResult(False, "failed: PermissionError: network access is disabled in the sandbox")


def test_the_harness_environment_is_invisible(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("NSA_EVAL_TEST_SECRET", secret)
    body = f"""
    import glob, os
    found = [key for key, value in os.environ.items() if {secret!r} in value]
    for path in glob.glob("/proc/*/environ"):
        try:
            if {secret!r}.encode() in open(path, "rb").read():
                found.append(path)
        except OSError:
            pass
    if found:
        raise RuntimeError("leaked through " + ", ".join(found))
    return None
    """
    assert run_completion(body) == sandbox.ExecutionResult(False, "failed: AssertionError")


def test_signalling_the_harness_harms_nothing():
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        bodies = (
            "import os\nos.kill(os.getppid(), 9)",
            f"import os\nos.kill({os.getpid()}, 9)",
            f"import os\nos.kill({victim.pid}, 9)",
            f"import os\nos.killpg({victim.pid}, 9)",
            f"import os\nos.killpg({os.getpgrp()}, 9)",
            "import os\nos.killpg(os.getpgrp(), 9)",
            "import os\nos.kill(-1, 9)",
        )
        results = run_programs([check_program(PROBLEM, completion(body), chat=False) for body in bodies])
        for result in results:
            assert not result.passed and result.reason.startswith(("failed: ", "killed by signal")), result
        assert results[-2].reason == "killed by signal 9 (SIGKILL)"  # its own group: only itself
        assert victim.poll() is None
        assert run_programs(["pass"]) == [sandbox.ExecutionResult(True, "passed")]
    finally:
        victim.kill()
        victim.wait()


def test_exhausting_file_descriptors():
    result = run_completion("files = []\nwhile True:\n    files.append(open('/dev/null'))")
    assert result == sandbox.ExecutionResult(False, "failed: OSError: [Errno 24] Too many open files: '/dev/null'")
    with open(os.devnull) as still_possible:
        assert still_possible.fileno() > 0


@pytest.mark.parametrize("ending, reason", [("return None", "failed: AssertionError"),
                                            pytest.param("while True: pass", "timed out", marks=pytest.mark.slow)])
def test_a_daemonised_grandchild_dies_with_the_run(ending, reason):
    marker = f"nsa-daemon-{uuid.uuid4().hex}"
    body = f"""
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sh", ["sh", "-c", "sleep 60; true {marker}"])
        os._exit(0)
    time.sleep(1.0)
    {ending}
    """
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.extend(pids_with(marker))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_completion(body, Limits(timeout_s=2))
    finally:
        done.set()
        watcher.join()
    assert result == sandbox.ExecutionResult(False, reason)
    assert seen, "the daemon never started, so this test shows nothing"
    assert pids_with(marker) == []


@pytest.mark.skipif(not (ROOT and shutil.which("unshare")), reason="needs root and util-linux unshare")
def test_the_bootstrap_refuses_to_mount_in_the_harness_namespace():
    """Private mounts are only ever made in a new mount namespace. Checked inside a throwaway mount
    namespace posing as the harness's, so a regression cannot cover this machine's /tmp."""
    config = (
        '{"workdir": "/tmp", "private_mounts": true, "harness_mount_namespace": "\'"$(readlink /proc/self/ns/mnt)"\'", '
        '"user": null, "refuse_sockets": false, "limits": {"timeout_s": 3, "memory_mib": 1024, "processes": 16, '
        '"file_size_mib": 16, "open_files": 64, "tmpfs_mib": 64}}'
    )
    script = f"echo pass | {sys.executable} -I -S {BOOTSTRAP} '{config}'; grep -c ' /tmp ' /proc/self/mountinfo || true"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True)
    assert "refusing to mount" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(sum(" /tmp " in line for line in open("/proc/self/mountinfo")))


def test_a_machine_where_the_sandbox_cannot_run_python_is_one_clear_line(monkeypatch):
    """E.g. no namespaces and a standard library the sandbox user may not read: refuse, never score zeros."""
    monkeypatch.setattr(sandbox, "_unshare_command", lambda: None)
    monkeypatch.setattr(sandbox, "PROBE", "raise ImportError('stdlib unreadable')")
    sandbox._isolation.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"^the code sandbox cannot run Python here \(failed: ImportError: stdlib unreadable"):
            run_programs(["pass"])
    finally:
        sandbox._isolation.cache_clear()
