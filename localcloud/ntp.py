"""NTP servers for the bench: a real chronyd on loopback, and a scriptable responder.

chronyd comes from Debian but is unpacked into the project's sysroot, not installed: installing
the package would remove systemd-timesyncd. With `-x` it never touches the host clock; with
`local stratum` it serves the host's time on an unprivileged loopback port.

`NtpResponder` answers like a server but lets a test choose: silent, skewed by N seconds, good,
or claiming to be unsynchronised; it is how the clock gate is shown to hold and then open.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import pace, procs

NTP_EPOCH_OFFSET = 2208988800


def _ntp_ts(t: float) -> bytes:
    t += NTP_EPOCH_OFFSET
    sec = int(t)
    return struct.pack("!II", sec, int((t - sec) * 2**32) & 0xFFFFFFFF)


@dataclass
class Chrony:
    directory: Path
    port: int = 0
    child: procs.Child | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Chrony:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = procs.free_port(socket.SOCK_DGRAM)
        conf = self.directory / "chrony.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bindaddress 127.0.0.1",
                    "allow 127.0.0.1",
                    "local stratum 8",
                    "cmdport 0",
                    f"pidfile {self.directory / 'chronyd.pid'}",
                    f"driftfile {self.directory / 'drift'}",
                ]
            )
            + "\n"
        )
        argv = [procs.find_binary("chronyd"), "-x", "-d", "-f", str(conf)]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # no _chrony user: the package is unpacked, not installed
        else:
            argv += ["-U"]
        self.child = procs.start("chronyd", argv, self.directory / "chronyd.log")
        self._wait_answering(timeout)
        return self

    def _wait_answering(self, timeout: float) -> None:
        import ntplib

        deadline = pace.deadline(timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.child and not self.child.running():
                raise RuntimeError(f"chronyd exited: {self.child.log_text()[-500:]}")
            try:
                st = ntplib.NTPClient().request("127.0.0.1", version=4, port=self.port, timeout=0.5)
                if st.leap != 3 and 1 <= st.stratum <= 15:
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"chronyd on {self.port} did not answer within {timeout} s ({last})")

    def stop(self) -> None:
        if self.child:
            self.child.stop()
            self.child = None


class NtpResponder:
    """A UDP NTP server on loopback whose behaviour a test switches at run time."""

    def __init__(self, mode: str = "good", skew_s: float = 0.0, stratum: int = 2, leap: int = 0):
        self.mode = mode  # "good", "silent"
        self.skew_s = skew_s
        self.stratum = stratum
        self.leap = leap
        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ntp-responder", daemon=True)
        self._thread.start()

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(
        self, mode: str | None = None, skew_s: float | None = None, stratum: int | None = None, leap: int | None = None
    ) -> None:
        if mode is not None:
            self.mode = mode
        if skew_s is not None:
            self.skew_s = skew_s
        if stratum is not None:
            self.stratum = stratum
        if leap is not None:
            self.leap = leap

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(512)
            except (TimeoutError, OSError):
                continue
            self.requests += 1
            if self.mode == "silent" or len(data) < 48:
                continue
            now = time.time() + self.skew_s
            version = (data[0] >> 3) & 7
            first = (self.leap << 6) | (version << 3) | 4  # mode 4: server
            pkt = struct.pack("!BBbb", first, self.stratum, 6, -20)
            pkt += struct.pack("!II", 0, 0) + b"LOCL"
            pkt += _ntp_ts(now - 1)  # reference time
            pkt += data[40:48]  # origin = the client's transmit timestamp
            pkt += _ntp_ts(now)  # receive
            pkt += _ntp_ts(now)  # transmit
            with contextlib.suppress(OSError):
                self.sock.sendto(pkt, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
