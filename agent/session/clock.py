"""The clock gate: no TLS connection before the time is trustworthy.

Certificate validity checks are only as good as the clock. A gateway without a real-time clock boots
in 1970 (or at its last shutdown time), and connecting then either fails in confusing ways or,
worse, accepts a certificate that has expired or been replaced. The gate therefore waits until an
NTP server agrees with the system clock within `max_skew_s`, and the clock is past a floor date
built into this release. The agent is unprivileged and never sets the clock: a host daemon
(systemd-timesyncd, chrony) does, and with `source = "system"` the gate trusts that daemon once the
kernel reports the clock synchronised.

The judging functions are pure; `query_ntp` and `kernel_clock_synchronised` are the I/O edges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import ntplib

from agent.base.backoff import Backoff
from agent.base.config import ClockConfig, split_server
from agent.base.errors import ClockError

log = logging.getLogger("agent.clock")

# Time before this instant is certainly wrong: this release did not exist yet.
FLOOR = datetime(2026, 11, 1, tzinfo=UTC).timestamp()

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01


@dataclass(frozen=True, eq=False)
class NtpAnswer:
    server: str
    offset: float  # server time minus local time, seconds
    stratum: int
    leap: int
    origin_matches: bool  # the reply echoes our request's transmit time (not a blind or replayed packet)


def judge_answer(a: NtpAnswer, max_skew_s: float) -> str | None:
    """Why this answer cannot vouch for the clock, or None when it can."""
    if not a.origin_matches:
        return f"{a.server} answered a request we did not send (origin timestamp mismatch)"
    if a.leap == 3:
        return f"{a.server} says it is not synchronised itself (leap indicator 3)"
    if not 1 <= a.stratum <= 15:
        return f"{a.server} sent stratum {a.stratum} (kiss-of-death or unsynchronised)"
    if abs(a.offset) > max_skew_s:
        side = "behind" if a.offset > 0 else "ahead of"
        return f"system clock is {abs(a.offset):.1f} s {side} {a.server} (max skew {max_skew_s:g} s)"
    return None


def judge_floor(now: float, floor: float = FLOOR) -> str | None:
    if now < floor:
        when = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S")
        return f"system clock reads {when} UTC, before this release's floor date; waiting for NTP to set it"
    return None


def query_ntp(server: str, timeout: float) -> NtpAnswer:
    """Ask one server; raises OSError/ntplib.NTPException when it is silent or unreachable."""
    host, port = split_server(server)
    before = time.time()
    stats = ntplib.NTPClient().request(host, version=4, port=port, timeout=timeout)
    after = time.time()
    sent_min, sent_max = before + NTP_EPOCH_OFFSET, after + NTP_EPOCH_OFFSET
    origin_ok = sent_min - 0.001 <= stats.orig_timestamp <= sent_max + 0.001
    return NtpAnswer(
        server=server, offset=stats.offset, stratum=stats.stratum, leap=stats.leap, origin_matches=origin_ok
    )


STA_UNSYNC = 0x0040
TIME_ERROR = 5


TIMESYNCD_FLAG = "/run/systemd/timesync/synchronized"


def kernel_clock_synchronised() -> bool:
    """True when a host NTP daemon keeps the clock in sync.

    systemd-timesyncd touches its flag file on first sync (what systemd-time-wait-sync waits
    for); chronyd and timesyncd both clear the kernel's STA_UNSYNC once they discipline the clock.
    Neither check needs privilege.
    """
    import os

    if os.path.exists(TIMESYNCD_FLAG):
        return True
    import ctypes  # only the "system" clock source needs it

    class Timex(ctypes.Structure):
        # Leading fields of struct timex (linux/timex.h); the kernel writes into the padding too.
        _fields_ = [
            ("modes", ctypes.c_uint),
            ("offset", ctypes.c_long),
            ("freq", ctypes.c_long),
            ("maxerror", ctypes.c_long),
            ("esterror", ctypes.c_long),
            ("status", ctypes.c_int),
            ("_rest", ctypes.c_byte * 256),
        ]

    tx = Timex()
    libc = ctypes.CDLL(None, use_errno=True)
    state = libc.adjtimex(ctypes.byref(tx))
    return state not in (-1, TIME_ERROR) and not (tx.status & STA_UNSYNC)


@dataclass(eq=False)
class ClockGate:
    cfg: ClockConfig
    query: Callable[[str, float], NtpAnswer] = query_ntp
    synchronised: Callable[[], bool] = kernel_clock_synchronised
    now: Callable[[], float] = time.time
    floor: float = FLOOR
    on_wait: Callable[[str, float], None] | None = None  # (reason, delay) for status reporting

    def check_once(self) -> tuple[bool, str]:
        """One round over every server: (trusted, why)."""
        bad_floor = judge_floor(self.now(), self.floor)
        if self.cfg.source == "system":
            if not self.synchronised():
                return False, 'host NTP daemon has not synchronised the system clock yet (clock.source = "system")'
            return (False, bad_floor) if bad_floor else (True, "system clock synchronised by the host NTP daemon")
        reasons = []
        for server in self.cfg.ntp_servers:
            try:
                a = self.query(server, self.cfg.query_timeout_s)
            except Exception as e:  # silence, DNS failure, refused, malformed reply: all mean "not this one"
                reasons.append(f"{server}: no usable answer ({_short(e)})")
                continue
            why = judge_answer(a, self.cfg.max_skew_s)
            if why is None:
                if bad_floor:  # the server agrees with a clock before the floor: a lying server
                    reasons.append(bad_floor)
                    continue
                return True, f"{server} agrees with the system clock (offset {a.offset * 1000:+.1f} ms)"
            reasons.append(why)
        return False, "; ".join(reasons) or (bad_floor or "no NTP server configured")

    def wait(self, stop: threading.Event | None = None) -> str:
        """Block until the clock is trusted; returns why. Raises ClockError after max_wait_s (0 = never)."""
        stop = stop or threading.Event()
        backoff = Backoff(self.cfg.retry_min_s, self.cfg.retry_max_s)
        start = time.monotonic()
        while True:
            ok, why = self.check_once()
            if ok:
                log.info("clock trusted: %s", why)
                return why
            delay = backoff.next_delay()
            if self.cfg.max_wait_s:
                left = self.cfg.max_wait_s - (time.monotonic() - start)
                if left <= 0:
                    raise ClockError(f"clock not trusted after {self.cfg.max_wait_s:g} s: {why}")
                delay = min(delay, left)
            log.warning("waiting for a trustworthy clock: %s; next check in %.1f s", why, delay)
            if self.on_wait:
                self.on_wait(why, delay)
            if wait_beating(stop, delay):
                raise ClockError("stopped while waiting for a trustworthy clock")


def wait_beating(stop: threading.Event, delay: float) -> bool:
    """stop.wait(delay) in short steps that tell the systemd watchdog this wait is normal work."""
    from agent.base import sdnotify

    end = time.monotonic() + delay
    while True:
        sdnotify.beat()
        left = end - time.monotonic()
        if left <= 0:
            return stop.is_set()
        if stop.wait(min(left, 1.0)):
            return True


def _short(e: Exception) -> str:
    text = str(e) or e.__class__.__name__
    return text if len(text) < 120 else text[:117] + "..."
