"""Processes and ports for the bench: free loopback ports, and children stopped by PID."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import pace

REPO = Path(__file__).resolve().parent.parent


def sysroot() -> Path:
    """Where scripts/sysdeps.sh unpacked daemons that must not be installed as system services."""
    return Path(os.environ.get("BED_SYSROOT", REPO / ".deps" / "sysroot"))


def find_binary(name: str) -> str:
    """A daemon from the project's sysroot, else from PATH; a clear error when neither has it."""
    for d in ("usr/sbin", "usr/bin", "sbin", "bin"):
        p = sysroot() / d / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found; run scripts/sysdeps.sh (make test does) to install the bench's packages"
    )


_handed_out: dict[int, float] = {}
_handed_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(kind: int = socket.SOCK_STREAM, pairs: bool = False) -> int:
    """A port free on 127.0.0.1 now (and its successor, when `pairs`), chosen outside the kernel's
    ephemeral range: a port from bind(0) is also what the kernel hands to outgoing connections, so a
    client socket opened between this check and the server's bind could take it (seen: swtpm's control
    port lost to a concurrent connection during the kill sweeps). A port handed out in the last ten
    minutes is not handed out again, so threads that start servers side by side never race for one."""
    lo, _ = _ephemeral_range()
    low, high = (10000, lo - 2) if lo > 12000 else (61000, 65533)
    low, high = _worker_slice(low, high)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randint(low, high)
        wanted = (port, port + 1) if pairs else (port,)
        with _handed_lock:
            now = time.monotonic()
            for p, at in list(_handed_out.items()):
                if now - at > 600:
                    del _handed_out[p]
            if any(p in _handed_out for p in wanted):
                continue
            if not all(_bindable(kind, p) for p in wanted):
                continue
            for p in wanted:
                _handed_out[p] = now
            return port
    raise RuntimeError("no free loopback port found")


def _worker_slice(low: int, high: int) -> tuple[int, int]:
    """Test processes run side by side (pytest-xdist) each take ports from their own slice, so two
    of them never pick the same port between the check and the bind."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1):
        return low, high
    size = (high - low) // int(count)
    start = low + size * (int(worker[2:]) % int(count))
    return start, start + size - 2


def _bindable(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = pace.deadline(timeout)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {pace.scaled(timeout):g} s")


@dataclass
class Child:
    """A started process we own; stop() ends it by PID, politely first."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)

    def log_text(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""


def start(
    name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return Child(name, proc, log_path)
