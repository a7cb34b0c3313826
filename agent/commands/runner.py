"""Running an operator's handler: no shell, its own process group, a deadline, and a cap on what it says.

Why these rules: the request comes from the cloud, so nothing of it reaches a command line (parameters go
to stdin as JSON); a handler that forks must not outlive its timeout (the whole group is killed); and a
handler that prints without end must not grow the agent (output past the cap is read and dropped, so the
handler never blocks on a full pipe either).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from agent.commands.config import HandlerConfig

READ_CHUNK = 64 * 1024
KILL_GRACE_S = 2.0  # SIGTERM to the group first, then SIGKILL


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None: killed at the deadline, or never started
    output: bytes  # the first max_output_kib of stdout and stderr together
    output_bytes: int  # everything it wrote
    timed_out: bool = False
    error: str | None = None  # could not start (exec failed): the reason

    @property
    def truncated(self) -> bool:
        return self.output_bytes > len(self.output)


def run(handler: HandlerConfig, parameters: dict, env_extra: dict[str, str], stop: threading.Event) -> Outcome:
    cap = handler.max_output_kib * 1024
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **env_extra}
    kwargs: dict = {}
    if handler.user:
        import pwd

        pw = pwd.getpwnam(handler.user)
        if pw.pw_uid != os.geteuid():
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env.update(HOME=pw.pw_dir, USER=pw.pw_name)
    try:
        proc = subprocess.Popen(
            handler.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=env,
            start_new_session=True,  # its own process group: the deadline kills everything it started
            close_fds=True,
            **kwargs,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return Outcome(None, b"", 0, error=f"{e.__class__.__name__}: {getattr(e, 'strerror', None) or e}")
    kept = bytearray()
    total = [0]

    def read() -> None:
        assert proc.stdout is not None
        while True:
            try:
                chunk = proc.stdout.read1(READ_CHUNK)  # type: ignore[attr-defined]  # a BufferedReader
            except (OSError, ValueError):
                return
            if not chunk:
                return
            total[0] += len(chunk)
            room = cap - len(kept)
            if room > 0:
                kept.extend(chunk[:room])

    reader = threading.Thread(target=read, name="command-output", daemon=True)
    reader.start()
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(parameters).encode("ascii"))
        proc.stdin.close()
    except (BrokenPipeError, OSError):  # it does not read its input: its business
        pass
    deadline = time.monotonic() + handler.timeout_s
    timed_out = False
    while True:
        try:
            proc.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline or stop.is_set():
                timed_out = not stop.is_set() or time.monotonic() >= deadline
                _kill_group(proc)
                break
    reader.join(KILL_GRACE_S + 1)
    if reader.is_alive():  # a grandchild that left the group still holds the pipe: stop reading it
        _close(proc)
    code = proc.returncode
    return Outcome(None if timed_out else code, bytes(kept), total[0], timed_out=timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the leader is gone; its group goes too
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def _close(proc: subprocess.Popen) -> None:
    if proc.stdout is not None:
        with contextlib.suppress(OSError):
            proc.stdout.close()
