"""Device Defender device-side metrics: collect from the OS, build AWS's report, publish on a timer.

`build_report` is pure (snapshot in, report document out) and is checked against the local
cloud's specification validator. Collection reads the kernel's tables once per report (procfs; the
old aws-samples agent made one psutil.net_connections call per kind; psutil is the fallback off
Linux); the reporter thread sleeps on an Event between reports and never polls. report_id is
epoch seconds, or last + 1 if the clock stepped back, and is persisted so it keeps increasing
across restarts.

A report goes to each of `destinations`: Device Defender Detect's reserved topic (which answers
accepted or rejected) and/or a topic of the user's own (no answer; an IoT rule takes it on), as the
same document. `Reporter.reconfigure` swaps the config while the thread runs: the next report uses it.
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
from agent.base.logfmt import escape
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


DEFENDER_FORMATS = ("json", "cbor")


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
    _subscribed_topic: str | None = None  # the Detect topic whose answers we are subscribed to
    _stop: threading.Event = field(default_factory=threading.Event)
    # Set by reconfigure: the sleeping thread recomputes its wait with the new interval at once.
    _wake: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    @property
    def topic(self) -> str:
        """Device Defender Detect's topic for the current format."""
        return self.defender_topic(self.cfg)

    @property
    def response_prefix(self) -> str:
        """What accepted/rejected answers start with, whatever the format (a route that outlives a format change)."""
        return f"$aws/things/{self.thing}/defender/metrics/"

    def defender_topic(self, cfg: DefenderConfig) -> str:
        return f"{self.response_prefix}{cfg.format}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="defender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(10)

    def reconfigure(self, cfg: DefenderConfig) -> None:
        """Use `cfg` from the next report on (thread-safe). The wait is recomputed at once, so a shorter
        interval takes effect now rather than after the old one; report_id and counters carry on."""
        with self._lock:
            old, self.cfg = self.cfg, cfg
            if isinstance(self.collector, Collector):  # its custom metrics come from the config
                self.collector.cfg = cfg
        self._wake.set()
        if old != cfg:
            log.info("Device Defender: now every %g s (%s)", cfg.interval_s, self.describe(cfg))

    def describe(self, cfg: DefenderConfig) -> str:
        """Format, names and destinations, for the log lines that say how reports go out."""
        where = ", ".join(
            f"Detect {self.defender_topic(cfg)}" if d == "defender" else escape(cfg.metrics_topic(self.thing))
            for d in cfg.destinations
        )
        return f"{cfg.format}, {cfg.names} names, to {where}"

    def _config(self) -> DefenderConfig:
        with self._lock:
            return self.cfg

    def _loop(self) -> None:
        while not self._stop.is_set():
            cfg = self._config()
            st = self.load_state()
            last_at = st.get("last_report_at")
            due = (last_at + cfg.interval_s) if last_at else self.now() + min(5.0, cfg.interval_s)
            # Sleep until due (a timer, not a poll); a clock step is tolerated: at most one interval.
            delay = max(0.0, min(due - self.now(), cfg.interval_s))
            if self._wait(delay):
                return
            if self._wake.is_set():  # reconfigured while asleep: work out the wait again with the new config
                self._wake.clear()
                continue
            if not self.connected():
                log.info("not connected; the report due now is skipped")
                self.save_state({**st, "last_report_at": self.now()})
                continue
            try:
                self.report_once()
            except Exception as e:  # one failed report must not end reporting
                log.warning("report failed: %s", e)
                self.save_state({**self.load_state(), "last_report_at": self.now()})

    def _wait(self, delay: float) -> bool:
        """Sleep `delay` s or until stopped (True) or reconfigured (False, early)."""
        if self._stop.is_set():
            return True
        self._wake.wait(delay)
        return self._stop.is_set()

    def report_once(self) -> int:
        """Collect, publish one report to each destination; returns its report_id."""
        cfg = self._config()
        to_defender = "defender" in cfg.destinations
        if to_defender:
            self._subscribe_answers(self.defender_topic(cfg))
        st = self.load_state()
        snap = self.collector.collect()
        prev = st.get("counters")
        boot = _boot_id()
        if prev and st.get("boot_id") == boot:
            deltas = tuple(max(0, a - b) for a, b in zip(snap.counters, prev, strict=True))
        else:
            deltas = snap.counters  # first report of this boot: everything since boot
        rid = next_report_id(self.now(), st.get("last_report_id"))
        doc = build_report(snap, rid, deltas, short=cfg.names == "short", max_list=cfg.max_list)
        if cfg.format == "cbor":
            from agent.base.cbor import dumps

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
        # Each destination gets its try even if another fails; the first failure is then raised (logged by _loop).
        failure: Exception | None = None
        for dest in cfg.destinations:
            try:
                if dest == "defender":
                    rc = self.publish(self.defender_topic(cfg), payload)
                    log.info(
                        "report %d published (%d bytes, %s/%s, PUBACK %d)", rid, len(payload), cfg.format, cfg.names, rc
                    )
                else:
                    topic = cfg.metrics_topic(self.thing)
                    rc = self.publish(topic, payload)
                    log.info(
                        "report %d published to %s (%d bytes, %s/%s, PUBACK %d)",
                        rid,
                        escape(topic),
                        len(payload),
                        cfg.format,
                        cfg.names,
                        rc,
                    )
            except Exception as e:
                if len(cfg.destinations) > 1:
                    log.warning("report %d to %s failed: %s", rid, dest, e)
                failure = failure or e
        if failure is not None:
            raise failure
        return rid

    def _subscribe_answers(self, topic: str) -> None:
        """Subscribe to accepted/rejected of `topic` once per connection, and again when the format changed it."""
        count = self.connection_count()
        if self._subscribed_for != count or self._subscribed_topic != topic:
            for suffix in ("accepted", "rejected"):
                self.subscribe(f"{topic}/{suffix}")
            self._subscribed_for, self._subscribed_topic = count, topic

    def on_response(self, topic: str, payload: bytes) -> None:
        """accepted/rejected answers; a rejection is logged and counted, never retried.

        Decoded by the format the topic names (an answer to a report sent before a format change may arrive after)."""
        fmt = topic[len(self.response_prefix) :].split("/", 1)[0] if topic.startswith(self.response_prefix) else ""
        if fmt not in DEFENDER_FORMATS:
            fmt = self._config().format
        doc = _decode(payload, fmt)
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
    from agent.base.cbor import loads_map

    try:
        return loads_map(payload)
    except ValueError:
        return {}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(int(time.time() - time.monotonic()))
