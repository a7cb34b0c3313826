"""Linux's own tables for Device Defender's figures: /proc, statvfs and one ioctl, no psutil.

psutil gives the same numbers portably, but importing and using it grows the agent by about 2 MiB
(its C extension, its named tuples, its per-socket process map), which is most of what the agent
holds beyond its MQTT connection on a small gateway. On Linux the kernel's text tables are enough;
psutil stays the fallback where /proc is missing. tests/defender/test_defender.py checks each reader
against psutil on the test machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


def available() -> bool:
    return (PROC / "net/tcp").exists() and (PROC / "stat").exists()


def _hex_ip(h: str) -> str:
    """/proc/net address: IPv4 as one little-endian word, IPv6 as four."""
    raw = bytes.fromhex(h)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    ip = socket.inet_ntop(socket.AF_INET6, words)
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def read_proc_net(base: Path = PROC / "net"):
    """(tcp listening [(ip, port)], udp bound [(ip, port)], tcp established [(lip, lport, rip, rport)]).

    The kernel's socket tables read directly: psutil.net_connections also maps every socket to its
    process by scanning /proc/*/fd, which is most of its cost on a busy gateway and not needed here.
    Returns None if the tables cannot be read.
    """
    tcp_listen, udp_bound, established = [], [], []
    try:
        for name in ("tcp", "tcp6", "udp", "udp6"):
            path = base / name
            if not path.exists():
                continue
            with open(path) as f:
                next(f, None)
                for line in f:
                    parts = line.split(None, 4)
                    if len(parts) < 4:
                        continue
                    lhex, lport = parts[1].split(":")
                    rhex, rport = parts[2].split(":")
                    st = parts[3]
                    if name.startswith("tcp"):
                        if st == TCP_LISTEN:
                            tcp_listen.append((_hex_ip(lhex), int(lport, 16)))
                        elif st == TCP_ESTABLISHED:
                            established.append((_hex_ip(lhex), int(lport, 16), _hex_ip(rhex), int(rport, 16)))
                    elif int(rport, 16) == 0 and int(lport, 16) != 0:
                        udp_bound.append((_hex_ip(lhex), int(lport, 16)))
    except (OSError, ValueError, StopIteration):
        return None
    return tcp_listen, udp_bound, established


SIOCGIFCONF = 0x8912
MAX_INTERFACES = 256  # a gateway with more addresses than this reports the first ones


def interface_addresses() -> dict[str, str]:
    """{address: interface name} for every IPv4 and IPv6 address the machine holds.

    IPv4 from SIOCGIFCONF (what ifconfig used; it lists aliases under their labels such as "eth0:1",
    as getifaddrs does), IPv6 from /proc/net/if_inet6. Errors leave a table empty, never raise: the
    interface name is a detail of the report, not a reason to miss one."""
    out: dict[str, str] = {}
    ifreq = 40 if struct.calcsize("P") == 8 else 32  # struct ifreq: 16-byte name + the union
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        import array
        import fcntl

        table = array.array("B", bytes(ifreq * MAX_INTERFACES))  # the kernel writes into it by address
        ifconf = struct.pack("iP", len(table), table.buffer_info()[0])
        n = struct.unpack("iP", fcntl.ioctl(s.fileno(), SIOCGIFCONF, ifconf))[0]
        buf = table.tobytes()
        for off in range(0, n - n % ifreq, ifreq):
            name = buf[off : off + 16].split(b"\0", 1)[0].decode("ascii", "replace")
            family = struct.unpack_from("H", buf, off + 16)[0]
            if family == socket.AF_INET:
                out[socket.inet_ntop(socket.AF_INET, bytes(buf[off + 20 : off + 24]))] = name
    with contextlib.suppress(OSError, ValueError), open(PROC / "net/if_inet6") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6:
                raw = bytes.fromhex(parts[0])
                out[socket.inet_ntop(socket.AF_INET6, raw)] = parts[5]
    return out


def net_io_counters() -> tuple[int, int, int, int] | None:
    """(bytes received, bytes sent, packets received, packets sent) over every interface, as psutil sums."""
    try:
        with open(PROC / "net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return None
    rb = tb = rp = tp = 0
    for line in lines:
        _, _, data = line.partition(":")
        v = data.split()
        if len(v) >= 10:
            rb, rp, tb, tp = rb + int(v[0]), rp + int(v[1]), tb + int(v[8]), tp + int(v[9])
    return rb, tb, rp, tp


@dataclass
class CpuMeter:
    """Busy share of all CPUs since the previous call, as psutil.cpu_percent(interval=None) gives it:
    busy = everything but idle and iowait; guest time is already inside user and nice."""

    _last: tuple[int, int] | None = None

    def percent(self) -> float:
        try:
            with open(PROC / "stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return 0.0
        if len(v) < 4:
            return 0.0
        total = sum(v[:8])  # user nice system idle iowait irq softirq steal
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        last, self._last = self._last, (total, idle)
        if last is None or total <= last[0]:
            return 0.0
        busy = (total - last[0]) - (idle - last[1])
        return max(0.0, min(100.0, 100.0 * busy / (total - last[0])))


def memory_used_percent() -> float | None:
    """(total - available) / total, psutil.virtual_memory().percent's formula."""
    info: dict[str, int] = {}
    try:
        with open(PROC / "meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return None
    if not info.get("MemTotal") or "MemAvailable" not in info:
        return None
    return 100.0 * (info["MemTotal"] - info["MemAvailable"]) / info["MemTotal"]


def disk_free_bytes(path: Path) -> int:
    """What an unprivileged writer may still use, as psutil.disk_usage().free reports it."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
