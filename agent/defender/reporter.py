"""Device Defender device-side metrics: collect from the OS, build AWS's report, publish on a timer.

`build_report` is pure (snapshot in, report document out) and is checked against the local
cloud's specification validator. Collection reads the kernel's tables once per report (procfs; the
old aws-samples agent made one psutil.net_connections call per kind; psutil is the fallback off
Linux); the reporter thread sleeps on an Event between reports and never polls. report_id is
epoch seconds, or last + 1 if the clock stepped back, and is persisted so it keeps increasing
across restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.defender import procfs
from agent.defender.config import DefenderConfig

log = logging.getLogger("agent.defender")

SHORT = {
    "header": "hed",
    "report_id": "rid",
    "version": "v",
    "metrics": "met",
    "custom_metrics": "cmet",
    "tcp_connections": "tc",
    "established_connections": "ec",
    "connections": "cs",
    "remote_addr": "rad",
    "local_port": "lp",
    "local_interface": "li",
    "total": "t",
    "listening_tcp_ports": "tp",
    "listening_udp_ports": "up",
    "ports": "pts",
    "port": "pt",
    "interface": "if",
    "network_stats": "ns",
    "bytes_in": "bi",
    "bytes_out": "bo",
    "packets_in": "pi",
    "packets_out": "po",
}


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What one collection saw; plain data so report building is pure."""

    tcp_listen: list[tuple[int, str | None]]  # (port, interface)
    udp_listen: list[tuple[int, str | None]]
    established: list[tuple[str, int, str | None]]  # (remote "ip:port", local port, interface)
    counters: tuple[int, int, int, int]  # bytes_recv, bytes_sent, packets_recv, packets_sent (since boot)
    custom: dict[str, Any]  # name -> {"number": x} | {"number_list": [...]} | ...


def remote_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def build_report(
    snap: Snapshot, report_id: int, deltas: tuple[int, int, int, int], *, short: bool, max_list: int
) -> dict:
    """AWS's report document, long or short names, lists capped at `max_list` with full totals."""
    n = (lambda k: SHORT[k]) if short else (lambda k: k)

    def ports(entries):
        out = []
        for port, iface in entries[:max_list]:
            e = {n("port"): port}
            if iface:
                e[n("interface")] = iface
            out.append(e)
        return {n("ports"): out, n("total"): len(entries)}

    conns = []
    for raddr, lport, iface in snap.established[:max_list]:
        c = {n("remote_addr"): raddr, n("local_port"): lport}
        if iface:
            c[n("local_interface")] = iface
        conns.append(c)
    metrics = {
        n("tcp_connections"): {
            n("established_connections"): {n("connections"): conns, n("total"): len(snap.established)}
        },
        n("listening_tcp_ports"): ports(snap.tcp_listen),
        n("listening_udp_ports"): ports(snap.udp_listen),
        n("network_stats"): dict(
            zip(
                (n("bytes_in"), n("bytes_out"), n("packets_in"), n("packets_out")),
                (max(0, d) for d in deltas),
                strict=True,
            )
        ),
    }
    doc = {n("header"): {n("report_id"): report_id, n("version"): "1.0"}, n("metrics"): metrics}
    if snap.custom:
        doc[n("custom_metrics")] = {k: [v] for k, v in snap.custom.items()}
    return doc


def next_report_id(now: float, last: int | None) -> int:
    """Epoch seconds, as AWS recommends, but strictly after the last one even if the clock went back."""
    rid = int(now)
    return rid if last is None or rid > last else last + 1


def cert_not_after(pem_or_der: bytes) -> float | None:
    from agent.base.x509lite import not_after

    return not_after(pem_or_der)


@dataclass(eq=False)
class Collector:
    """The OS at the edge (Linux's tables, psutil elsewhere); everything it returns is plain data."""

    cfg: DefenderConfig
    state_dir: Path
    certificate_file: Path | None = None
    _iface_by_ip: dict[str, str] = field(default_factory=dict)
    _iface_at: float = 0.0
    _cert: tuple[float, float | None] = (0.0, None)  # (mtime, notAfter)
    linux: bool = field(default_factory=procfs.available)
    _cpu: procfs.CpuMeter = field(default_factory=procfs.CpuMeter)

    def interfaces(self) -> dict[str, str]:
        if time.monotonic() - self._iface_at > 60 or not self._iface_by_ip:
            if self.linux:
                m = procfs.interface_addresses()
            else:
                import psutil

                m = {}
                for name, addrs in psutil.net_if_addrs().items():
                    for a in addrs:
                        if a.family in (socket.AF_INET, socket.AF_INET6):
                            m[a.address.split("%")[0]] = name
            self._iface_by_ip, self._iface_at = m, time.monotonic()
        return self._iface_by_ip

    def collect(self) -> Snapshot:
        ifaces = self.interfaces()
        sockets = procfs.read_proc_net() if self.linux else None
        if sockets is not None:
            tcp_listen = {(port, ifaces.get(ip)) for ip, port in sockets[0]}
            udp_listen = {(port, ifaces.get(ip)) for ip, port in sockets[1]}
            established = [(remote_addr(rip, rport), lport, ifaces.get(lip)) for lip, lport, rip, rport in sockets[2]]
        else:
            tcp_listen, udp_listen, established = self._psutil_sockets(ifaces)
        counters = procfs.net_io_counters() if self.linux else None
        if counters is None:
            import psutil

            io = psutil.net_io_counters()
            counters = (io.bytes_recv, io.bytes_sent, io.packets_recv, io.packets_sent)
        return Snapshot(
            sorted(tcp_listen, key=lambda x: (x[0], x[1] or "")),
            sorted(udp_listen, key=lambda x: (x[0], x[1] or "")),
            established,
            counters,
            self.custom(),
        )

    def _psutil_sockets(self, ifaces: dict[str, str]):
        """Portable path (non-Linux): psutil maps every socket to its process, which costs more."""
        import psutil

        tcp_listen, udp_listen, established = set(), set(), []
        for c in psutil.net_connections(kind="inet"):
            if not c.laddr:
                continue
            ip, port = c.laddr.ip, c.laddr.port
            iface = ifaces.get(ip)
            if c.type == socket.SOCK_STREAM:
                if c.status == psutil.CONN_LISTEN:
                    tcp_listen.add((port, iface))
                elif c.status == psutil.CONN_ESTABLISHED and c.raddr:
                    established.append((remote_addr(c.raddr.ip, c.raddr.port), port, iface))
            elif c.type == socket.SOCK_DGRAM and not c.raddr and port:
                udp_listen.add((port, iface))
        return tcp_listen, udp_listen, established

    def custom(self) -> dict[str, Any]:
        memory = procfs.memory_used_percent() if self.linux else None
        if self.linux:
            cpu = self._cpu.percent()
        else:
            import psutil

            cpu = psutil.cpu_percent(interval=None)
            memory = psutil.virtual_memory().percent
        out: dict[str, Any] = {"cpu_usage": {"number": round(cpu, 1)}}
        if memory is not None:
            out["memory_used_percent"] = {"number": round(memory, 1)}
        out["agent_version"] = {"string_list": [__version__]}
        with contextlib.suppress(OSError):
            out["state_disk_free_mb"] = {"number": procfs.disk_free_bytes(self.state_dir) // (1024 * 1024)}
        days = self.cert_days_left()
        if days is not None:
            out["cert_days_to_expiry"] = {"number": days}
        for name, number in self.cfg.custom_number.items():
            out[name] = {"number": number}
        for name, numbers in self.cfg.custom_number_list.items():
            out[name] = {"number_list": list(numbers)}
        for name, strings in self.cfg.custom_string_list.items():
            out[name] = {"string_list": list(strings)}
        for name, ips in self.cfg.custom_ip_list.items():
            out[name] = {"ip_list": list(ips)}
        return out

    def cert_days_left(self) -> int | None:
        p = self.certificate_file
        if not p:
            return None
        try:
            mtime = p.stat().st_mtime
        except OSError:
            return None
        if self._cert[0] != mtime:
            self._cert = (mtime, cert_not_after(p.read_bytes()))
        na = self._cert[1]
        return None if na is None else int((na - time.time()) // 86400)


@dataclass(eq=False)
class Reporter:
    """Publishes a report every interval while connected; counts accepted and rejected answers."""

    cfg: DefenderConfig
    thing: str
    collector: Collector
    publish: Callable[[str, bytes], int]  # (topic, payload) -> PUBACK code
    subscribe: Callable[[str], int]
    connected: Callable[[], bool]
    connection_count: Callable[[], int]
    load_state: Callable[[], dict]
    save_state: Callable[[dict], object]  # what it returns (StateStore.update's new state) is unused
    now: Callable[[], float] = time.time
    accepted: int = 0
    rejected: int = 0
    last_rejection: str | None = None
    _subscribed_for: int = -1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def topic(self) -> str:
        return f"$aws/things/{self.thing}/defender/metrics/{self.cfg.format}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="defender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            st = self.load_state()
            last_at = st.get("last_report_at")
            due = (last_at + self.cfg.interval_s) if last_at else self.now() + min(5.0, self.cfg.interval_s)
            # Sleep until due (a timer, not a poll); a clock step is tolerated: at most one interval.
            delay = max(0.0, min(due - self.now(), self.cfg.interval_s))
            if self._stop.wait(delay):
                return
            if not self.connected():
                log.info("not connected; the report due now is skipped")
                self.save_state({**st, "last_report_at": self.now()})
                continue
            try:
                self.report_once()
            except Exception as e:  # one failed report must not end reporting
                log.warning("report failed: %s", e)
                self.save_state({**self.load_state(), "last_report_at": self.now()})

    def report_once(self) -> int:
        """Collect, publish one report; returns its report_id."""
        if self._subscribed_for != self.connection_count():
            for suffix in ("accepted", "rejected"):
                self.subscribe(f"{self.topic}/{suffix}")
            self._subscribed_for = self.connection_count()
        st = self.load_state()
        snap = self.collector.collect()
        prev = st.get("counters")
        boot = _boot_id()
        if prev and st.get("boot_id") == boot:
            deltas = tuple(max(0, a - b) for a, b in zip(snap.counters, prev, strict=True))
        else:
            deltas = snap.counters  # first report of this boot: everything since boot
        rid = next_report_id(self.now(), st.get("last_report_id"))
        doc = build_report(snap, rid, deltas, short=self.cfg.names == "short", max_list=self.cfg.max_list)
        if self.cfg.format == "cbor":
            from agent.defender.cbor import dumps

            payload = dumps(doc)
        else:
            payload = json.dumps(doc, separators=(",", ":")).encode()
        # Write ahead: the id and counters are recorded before the report leaves, so a crash never reuses an id.
        self.save_state(
            {
                **st,
                "last_report_id": rid,
                "last_report_at": self.now(),
                "counters": list(snap.counters),
                "boot_id": boot,
            }
        )
        rc = self.publish(self.topic, payload)
        log.info(
            "report %d published (%d bytes, %s/%s, PUBACK %d)", rid, len(payload), self.cfg.format, self.cfg.names, rc
        )
        return rid

    def on_response(self, topic: str, payload: bytes) -> None:
        """accepted/rejected answers; a rejection is logged and counted, never retried."""
        doc = _decode(payload, self.cfg.format)
        if topic.endswith("/accepted"):
            self.accepted += 1
            log.info("report %s accepted", doc.get("reportId"))
        elif topic.endswith("/rejected"):
            self.rejected += 1
            details = doc.get("statusDetails") or {}
            self.last_rejection = f"{details.get('ErrorCode', '?')}: {details.get('ErrorMessage', '')}"
            log.warning(
                "report %s rejected: %s (rejections so far: %d; not retried)",
                doc.get("reportId"),
                self.last_rejection,
                self.rejected,
            )


def _decode(payload: bytes, fmt: str) -> dict:
    if fmt == "json":
        try:
            d = json.loads(payload)
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}
    from agent.defender.cbor import loads_map

    try:
        return loads_map(payload)
    except ValueError:
        return {}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(int(time.time() - time.monotonic()))
