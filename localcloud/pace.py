"""Waits that scale with the machine's speed.

The local cloud's and the tests' waits (a port to open, a broker or chrony to start, a message or a
log line to appear, a process to exit) were sized on a 2-core x86_64 machine. Under qemu-user (make
check-arm64) or on a slow board the same work takes several times longer, and a wait that is merely
generous here becomes a false failure there. Raising every number would make a hang on a fast machine
take longer to report, so each wait is instead multiplied by one factor: how much slower than the
reference machine this one runs a fixed piece of Python, measured once and never below 1.

IOT_AGENT_TIME_SCALE overrides the measurement (a number from 1 to 100). The measured factor is
written back to that variable, so processes started from here (xdist workers, the local cloud, the
demo's children) inherit it instead of measuring again.
"""

from __future__ import annotations

import os
import time

ENV = "IOT_AGENT_TIME_SCALE"
# The calibration loop's best time of three on the reference machine (2-core x86_64, Python 3.11).
REFERENCE_S = 0.0045
# Below this ratio the machine counts as the reference: timer noise must not stretch waits.
DEAD_BAND = 2.0
MAX_FACTOR = 30.0

_factor: float | None = None


def _loop() -> float:
    start = time.perf_counter()
    x = 0
    for i in range(100_000):
        x += i * i % 7
    return time.perf_counter() - start


def measure() -> float:
    """The slowdown against the reference machine: best of three runs, so a busy moment counts less."""
    ratio = min(_loop() for _ in range(3)) / REFERENCE_S
    if ratio < DEAD_BAND:
        return 1.0
    return min(MAX_FACTOR, float(round(ratio + 0.5)))


def factor() -> float:
    global _factor
    if _factor is None:
        raw = os.environ.get(ENV, "")
        try:
            value = float(raw) if raw else 0.0
        except ValueError:
            value = 0.0
        if not 1.0 <= value <= 100.0:
            if raw:
                raise ValueError(f"{ENV} must be a number from 1 to 100, not {raw!r}")
            value = measure()
            os.environ[ENV] = str(value)
        _factor = value
    return _factor


def scaled(seconds: float) -> float:
    return seconds * factor()


def deadline(seconds: float) -> float:
    """time.monotonic()'s value when a wait of `seconds` (on the reference machine) should give up."""
    return time.monotonic() + scaled(seconds)
