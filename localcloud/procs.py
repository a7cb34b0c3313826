"""Processes and ports for the bench: free loopback ports, and children stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    raise FileNotFoundError(f"{name} not found; run scripts/sysdeps.sh (make test does) to install the bench's packages")


_handed_out: dict[int, float] = {}
_handed_lock = threading.Lock()


def free_port(kind: int = socket.SOCK_STREAM, pairs: bool = False) -> int:
    """A port free on 127.0.0.1 now (and its successor, when `pairs`). A port handed out in the last
    minute is not handed out again: threads that start servers side by side (the kill sweeps) would
    otherwise race for the same port between this check and their server's bind."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _handed_lock:
            now = time.monotonic()
            for p, at in list(_handed_out.items()):
                if now - at > 60:
                    del _handed_out[p]
            if port in _handed_out or (pairs and port + 1 in _handed_out):
                continue
            _handed_out[port] = now
            if pairs:
                _handed_out[port + 1] = now
        if not pairs:
            return port
        if port < 65535:
            try:
                with socket.socket(socket.AF_INET, kind) as s2:
                    s2.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free loopback port found")


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


@dataclass
class Child:
    """A started process we own; stop() ends it by PID, politely first."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None = None
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_text(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""


def start(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
        )
    finally:
        out.close()
    return Child(name, proc, log_path)
