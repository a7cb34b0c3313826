"""Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

Full jitter spreads a fleet's retries after a shared outage: every device picks a random delay in
[0, min(cap, base * 2**attempt)], so a thousand gateways rebooting together do not hammer the
endpoint in lock-step. The MQTT reconnect uses the CRT's own implementation of the same scheme;
this one serves the agent's other retry loops (NTP, later status delivery).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


def _uniform01() -> float:
    """A uniform float in [0, 1) from the OS's CSPRNG (avoids importing `random` into the daemon)."""
    return int.from_bytes(os.urandom(7), "big") / float(1 << 56)


@dataclass(eq=False)
class Backoff:
    base_s: float
    cap_s: float
    floor_s: float = 0.05  # never retry instantly: a zero delay is a retry storm waiting to happen
    uniform01: Callable[[], float] = _uniform01  # tests pass random.Random(seed).random
    attempt: int = 0

    def ceiling(self) -> float:
        return min(self.cap_s, self.base_s * (2 ** min(self.attempt, 62)))

    def next_delay(self) -> float:
        """The delay before the next try; each call widens the window until it reaches the cap."""
        d = self.uniform01() * self.ceiling()
        self.attempt += 1
        return max(self.floor_s, d)

    def reset(self) -> None:
        self.attempt = 0
