"""The kill sweep's seam: counts every state-changing operation and SIGKILLs the process right after
the Nth, so tests can cut the power after each step of a flow instead of at points someone named.

Armed only by IOT_AGENT_TEST_OPS_LOG (a file shared by every process of one device: the agent, its
`iot-agent keys` children, the launcher, the root helper). Nothing else sets it; unarmed, `install()`
adds nothing and `op()` is one dictionary lookup.

What counts, automatically through a CPython audit hook (so no write can slip past by not calling a
helper): renames and replaces, removals, rmdir, symlinks, hard links and rmtree of paths under
IOT_AGENT_TEST_OPS_ROOT. Explicitly, through `op()`: token key generation and deletion, and each
request that changes the cloud's state (it has been answered when `op()` is called).

Each counted operation appends one fixed-size record to the log; its position is the operation's
number across all processes. With IOT_AGENT_TEST_KILL_AFTER=N the process that performs operation N
dies just after it: at the next audit event of the same thread (an audit hook runs before the
operation, so the kill waits for the thread's next step), or at once for `op()`. The kill takes the
process groups listed in IOT_AGENT_TEST_KILL_ALSO (a file of pgids) and, with
IOT_AGENT_TEST_KILL_GROUP=1, the process's own group: a power cut stops everything at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

LOG_ENV = "IOT_AGENT_TEST_OPS_LOG"
ROOT_ENV = "IOT_AGENT_TEST_OPS_ROOT"
KILL_ENV = "IOT_AGENT_TEST_KILL_AFTER"
ALSO_ENV = "IOT_AGENT_TEST_KILL_ALSO"
GROUP_ENV = "IOT_AGENT_TEST_KILL_GROUP"
RECORD = 96  # bytes per record: "<pid> <kind> <path>" padded; a count is the file size / RECORD

# audit event -> (index of the path it changes, index of that path's dir_fd argument)
_FILE_EVENTS = {
    "os.rename": (1, 3),
    "os.remove": (0, 1),
    "os.rmdir": (0, 1),
    "os.symlink": (1, 2),
    "os.link": (1, 3),
    "shutil.rmtree": (0, 1),
}
_state = threading.local()
_pending: dict[int, int] = {}  # thread ident -> the op number after which it must die
_installed = False


def armed() -> bool:
    return bool(os.environ.get(LOG_ENV))


def _kill() -> None:
    _state.busy = True  # os.kill and open are audited too: no re-entry from here
    also = os.environ.get(ALSO_ENV)
    if also:
        with contextlib.suppress(OSError), open(also) as f:
            for line in f:
                if line.strip().isdigit():
                    with contextlib.suppress(OSError):
                        os.killpg(int(line), signal.SIGKILL)
    if os.environ.get(GROUP_ENV) == "1":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _record(kind: str, path: str) -> int:
    text = f"{os.getpid()} {kind} {path}"[: RECORD - 1].encode("utf-8", "replace")[: RECORD - 1]
    fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.ljust(RECORD - 1) + b"\n")
        return os.lseek(fd, 0, os.SEEK_CUR) // RECORD  # our own record's end: our number
    finally:
        os.close(fd)


def _target() -> int:
    try:
        return int(os.environ.get(KILL_ENV, "0"))
    except ValueError:
        return 0


# Read once: op() runs on hot paths (every spool commit), and the sweeps arm a process through its environment
# at start, never later.
_ARMED_AT_START = bool(os.environ.get(LOG_ENV))


def op(kind: str, detail: str = "") -> None:
    """Count an operation the audit hook cannot see (token keys, cloud requests); it has happened."""
    if not _ARMED_AT_START:
        return
    n = _record(kind, detail)
    if n == _target():
        _kill()


def _path_of(arg, dir_fd) -> str | None:
    if isinstance(arg, int):
        return None
    p = os.fsdecode(arg) if isinstance(arg, (str, bytes, os.PathLike)) else None
    if p is None:
        return None
    if not os.path.isabs(p):
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) else os.getcwd()
        p = os.path.join(base, p)
    return os.path.normpath(p)


def _hook(event: str, args: tuple) -> None:
    if getattr(_state, "busy", False):
        return
    me = threading.get_ident()
    if me in _pending:
        _kill()  # the thread's previous step was the Nth operation, and it has returned
    spec = _FILE_EVENTS.get(event)
    if spec is None:
        return
    _state.busy = True
    try:
        root = os.environ.get(ROOT_ENV, "/")
        i, j = spec
        path = _path_of(args[i], args[j] if j < len(args) else None) if i < len(args) else None
        if not path or not (path == root or path.startswith(root.rstrip("/") + "/")):
            return
        if "__pycache__" in path or path.endswith(".pyc"):
            return
        n = _record(event, path)
        if n == _target():
            _pending[me] = n
            # A thread that ends right after its last step sends no further event: die anyway, once
            # the step (a rename, an unlink) has long returned.
            threading.Thread(target=_late_kill, daemon=True).start()
    finally:
        _state.busy = False


def _late_kill() -> None:
    import time

    time.sleep(0.2)
    _kill()


def install() -> None:
    """Called at every entry point; adds the hook only when a test armed the sweep."""
    global _installed
    if _installed or not os.environ.get(LOG_ENV):
        return
    _installed = True
    sys.addaudithook(_hook)


def count(log_path: str) -> list[str]:
    """The operations recorded so far (for the tests' printout)."""
    try:
        with open(log_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [data[i : i + RECORD].decode("utf-8", "replace").strip() for i in range(0, len(data) - RECORD + 1, RECORD)]
