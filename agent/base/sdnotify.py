"""systemd's notify protocol (sd_notify) in a few lines of stdlib: READY, STATUS, WATCHDOG, STOPPING.

Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op. The watchdog is fed by a small thread
only while the agent's main loop keeps beating (`beat()`): if the loop hangs, the pings stop and
systemd restarts the service, which is the point of WatchdogSec=. Long waits that are part of normal
work (the clock gate, provisioning backoff) beat from their own loops.
"""

from __future__ import annotations

import os
import socket
import threading
import time

_last_beat = time.monotonic()
_busy_until = 0.0
_lock = threading.Lock()
_status = ""


def _send(message: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def ready(status: str) -> None:
    status_line(status, extra="READY=1\n")


def status_line(status: str, extra: str = "") -> None:
    """STATUS= for `systemctl status`; repeated identical lines are not re-sent."""
    global _status
    status = status.replace("\n", " ")[:200]
    with _lock:
        if status == _status and not extra:
            return
        _status = status
    _send(f"{extra}STATUS={status}")


def stopping() -> None:
    _send("STOPPING=1\nSTATUS=stopping")


def beat() -> None:
    """The main loop is alive."""
    global _last_beat
    _last_beat = time.monotonic()


def expect_busy(seconds: float) -> None:
    """A bounded step (a provisioning exchange, a key generation) may block the main loop this long."""
    global _busy_until
    _busy_until = time.monotonic() + seconds


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    # Under iot-agent-launch systemd names the launcher (our parent) as the watchdog's process.
    if not usec or not usec.isdigit() or (pid and pid not in (str(os.getpid()), str(os.getppid()))):
        return None
    return int(usec) / 1e6


def start_watchdog(stop: threading.Event) -> threading.Thread | None:
    """Ping WATCHDOG=1 at half the interval while beats are fresher than the interval."""
    interval = watchdog_interval()
    if not interval:
        return None
    beat()

    def run() -> None:
        while not stop.wait(interval / 2):
            now = time.monotonic()
            if now - _last_beat < interval or now < _busy_until:
                _send("WATCHDOG=1")

    t = threading.Thread(target=run, name="watchdog", daemon=True)
    t.start()
    return t
