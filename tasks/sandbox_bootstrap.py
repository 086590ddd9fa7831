"""The sandbox's first process: run by `nsa_eval.tasks.sandbox` as `python -I -S sandbox_bootstrap.py CONFIG`.

It is PID 1 of the sandbox's namespaces (or, without them, a plain child in its own session). It reads the
program from stdin, sets up the private mounts, forks the program's process (which drops to the sandbox
user under resource limits and runs the program with `exec`), waits for it and prints one JSON line:
{"result": "passed" | "failed: ..." | null, "status": "exit" | "signal", "code": int}. When it exits, the
kernel kills whatever is left in its PID namespace.

Standard library only and as few imports as possible: this start-up is paid once per program.
CONFIG (JSON): workdir, private_mounts (bool), harness_mount_namespace (the harness's /proc/self/ns/mnt: private
mounts are refused there), user (uid/gid to drop to, or null), refuse_sockets (bool), limits (sandbox.Limits).
"""

from __future__ import annotations

import json
import os
import resource
import sys

PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def bootstrap(config: dict) -> None:
    """Set up, fork the program's process, wait for it, print {"result", "status", "code"} as one JSON line."""
    program = sys.stdin.buffer.read()
    if config["private_mounts"]:
        if os.readlink("/proc/self/ns/mnt") == config["harness_mount_namespace"]:
            sys.exit("sandbox_bootstrap: refusing to mount: this is the harness's own mount namespace, not a new one")
        _private_mounts(config)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _program_process(program, write_end, config)  # never returns
    os.close(write_end)
    _, wait_status = os.waitpid(pid, 0)
    os.set_blocking(read_end, False)
    reported = b""
    try:
        while len(reported) < 1 << 16 and (chunk := os.read(read_end, 1 << 16)):
            reported += chunk
    except BlockingIOError:
        pass
    # the program's own process reports "<pid> <outcome>"; forked copies of it may report too
    prefix = f"{pid} "
    lines = [line for line in reported.decode("utf-8", "replace").splitlines() if line.startswith(prefix)]
    result = lines[0][len(prefix):] if lines else None
    if os.WIFSIGNALED(wait_status):
        status, code = "signal", os.WTERMSIG(wait_status)
    else:
        status, code = "exit", os.waitstatus_to_exitcode(wait_status)
    sys.stdout.write(json.dumps({"result": result, "status": status, "code": code}) + "\n")
    sys.stdout.flush()


def _program_process(program: bytes, result_fd: int, config: dict) -> None:
    """In the forked child: drop to the sandbox user under limits, run the program, report, exit."""
    try:
        os.chdir(config["workdir"])
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        _set_limits(config["limits"])
        _no_new_privileges()
        if config["refuse_sockets"]:
            _refuse_sockets()
        if config["user"] is not None:  # last: what the lines above import may be unreadable to this user
            os.setgroups([])
            os.setgid(config["user"])
            os.setuid(config["user"])
    except BaseException as error:  # the sandbox could not be set up: never run the program then
        _report(result_fd, f"sandbox error: {_describe(error)}", 1)
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__sandbox__"})
        outcome = "passed"
    except BaseException as error:  # SystemExit included: a program that exits early has not passed
        outcome = f"failed: {_describe(error)}"
    _report(result_fd, outcome, 0 if outcome == "passed" else 1)


def _report(result_fd: int, outcome: str, exit_code: int) -> None:
    try:
        os.write(result_fd, f"{os.getpid()} {outcome}\n".encode("utf-8", "replace"))
    finally:
        os._exit(exit_code)


def _describe(error: BaseException) -> str:
    """'TypeName' or 'TypeName: message' (message cut to 200 characters)."""
    try:
        message = " ".join(str(error).split())
    except BaseException:
        message = ""
    name = type(error).__name__
    return f"{name}: {message[:200]}" if message else name


def _set_limits(limits: dict) -> None:
    mib = 1 << 20
    cpu_s = int(-(-limits["timeout_s"] // 1)) + 1
    for which, value in (
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_AS, limits["memory_mib"] * mib),
        (resource.RLIMIT_NPROC, limits["processes"]),
        (resource.RLIMIT_FSIZE, limits["file_size_mib"] * mib),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def _no_new_privileges() -> None:
    import ctypes

    PR_SET_NO_NEW_PRIVS = 38
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _refuse_sockets() -> None:
    """Without a network namespace: make creating a socket raise PermissionError."""
    import _socket
    import socket

    class RefusedSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = RefusedSocket
    socket.socketpair = socket.create_connection = socket.fromfd = RefusedSocket


def _private_mounts(config: dict) -> None:
    """In the new mount namespace (as its root): fresh tmpfs over the world-writable places, and the
    Python standard library reachable by the sandbox user even where it lives under a private home."""
    hidden = _expose_python_paths()
    size = f"size={config['limits']['tmpfs_mib']}m,nr_inodes=4096,mode=1777"
    for path in PRIVATE_TMPFS:
        if os.path.isdir(path) and not os.path.islink(path) and path not in hidden:
            _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, size)


_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 32, 4096, 16384


def _expose_python_paths() -> set[str]:
    """sys.path folders under a folder others cannot enter (e.g. a pyenv in /root, mode 0700): cover that
    folder with a tmpfs holding only read-only bind mounts of those sys.path folders. Returns the covered folders."""
    closed: dict[str, list[tuple[str, int]]] = {}
    for entry in sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}, key=len):
        blocker = _closed_ancestor(entry)
        if blocker is None or any(entry.startswith(done + "/") for done, _ in closed.get(blocker, [])):
            continue
        closed.setdefault(blocker, []).append((entry, os.open(entry, os.O_PATH | os.O_DIRECTORY)))
    for blocker, entries in closed.items():
        _mount("tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
        for entry, fd in entries:
            os.makedirs(entry, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", entry, None, _MS_BIND | _MS_REC)
            _mount(None, entry, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            os.close(fd)
    return set(closed)


def _closed_ancestor(path: str) -> str | None:
    """The outermost proper ancestor of `path` that others may not enter (no o+x), or None."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")


if __name__ == "__main__":
    bootstrap(json.loads(sys.argv[1]))
