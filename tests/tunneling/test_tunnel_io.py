"""The device's tunnel (agent.tunneling.tunnel) against the local cloud's real tunneling endpoint, in
one process so its threads and sockets can be counted: what it refuses (each with a log line and
nothing opened) and how it ends or resumes (the local service closing, the source leaving, the
network dropping for 10 s, the cloud closing the tunnel). The endpoint is localcloud.tunnels with its
fault knobs; the source side is localcloud.tunnel_source; the local services are plain sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

import pytest

from agent.tunneling.config import TunnelingConfig
from agent.tunneling.config import TunnelService as Target
from agent.tunneling.frames import Message, MessageType, frame
from agent.tunneling.tunnel import Tunnel
from localcloud import pace
from localcloud.cloud import LocalCloud
from localcloud.tunnel_source import SourceProxy
from localcloud.tunnels import TunnelRegistry, TunnelService


def _threads() -> int:
    """Python's own threads: awscrt's event-loop threads show up as dummy threads once they call back into
    Python, and live as long as the process (they are the CRT's, shared, not the tunnel's)."""
    return sum(1 for t in threading.enumerate() if not isinstance(t, threading._DummyThread))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_names() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(fd + ":" + os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(out)


def _wait(cond, what: str, timeout: float = 20) -> None:
    deadline = pace.deadline(timeout)
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    names = sorted(t.name for t in threading.enumerate() if not isinstance(t, threading._DummyThread))
    raise AssertionError(f"{what} within {pace.scaled(timeout):g} s (threads: {names})")


class Echo:
    """A local service: echoes, or closes each connection after its first bytes (close_after=True)."""

    def __init__(self, close_after: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.close_after = close_after
        self.accepted = 0
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, c: socket.socket) -> None:
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                c.sendall(data)
                if self.close_after:
                    return

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.sock.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    reg = TunnelRegistry(c.registry.db, c.registry.lock)
    pki = c.directory / "pki"
    svc = TunnelService(reg, pki / "server.pem", pki / "server.key").start()
    yield c, reg, svc
    if svc.running:
        svc.stop()


@pytest.fixture
def baseline(cloud):
    """Threads and descriptors once one tunnel has come and gone (awscrt's shared event loops, resolver and
    random source live as long as the process, as they do beside the agent's MQTT connection); checked
    again after the test's tunnel ended: a tunnel must leave nothing behind."""
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["ECHO"], 600)
    tun = _tunnel(c, svc, t.destination_token, {"ECHO": echo.port})
    src = _source(c, svc, t.source_token, ("ECHO",))
    assert _roundtrip(src.addresses["ECHO"], b"warm") == b"warm"
    src.stop()
    tun.stop()
    echo.stop()
    svc.close(t.tunnel_id)
    _wait(lambda: not svc.connected(t.tunnel_id, "destination"), "the warm-up tunnel gone")
    return _threads(), _fds(), _fd_names()


def _tunnel(
    c: LocalCloud, svc: TunnelService, token: str, services: dict[str, int], connected: bool = True, **cfg
) -> Tunnel:
    """The device's tunnel, started; with `connected`, returned once its WebSocket is up."""
    settings = TunnelingConfig(
        enabled=True,
        services={name: Target(f"127.0.0.1:{port}") for name, port in services.items()},
        endpoint="localhost",
        port=svc.port,
        **cfg,
    )
    tun = Tunnel(
        token=token,
        services=tuple(services),
        host="localhost",
        port=svc.port,
        ca_file=c.ca.cert_path,
        cfg=settings,
        connect_timeout_s=pace.scaled(5),
    ).start()
    if connected:
        _wait(lambda: tun.info()["state"] == "open", "the device's tunnel connected")
    return tun


def _back_to(baseline) -> None:
    """Every thread and descriptor the test's tunnel (and the endpoint's side of it) had is gone."""
    _wait(lambda: _threads() <= baseline[0], "threads back to the baseline")
    try:
        _wait(lambda: _fds() <= baseline[1], "descriptors back to the baseline")
    except AssertionError as e:
        raise AssertionError(f"{e}; still open: {sorted(set(_fd_names()) - set(baseline[2]))}") from None


def _ended(t: Tunnel, timeout: float = 20) -> None:
    _wait(lambda: not t.alive, "the tunnel ended", timeout)


def _source(c, svc, token: str, services: tuple[str, ...]) -> SourceProxy:
    src = SourceProxy("localhost", svc.port, c.ca.cert_path, token, {s: ("127.0.0.1", 0) for s in services})
    src.start()
    return src


def _refused(s: socket.socket) -> bool:
    """The far side closed without answering: EOF, or a reset (the byte we sent was never read)."""
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def _roundtrip(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=pace.scaled(10)) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_a_service_not_in_the_allowlist_is_refused_and_nothing_opened(cloud, caplog, baseline):
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["SSH", "VNC"], 600)
    caplog.set_level(logging.INFO, logger="agent")
    tun = _tunnel(c, svc, t.destination_token, {"SSH": echo.port})
    src = _source(c, svc, t.source_token, ("SSH", "VNC"))
    try:
        assert _roundtrip(src.addresses["SSH"], b"ping") == b"ping"
        with socket.create_connection(src.addresses["VNC"], timeout=pace.scaled(10)) as s:
            s.sendall(b"hello?")
            assert _refused(s)  # reset by the device: closed, nothing came back
        assert echo.accepted == 1  # only the SSH connection reached a local service
        text = caplog.text
        assert "the tunnel offers service 'VNC', which tunneling.services does not list" in text
        assert "stream for service 'VNC' refused: not in tunneling.services" in text
    finally:
        src.stop()
        tun.stop()
        echo.stop()
    _back_to(baseline)


@pytest.mark.parametrize(
    "fault, expect",
    [
        ("foreign", "the tunneling service's certificate was not accepted"),
        ("version", "chose protocol 'aws.iot.securetunneling-9.0', which this agent does not speak"),
        ("reused", "the tunneling service refused the handshake (HTTP 403)"),
        ("malformed", "protocol error: a malformed message"),
        ("oversized", "protocol error: a WebSocket frame of 131077 bytes"),
        ("unknown-type", "protocol error: message type 9 is not part of protocol v3 and not ignorable"),
    ],
)
def test_refusals_end_the_tunnel_with_one_line_and_open_nothing(cloud, caplog, baseline, fault, expect):
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["SSH"], 600)
    caplog.set_level(logging.INFO, logger="agent")
    if fault == "foreign":
        svc.foreign_certificate = True
    elif fault == "version":
        svc.answer_subprotocol = "aws.iot.securetunneling-9.0"
    elif fault == "reused":  # another client (its own client token) used the destination token first
        _tunnel(c, svc, t.destination_token, {"SSH": echo.port}).stop()
    tun = _tunnel(c, svc, t.destination_token, {"SSH": echo.port}, connected=False, reconnect_s=0)
    try:
        if fault in ("malformed", "oversized", "unknown-type"):
            assert svc.wait_connected(t.tunnel_id, "destination", True, pace.scaled(10))
            raw = {
                "malformed": b"\x00\x05\x08\x01\x12\xff\xff",  # a length, then a truncated varint
                "oversized": b"\x00" * 131077,
                "unknown-type": frame(Message(MessageType.DATA)).replace(b"\x08\x01", b"\x08\x09", 1),
            }[fault]
            assert svc.send_raw(t.tunnel_id, "destination", raw)
        _ended(tun, 60 if fault == "foreign" else 20)  # s2n reports a refused certificate after 10-30 s
    finally:
        tun.stop()
    assert expect in caplog.text, caplog.text[-2000:]
    assert echo.accepted == 0
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and expect.split(":")[0] in r.getMessage()]
    assert lines, caplog.text[-2000:]
    assert t.destination_token not in caplog.text  # the token is a credential: never logged
    echo.stop()
    _back_to(baseline)


def test_local_close_and_source_leaving_end_connections_and_the_tunnel_stays(cloud, baseline):
    c, reg, svc = cloud
    closing, echo = Echo(close_after=True), Echo()
    t = reg.open("gw", ["ONCE", "ECHO"], 600)
    tun = _tunnel(c, svc, t.destination_token, {"ONCE": closing.port, "ECHO": echo.port})
    client_token = "source-" + "a1" * 16

    def source() -> SourceProxy:
        listen = {"ONCE": ("127.0.0.1", 0), "ECHO": ("127.0.0.1", 0)}
        proxy = SourceProxy("localhost", svc.port, c.ca.cert_path, t.source_token, listen, client_token=client_token)
        proxy.start()
        return proxy

    src = source()
    try:
        # the local service closes: the source's connection ends too
        with socket.create_connection(src.addresses["ONCE"], timeout=pace.scaled(10)) as s:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            assert s.recv(10) == b""
        _wait(lambda: not tun.info()["connections"].get("ONCE"), "the device forgot the closed connection")
        # the source leaves with a connection open. The service does not announce a peer that left (the
        # guides: peers cannot know); when the source comes back, the service resets the old streams and
        # the device ends their connections, while the tunnel itself stays up.
        keep = socket.create_connection(src.addresses["ECHO"], timeout=pace.scaled(10))
        keep.sendall(b"y")
        assert keep.recv(10) == b"y"
        assert tun.info()["connections"] == {"ECHO": 1}
        src.stop()
        keep.close()
        src = source()
        _wait(lambda: not tun.info()["connections"], "the device closed the old source's connections")
        assert tun.alive and tun.info()["state"] == "open"
        assert _roundtrip(src.addresses["ECHO"], b"again") == b"again"
    finally:
        src.stop()
        tun.stop()
        closing.stop()
        echo.stop()
    _back_to(baseline)


def test_a_10_s_network_drop_resumes_with_the_client_token(cloud, caplog, baseline):
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["ECHO"], 600)
    caplog.set_level(logging.INFO, logger="agent")
    tun = _tunnel(c, svc, t.destination_token, {"ECHO": echo.port}, reconnect_s=60)
    port = svc.port
    # the network goes: the endpoint's connections drop and nothing answers for 10 s
    svc.blip(t.tunnel_id, "destination")
    svc.stop()
    _wait(lambda: tun.info()["state"] == "reconnecting", "the device noticed")
    time.sleep(10)  # the outage itself, not a synchronisation
    pki = c.directory / "pki"
    svc2 = TunnelService(reg, pki / "server.pem", pki / "server.key", port=port).start()
    try:
        assert svc2.wait_connected(t.tunnel_id, "destination", True, pace.scaled(30))
        src = SourceProxy("localhost", port, c.ca.cert_path, t.source_token, {"ECHO": ("127.0.0.1", 0)})
        src.start()
        try:
            assert _roundtrip(src.addresses["ECHO"], b"after the drop") == b"after the drop"
        finally:
            src.stop()
        assert "connection to the tunneling service dropped; reconnecting" in caplog.text
        assert tun.info()["state"] == "open"
    finally:
        tun.stop()
        svc2.stop()
        echo.stop()
    _back_to(baseline)


def test_the_cloud_closing_the_tunnel_ends_it(cloud, caplog, baseline):
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["ECHO"], 600)
    caplog.set_level(logging.INFO, logger="agent")
    tun = _tunnel(c, svc, t.destination_token, {"ECHO": echo.port}, reconnect_s=60)
    src = _source(c, svc, t.source_token, ("ECHO",))
    keep = socket.create_connection(src.addresses["ECHO"], timeout=pace.scaled(10))
    keep.sendall(b"z")
    assert keep.recv(10) == b"z"
    svc.close(t.tunnel_id)
    _ended(tun)  # no reconnect to a closed tunnel: its tokens are refused (4xx)
    assert _refused(keep)  # closed by the source side when the tunnel ended
    keep.close()
    src.stop()
    echo.stop()
    assert "tunnel " + tun.id + " closed: " in caplog.text
    _back_to(baseline)


def test_a_slow_local_service_stops_the_sender_instead_of_filling_memory(cloud, baseline):
    """Back-pressure: a local service that reads nothing. The device holds at most its buffer (plus the
    read window it had already given and one WebSocket frame), and the far sender blocks."""
    c, reg, svc = cloud
    stuck = socket.create_server(("127.0.0.1", 0))
    t = reg.open("gw", ["SLOW"], 600)
    tun = _tunnel(c, svc, t.destination_token, {"SLOW": stuck.getsockname()[1]}, buffer_kib=64)
    src = _source(c, svc, t.source_token, ("SLOW",))
    sent = [0]
    sender = socket.create_connection(src.addresses["SLOW"], timeout=pace.scaled(10))
    conn, _ = stuck.accept()  # accepted, never read

    def push() -> None:
        block = b"\0" * 65536
        sender.settimeout(pace.scaled(3))
        try:
            while sent[0] < 64 << 20:
                sender.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass  # blocked for 3 s: the back-pressure reached the sender

    pusher = threading.Thread(target=push)
    pusher.start()
    pusher.join(pace.scaled(60))
    try:
        assert not pusher.is_alive()
        assert sent[0] < 64 << 20, "64 MiB went into a service that reads nothing"
        limit = 64 * 1024
        assert tun._held <= 2 * limit + 131076, tun._held  # buffer + window already given + one frame
        # what did leave the sender sits in kernel socket buffers and the bounded relays, not in a queue
        assert sent[0] < 32 << 20, sent[0]
    finally:
        sender.close()
        conn.close()
        stuck.close()
        src.stop()
        tun.stop()
    _back_to(baseline)


def test_the_lifetime_ends_the_tunnel(cloud, caplog):
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["ECHO"], 600)
    caplog.set_level(logging.INFO, logger="agent")
    tun = _tunnel(c, svc, t.destination_token, {"ECHO": echo.port}, lifetime_s=2.0)  # (the config's floor is 60)
    _ended(tun)
    echo.stop()
    assert f"tunnel {tun.id} closed: its lifetime (2 s) is over" in caplog.text


def test_a_v2_source_reaches_a_v3_device(cloud, baseline):
    """The service relays between protocol versions: a v2 source (one connection per stream, no
    connection ids) and this v3 device, which reads the missing id as the stream's first connection."""
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["ECHO"], 600)
    tun = _tunnel(c, svc, t.destination_token, {"ECHO": echo.port})
    src = SourceProxy(
        "localhost",
        svc.port,
        c.ca.cert_path,
        t.source_token,
        {"ECHO": ("127.0.0.1", 0)},
        subprotocols=("aws.iot.securetunneling-2.0",),
    )
    src.start()
    try:
        assert src.version == 2 and tun.info()["protocol"] == 3
        for n in range(3):  # each a new stream, as v2 does it
            assert _roundtrip(src.addresses["ECHO"], b"v2 #%d" % n) == b"v2 #%d" % n
    finally:
        src.stop()
        tun.stop()
        echo.stop()
    _back_to(baseline)


def test_refusals_in_a_loop_are_logged_up_to_a_bound(cloud, caplog):
    """A source asking for an unlisted service again and again: the first 20 refusals are logged, then one
    line says the rest are counted; the count comes when the tunnel closes. The log cannot be flooded."""
    c, reg, svc = cloud
    echo = Echo()
    t = reg.open("gw", ["SSH", "VNC"], 600)
    caplog.set_level(logging.INFO, logger="agent")
    tun = _tunnel(c, svc, t.destination_token, {"SSH": echo.port})
    src = _source(c, svc, t.source_token, ("SSH", "VNC"))
    try:
        for _ in range(30):
            with socket.create_connection(src.addresses["VNC"], timeout=pace.scaled(10)) as s:
                s.sendall(b"?")
                assert _refused(s)
    finally:
        src.stop()
        tun.stop()
        echo.stop()
    refused = [r for r in caplog.records if "refused: not in tunneling.services" in r.getMessage()]
    assert len(refused) == 19  # plus the SERVICE_IDS line: 20 logged
    assert "further refusals are counted, not logged, until it closes" in caplog.text
    assert f"tunnel {tun.id}: 31 refusals in all" in caplog.text
    assert echo.accepted == 0
