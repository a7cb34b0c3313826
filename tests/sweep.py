"""The kill sweep: cut the power after every state-changing operation of a flow, restart, check.

For N = 1, 2, ... a fresh device runs the flow with IOT_AGENT_TEST_KILL_AFTER=N (agent.killpoints):
the process that performs the Nth operation (a rename, unlink, symlink, rmtree under the device's
folder; a token key made or deleted; a cloud request answered) SIGKILLs its whole process group just
after it. The device is then started again without a kill and must finish the flow; the flow's
invariants are checked. The sweep ends at the first N the flow completes without reaching: every
operation of the flow has then been a kill point. Runs go in parallel (they wait on the network more
than they compute).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from localcloud import pace

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One agent process in its own session (so the kill takes its children too); log in a file."""

    cmd: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path | None = None
    pgid_file: Path | None = None  # where another process looks up our group to kill it too
    proc: subprocess.Popen | None = None

    def start(self) -> Run:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd
            )
        if self.pgid_file:
            self.pgid_file.write_text(f"{self.proc.pid}\n")
        return self

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """True when the log matches; False when the process ended first (or the time ran out)."""
        rx = re.compile(pattern)
        deadline = pace.deadline(timeout)
        while time.monotonic() < deadline:
            if rx.search(self.text()):
                return True
            if self.poll() is not None:
                return bool(rx.search(self.text()))
            time.sleep(0.1)
        return False

    def until(
        self,
        done: Callable[[], bool],
        timeout: float,
        what: str | Callable[[], str],
        tick: Callable[[], None] | None = None,
    ) -> tuple[bool, str]:
        """(killed, error) of a run that should reach `done()`: ("", False) once it holds and the process still
        runs half a second later (a cut right after the last write has taken it by then); (True, "") when the
        sweep's SIGKILL ended it; else what went wrong. `tick` runs every turn (a test's input to the flow).
        The process is stopped either way."""
        deadline = pace.deadline(timeout)
        try:
            while time.monotonic() < deadline:
                if tick is not None:
                    tick()
                if done():
                    time.sleep(0.5)
                    if self.poll() is None:
                        return False, ""
                rc = self.poll()
                if rc is not None:
                    self.reap()
                    return (True, "") if rc == -9 else (False, f"exited {rc}:\n{self.text()[-1500:]}")
                time.sleep(0.05)
            why = what() if callable(what) else what
            return False, f"{why} within {timeout:g} s:\n{self.text()[-1500:]}"
        finally:
            self.stop()

    def poll(self) -> int | None:
        """The exit status once the process has ended, else None. Whatever its group left (a `keys`
        child) is killed first, like after a power cut, and only then is the leader reaped: while it is
        an unreaped zombie its PID cannot be reused, so the group kill cannot reach a stranger. (With
        pid_max 32768 the suite wraps PIDs; a kill sent to a reaped leader's PID once took down a
        container booted by another test.)"""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return self.proc.returncode
        if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.pgid_file:
            self.pgid_file.write_text("")  # nobody may kill this number once it is free again
        return self.proc.wait()

    def wait(self, timeout: float) -> int:
        deadline = pace.deadline(timeout)
        while (rc := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            time.sleep(0.05)
        return rc

    def stop(self, timeout: float = 20.0) -> int:
        if self.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.reap()
        return self.proc.returncode

    def reap(self) -> None:
        """The whole group gone, like after a power cut: the leader too, if it still runs."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the leader is not reaped yet: its PID is ours
            self.wait(10)


def sweep_env(base: dict[str, str], ops_log: Path, root: Path, kill_after: int | None) -> dict[str, str]:
    from agent.base import killpoints

    env = {
        **base,
        killpoints.LOG_ENV: str(ops_log),
        killpoints.ROOT_ENV: str(root),
        killpoints.GROUP_ENV: "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if kill_after:
        env[killpoints.KILL_ENV] = str(kill_after)
    return env


@dataclass
class Outcome:
    n: int
    killed: bool
    op: str = ""  # the operation after which it died
    error: str = ""
    crash: str = ""  # the swept run died by itself (a signal other than the sweep's): recovery is still checked


@dataclass
class SweepResult:
    flow: str
    outcomes: list[Outcome] = field(default_factory=list)
    crashes: list[Outcome] = field(default_factory=list)  # runs that died by themselves (then run again)

    @property
    def kill_points(self) -> int:
        return sum(1 for o in self.outcomes if o.killed)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]

    def summary(self) -> str:
        ops = ", ".join(f"{o.n}:{o.op.split()[1] if len(o.op.split()) > 1 else '?'}" for o in self.outcomes if o.killed)
        crashes = self.crashes + [o for o in self.outcomes if o.crash]
        extra = (
            (
                f"; {len(crashes)} run(s) crashed by themselves ({', '.join(sorted({o.crash for o in crashes}))}) "
                "and recovered"
            )
            if crashes
            else ""
        )
        return (
            (
                f"sweep {self.flow}: {self.kill_points} kill points, all recovered"
                if not self.failures
                else f"sweep {self.flow}: {len(self.failures)} of {self.kill_points} kill points did not recover"
            )
            + extra
            + f" [{ops}]"
        )


SUMMARIES: list[str] = []  # printed at the end of the test run (conftest.pytest_terminal_summary)


def sweep(flow: str, case: Callable[[int], Outcome], workers: int = 4, limit: int = 150) -> SweepResult:
    """Run case(N) for N = 1.. on `workers` threads until one completes without being killed.

    A pipeline, not batches: the next N starts as soon as any run ends, so one slow run never holds
    the others up. Once some N completes uncut no larger N is started; every smaller N still runs to
    its end (each is a kill point)."""
    result = SweepResult(flow)
    done: dict[int, Outcome] = {}
    retried: set[int] = set()
    completed: int | None = None  # the smallest N that finished without a cut
    with ThreadPoolExecutor(workers) as pool:
        pending: dict[Future, int] = {}
        nxt = 1

        def fill() -> None:
            nonlocal nxt
            while len(pending) < workers and completed is None and nxt <= limit:
                pending[pool.submit(case, nxt)] = nxt
                nxt += 1

        fill()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                n = pending.pop(fut)
                o = fut.result()
                if o.crash and n not in retried:  # it never reached its cut point: run it again
                    result.crashes.append(o)
                    retried.add(n)
                    pending[pool.submit(case, n)] = n
                    continue
                done[n] = o
                if not o.killed and not o.error and (completed is None or n < completed):
                    completed = n
            fill()
    if completed is None:
        raise AssertionError(f"{flow}: still killed after {limit} operations; is the flow looping?")
    # Beyond the first completed run, outcomes are runs that finished without a kill: not kill points.
    result.outcomes = [done[n] for n in sorted(done) if n <= completed]
    print(result.summary())
    SUMMARIES.append(result.summary().split(" [")[0])
    return result


def op_at(ops_log: Path, n: int) -> str:
    from agent.base import killpoints

    ops = killpoints.count(str(ops_log))
    return ops[n - 1] if 0 < n <= len(ops) else ""


def flush_tpm(token) -> None:
    """A device's kernel resource manager (/dev/tpmrm0) flushes a dead process's objects; swtpm has none."""
    if token.tpm:
        token.tpm.tools("tpm2_flushcontext", "-t")
        token.tpm.tools("tpm2_flushcontext", "-s")


_lock = threading.Lock()
_serial = [0]


def next_serial(prefix: str) -> str:
    with _lock:
        _serial[0] += 1
        return f"{prefix}{os.getpid() % 1000:03d}{_serial[0]:04d}"
