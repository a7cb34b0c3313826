"""The local cloud's secure tunneling endpoint (localcloud.tunnels) and its source side (localcloud.tunnel_source).

A TunnelService runs in the test's process on a free loopback port with a certificate from a test CA. The
destination is a deliberately small one written here on a blocking TLS socket and wsproto (independent of the
service's own transport): it connects each stream's connections to a TCP echo server on loopback. The source
is the real SourceProxy. Every wait is bounded and waits on a condition; every test that starts the service
checks at its end that all threads it started have ended and every socket it opened is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import selectors
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from agent.tunneling.frames import MAX_PAYLOAD, Deframer, FrameError, Message, MessageType, frame
from localcloud import pace
from localcloud.pki import CertificateAuthority
from localcloud.registry import Registry
from localcloud.tls_websocket import RECV_CHUNK
from localcloud.tunnel_source import SourceProxy, TunnelRefused
from localcloud.tunnels import HIGH_WATER, MAX_OPEN_TUNNELS, TunnelRegistry, TunnelService

V3 = "aws.iot.securetunneling-3.0"
V2 = "aws.iot.securetunneling-2.0"
T = MessageType
CLIENT_A = "a" * 8 + "-" + "1" * 27  # 36 characters of [a-zA-Z0-9-]
CLIENT_B = "b" * 8 + "-" + "2" * 27


def wait_until(predicate: Callable[[], bool], cond: threading.Condition, timeout: float = 10.0) -> bool:
    """Bounded wait for `predicate`, re-checked whenever `cond` is notified."""
    with cond:
        return cond.wait_for(predicate, pace.scaled(timeout))


# -- fixtures ---------------------------------------------------------------------------------------------------


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def leakcheck():
    """Nothing the test started may outlive it: no thread, no socket or file descriptor."""
    threads, fds = set(threading.enumerate()), _fds()
    yield
    assert set(threading.enumerate()) - threads == set()
    assert _fds() <= fds, f"descriptors left open: {sorted(_fds() - fds)}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("tunnel-pki")
    ca = CertificateAuthority(d / "ca", "tunnel test CA")
    server = ca.issue_server("server", ["localhost", "127.0.0.1"])
    return ca.cert_path, server.cert_path, server.key_path


@pytest.fixture
def service(leakcheck, tmp_path, pki):
    reg = Registry(tmp_path / "registry.sqlite")
    svc = TunnelService(TunnelRegistry(reg.db, reg.lock), pki[1], pki[2]).start()
    yield svc
    svc.stop()
    reg.close()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = False
    block_on_close = True  # server_close joins every handler
    allow_reuse_address = True


@pytest.fixture
def echo():
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()
    t.join(10)


@pytest.fixture
def stack():
    with contextlib.ExitStack() as st:
        yield st


# -- a small destination (and raw handshakes) ------------------------------------------------------------------


@dataclass
class Upgrade:
    sock: ssl.SSLSocket
    ws: WSConnection
    status: int | None = None
    subprotocol: str | None = None
    body: bytes = b""
    error: str = ""
    events: list = field(default_factory=list)  # after the 101, in the same read

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def upgrade(
    port: int,
    ca: Path,
    *,
    mode: str = "destination",
    token: str | None = None,
    client_token: str | None = None,
    subprotocols: tuple[str, ...] = (V3,),
    target: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    timeout: float = 10.0,
) -> Upgrade:
    """One WebSocket handshake with the service, its answer read whole."""
    ctx = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=pace.scaled(timeout))
    try:
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    ws = WSConnection(ConnectionType.CLIENT)
    extra = list(headers)
    if token is not None:
        extra.append((b"access-token", token.encode()))
    if client_token is not None:
        extra.append((b"client-token", client_token.encode()))
    up = Upgrade(sock, ws)
    sock.sendall(
        ws.send(
            Request(
                host="localhost",
                target=target or f"/tunnel?local-proxy-mode={mode}",
                extra_headers=extra,
                subprotocols=list(subprotocols),
            )
        )
    )
    body = bytearray()
    done = False
    while not done:
        data = sock.recv(65536)
        try:
            ws.receive_data(data or None)
            events = list(ws.events())
        except RemoteProtocolError as e:
            up.error = str(e)
            return up
        for ev in events:
            if isinstance(ev, AcceptConnection):
                up.status, up.subprotocol, done = 101, ev.subprotocol, True
            elif isinstance(ev, RejectConnection):
                up.status, done = ev.status_code, not ev.has_body
            elif isinstance(ev, RejectData):
                body += ev.data
                done = ev.body_finished
            else:
                up.events.append(ev)
        if not data:
            break
    up.body = bytes(body)
    return up


def refused(port: int, ca: Path, **kw) -> tuple[int | None, str]:
    up = upgrade(port, ca, **kw)
    up.close()
    assert up.status != 101, "the handshake was accepted"
    return up.status, up.body.decode().strip()


class FakeDestination:
    """A destination peer on one thread: each stream's connections go to `targets[service]` (an echo server).
    With mode="source" it is a bare peer in source mode (it only records, and sends what a test gives it)."""

    def __init__(
        self,
        port: int,
        ca: Path,
        token: str,
        targets: dict[str, tuple[str, int]] | None = None,
        *,
        client_token: str | None = None,
        subprotocols: tuple[str, ...] = (V3,),
        mode: str = "destination",
    ) -> None:
        self.port, self.ca, self.token, self.targets = port, ca, token, targets or {}
        self.client_token, self.subprotocols, self.mode = client_token, subprotocols, mode
        self.cond = threading.Condition()
        self.received: list[Message] = []
        self.closed: CloseConnection | None = None  # the service's close frame
        self.ended = False  # the connection is over (closed, or lost without a close frame)
        self.frame_error = ""
        self.largest_ws_message = 0
        self.version = 0
        self.conns: dict[tuple[str, int], socket.socket] = {}
        self.streams: dict[str, int] = {}
        self._outbox: queue.Queue[bytes | str] = queue.Queue(maxsize=64)
        self._deframer = Deframer()
        self._message = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> FakeDestination:
        up = upgrade(
            self.port,
            self.ca,
            mode=self.mode,
            token=self.token,
            client_token=self.client_token,
            subprotocols=self.subprotocols,
        )
        if up.status != 101:
            up.close()
            raise TunnelRefused(up.status or 0, up.body.decode() or up.error)
        self.version = 3 if up.subprotocol == V3 else 2
        self._sock, self._ws = up.sock, up.ws
        self._sock.settimeout(None)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._sock, selectors.EVENT_READ, "ws")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for ev in up.events:
            self._event(ev)
        self._thread = threading.Thread(target=self._run, name="fake-destination")
        self._thread.start()
        return self

    # the test's side
    def wait(self, predicate: Callable[[FakeDestination], bool], timeout: float = 10.0) -> bool:
        return wait_until(lambda: predicate(self), self.cond, timeout)

    def of_type(self, t: int) -> list[Message]:
        with self.cond:
            return [m for m in self.received if m.type == t]

    def send(self, msg: Message) -> None:
        self.send_raw(frame(msg))

    def send_raw(self, data: bytes | str) -> None:
        self._outbox.put(data, timeout=5)
        self._wake_w.send(b"\0")

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(pace.scaled(10))
        assert not self._thread.is_alive()
        self._thread = None

    # the destination's thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self.ended:
                for key, _ in self._sel.select(0.5):
                    if key.data == "wake":
                        self._wake_r.recv(4096)
                        while not self._outbox.empty():
                            item = self._outbox.get_nowait()
                            ev = TextMessage(item) if isinstance(item, str) else BytesMessage(item)
                            self._sock.sendall(self._ws.send(ev))
                    elif key.data == "ws":
                        self._read_ws()
                    else:
                        self._read_target(key.data)
                    if self.ended:
                        break
        finally:
            for sock in list(self.conns.values()):
                sock.close()
            self.conns.clear()
            self._sel.close()
            self._sock.close()
            self._wake_r.close()
            self._wake_w.close()
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def _read_ws(self) -> None:
        try:
            data = self._sock.recv(65536)
            while data and self._sock.pending():
                data += self._sock.recv(self._sock.pending())
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            with self.cond:
                self.ended = True
                self.cond.notify_all()
            return
        self._ws.receive_data(data)
        for ev in self._ws.events():
            self._event(ev)

    def _event(self, ev) -> None:
        if isinstance(ev, BytesMessage):
            self._message += len(ev.data)
            self.largest_ws_message = max(self.largest_ws_message, self._message)
            if ev.message_finished:
                self._message = 0
            try:
                messages = self._deframer.feed(bytes(ev.data))
            except FrameError as e:
                with self.cond:
                    self.frame_error = str(e)
                    self.cond.notify_all()
                return
            for m in messages:
                with self.cond:
                    self.received.append(m)
                    self.cond.notify_all()
                if self.mode == "destination":
                    self._tunnel_message(m)
        elif isinstance(ev, Ping):
            self._sock.sendall(self._ws.send(ev.response()))
        elif isinstance(ev, CloseConnection):
            with contextlib.suppress(Exception):
                self._sock.sendall(self._ws.send(ev.response()))
            with self.cond:
                self.closed, self.ended = ev, True
                self.cond.notify_all()

    def _tunnel_message(self, m: Message) -> None:
        svc, sid, cid = m.service_id, m.stream_id, m.connection_id or 1
        if m.type == T.STREAM_START:
            for key in [k for k in self.conns if k[0] == svc]:
                self._drop(key)
            self.streams[svc] = sid
            self._open(svc, cid)
        elif m.type == T.CONNECTION_START and self.streams.get(svc) == sid:
            self._open(svc, cid)
        elif m.type == T.DATA and self.streams.get(svc) == sid and (svc, cid) in self.conns:
            self.conns[(svc, cid)].sendall(m.payload)
        elif m.type == T.CONNECTION_RESET and self.streams.get(svc) == sid:
            self._drop((svc, cid))
        elif m.type == T.STREAM_RESET and self.streams.get(svc) == sid:
            for key in [k for k in self.conns if k[0] == svc]:
                self._drop(key)
            del self.streams[svc]

    def _open(self, svc: str, cid: int) -> None:
        sock = socket.create_connection(self.targets[svc], timeout=pace.scaled(5))
        sock.settimeout(None)
        self.conns[(svc, cid)] = sock
        self._sel.register(sock, selectors.EVENT_READ, (svc, cid))
        with self.cond:
            self.cond.notify_all()

    def _drop(self, key: tuple[str, int]) -> None:
        sock = self.conns.pop(key, None)
        if sock is not None:
            self._sel.unregister(sock)
            sock.close()
            with self.cond:
                self.cond.notify_all()

    def _read_target(self, key: tuple[str, int]) -> None:
        svc, cid = key
        data = self.conns[key].recv(MAX_PAYLOAD)
        wire_cid = cid if self.version == 3 else 0
        if data:
            out = Message(T.DATA, stream_id=self.streams[svc], service_id=svc, connection_id=wire_cid, payload=data)
        else:
            reset = T.CONNECTION_RESET if self.version == 3 else T.STREAM_RESET
            out = Message(reset, stream_id=self.streams[svc], service_id=svc, connection_id=wire_cid)
            self._drop(key)
        self._sock.sendall(self._ws.send(BytesMessage(frame(out))))


def destination(service: TunnelService, stack: contextlib.ExitStack, ca: Path, token: str, targets=None, **kw):
    d = FakeDestination(service.port, ca, token, targets, **kw).connect()
    stack.callback(d.close)
    assert d.wait(lambda d: bool(d.of_type(T.SERVICE_IDS)))
    return d


def source(service: TunnelService, stack: contextlib.ExitStack, ca: Path, token: str, services=("SSH",), **kw):
    proxy = SourceProxy("localhost", service.port, ca, token, {s: ("127.0.0.1", 0) for s in services}, **kw)
    proxy.start()
    stack.callback(proxy.stop)
    return proxy


def client(stack: contextlib.ExitStack, address: tuple[str, int]) -> socket.socket:
    c = socket.create_connection(address, timeout=pace.scaled(10))
    stack.callback(c.close)
    return c


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_exactly(sock, len(data))


def at_eof(sock: socket.socket) -> bool:
    """True when the proxy has closed this local connection (EOF or reset), within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- relaying ------------------------------------------------------------------------------------------------------


def test_a_source_connection_reaches_the_echo_service_and_back(service, echo, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, pki[0], t.destination_token, {"SSH": echo})
    assert dest.received[0] == Message(T.SERVICE_IDS, available_service_ids=("SSH",))  # the first thing said
    proxy = source(service, stack, pki[0], t.source_token)
    assert (proxy.version, proxy.available) == (3, ("SSH",))
    assert service.connected(t.tunnel_id, "source") and service.connected(t.tunnel_id, "destination")

    c = client(stack, proxy.addresses["SSH"])
    data = os.urandom(3 * 1024 * 1024)  # many DATA messages, both ways, while both sides send at once
    sender = threading.Thread(target=c.sendall, args=(data,))
    sender.start()
    got = read_exactly(c, len(data))
    sender.join(pace.scaled(30))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert proxy.open_connections("SSH") == 1

    starts = dest.of_type(T.STREAM_START)
    assert starts == [Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1)]
    datas = dest.of_type(T.DATA)
    assert all((m.stream_id, m.connection_id, m.service_id) == (1, 1, "SSH") for m in datas)
    assert all(0 < len(m.payload) <= MAX_PAYLOAD for m in datas)
    assert sum(len(m.payload) for m in datas) == len(data)

    c.close()
    assert dest.wait(lambda d: bool(d.of_type(T.CONNECTION_RESET)))
    assert dest.of_type(T.CONNECTION_RESET) == [
        Message(T.CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=1)
    ]
    assert proxy.wait_connections(0, timeout=pace.scaled(10))
    assert dest.wait(lambda d: not d.conns)


def test_two_connections_on_one_service_and_a_second_service(service, echo, stack, pki):
    t = service.open("gw-1", ["SSH", "HTTP"], 60)
    dest = destination(service, stack, pki[0], t.destination_token, {"SSH": echo, "HTTP": echo})
    proxy = source(service, stack, pki[0], t.source_token, services=("SSH", "HTTP"))
    c1 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c1, b"one") == b"one"
    c2 = client(stack, proxy.addresses["SSH"])
    c3 = client(stack, proxy.addresses["HTTP"])
    # all three open at once, each answered on its own connection
    for c, word in ((c2, b"two"), (c3, b"three"), (c1, b"one again")):
        c.sendall(word)
    assert [read_exactly(c, n) for c, n in ((c1, 9), (c2, 3), (c3, 5))] == [b"one again", b"two", b"three"]
    assert proxy.open_connections("SSH") == 2 and proxy.open_connections("HTTP") == 1

    ssh_start, http_start = dest.of_type(T.STREAM_START)
    assert (ssh_start.service_id, ssh_start.connection_id, http_start.service_id) == ("SSH", 1, "HTTP")
    assert ssh_start.stream_id != http_start.stream_id
    assert dest.of_type(T.CONNECTION_START) == [
        Message(T.CONNECTION_START, stream_id=ssh_start.stream_id, service_id="SSH", connection_id=2)
    ]

    c1.close()  # one connection of the stream ends; the other goes on
    assert dest.wait(lambda d: bool(d.of_type(T.CONNECTION_RESET)))
    assert dest.of_type(T.CONNECTION_RESET)[0].connection_id == 1
    assert roundtrip(c2, b"still here") == b"still here"
    c4 = client(stack, proxy.addresses["SSH"])  # the stream lives on: a new connection of it
    assert roundtrip(c4, b"four") == b"four"
    assert dest.of_type(T.CONNECTION_START)[-1] == Message(
        T.CONNECTION_START, stream_id=ssh_start.stream_id, service_id="SSH", connection_id=3
    )
    assert proxy.wait_connections(2, "SSH", timeout=pace.scaled(10))


def test_buffers_stay_bounded_when_the_local_client_does_not_read(service, echo, stack, pki):
    """A client that sends without reading stalls the whole path (echo, destination, service, proxy) instead
    of filling memory; once it reads, every byte arrives, in order."""
    t = service.open("gw-1", ["SSH"], 60)
    destination(service, stack, pki[0], t.destination_token, {"SSH": echo})
    proxy = source(service, stack, pki[0], t.source_token)
    c = client(stack, proxy.addresses["SSH"])
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    c.setblocking(False)
    sent = bytearray()
    block = os.urandom(64 * 1024)
    limit = 96 * 1024 * 1024
    stalled = False
    while len(sent) < limit:
        _, writable, _ = select_writable(c, pace.scaled(1))
        if not writable:
            stalled = True  # nothing moved for 1 s: every buffer on the way is full
            break
        try:
            n = c.send(block)
        except BlockingIOError:
            continue
        sent += block[:n]
    assert stalled, f"{len(sent)} bytes went out without the client reading any"
    bound = HIGH_WATER + 4 * RECV_CHUNK
    assert service.peak_buffered() <= bound
    assert proxy.peak_buffered() <= bound
    c.setblocking(True)
    got = read_exactly(c, len(sent))
    assert hashlib.sha256(got).digest() == hashlib.sha256(bytes(sent)).digest()


def select_writable(sock: socket.socket, timeout: float):
    import select

    return select.select([], [sock], [], timeout)


def test_a_v2_destination_gets_one_connection_per_stream_and_no_connection_ids(service, echo, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, pki[0], t.destination_token, {"SSH": echo}, subprotocols=(V2,))
    assert dest.version == 2
    proxy = source(service, stack, pki[0], t.source_token)
    assert proxy.version == 3
    c1 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c1, b"first") == b"first"
    assert dest.of_type(T.STREAM_START) == [Message(T.STREAM_START, stream_id=1, service_id="SSH")]
    # A second connection of the stream: a v2 peer cannot take it, so the service refuses it for the peer.
    c2 = client(stack, proxy.addresses["SSH"])
    assert at_eof(c2)
    assert roundtrip(c1, b"unharmed") == b"unharmed"
    assert dest.of_type(T.CONNECTION_START) == []
    assert all(m.connection_id == 0 for m in dest.received)
    c1.close()  # the v3 source resets its connection; the v2 destination hears that its stream ended
    assert dest.wait(lambda d: bool(d.of_type(T.STREAM_RESET)))
    assert dest.of_type(T.STREAM_RESET) == [Message(T.STREAM_RESET, stream_id=1, service_id="SSH")]
    assert dest.of_type(T.CONNECTION_RESET) == []


def test_a_v2_source_reaches_a_v3_destination(service, echo, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, pki[0], t.destination_token, {"SSH": echo})
    proxy = source(service, stack, pki[0], t.source_token, subprotocols=(V2,))
    assert proxy.version == 2
    c1 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c1, b"over v2") == b"over v2"
    assert dest.of_type(T.STREAM_START) == [Message(T.STREAM_START, stream_id=1, service_id="SSH")]
    c2 = client(stack, proxy.addresses["SSH"])  # v2: one connection per stream, refused by the proxy
    assert at_eof(c2)
    c1.close()
    assert dest.wait(lambda d: bool(d.of_type(T.STREAM_RESET)))
    c3 = client(stack, proxy.addresses["SSH"])  # a new stream
    assert roundtrip(c3, b"again") == b"again"
    assert [m.stream_id for m in dest.of_type(T.STREAM_START)] == [1, 2]


def test_the_service_chooses_3_0_when_offered_else_2_0(service, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    for offered, chosen in (((V2, V3), V3), ((V2,), V2), ((V3, V2), V3)):
        up = upgrade(service.port, pki[0], token=t.destination_token, client_token=CLIENT_A, subprotocols=offered)
        up.close()
        assert (up.status, up.subprotocol) == (101, chosen)


# -- tokens and handshakes ---------------------------------------------------------------------------------------


def test_an_access_token_without_a_client_token_is_used_up_by_its_first_handshake(service, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    first = upgrade(service.port, pki[0], token=t.destination_token)
    stack.callback(first.close)
    assert (first.status, first.subprotocol) == (101, V3)
    assert refused(service.port, pki[0], token=t.destination_token) == (403, "access token already used")
    assert refused(service.port, pki[0], token=t.destination_token, client_token=CLIENT_A)[0] == 403


def test_a_client_token_lets_the_same_peer_reconnect_and_no_one_else(service, stack, pki):
    ca, port = pki[0], service.port
    t = service.open("gw-1", ["SSH"], 60)
    first = destination(service, stack, ca, t.source_token, mode="source", client_token=CLIENT_A)
    second = destination(service, stack, ca, t.source_token, mode="source", client_token=CLIENT_A)
    assert first.wait(lambda d: d.closed is not None)  # replaced: the new connection is the source now
    assert (first.closed.code, first.closed.reason) == (1000, "replaced by a new connection")
    assert service.connected(t.tunnel_id, "source") and not second.ended
    assert refused(port, ca, mode="source", token=t.source_token, client_token=CLIENT_B)[0] == 403
    assert refused(port, ca, mode="source", token=t.source_token) == (403, "access token already used")
    # a client token belongs to one access token while its tunnel is open
    other = service.open("gw-2", ["SSH"], 60)
    assert refused(port, ca, token=other.destination_token, client_token=CLIENT_A) == (
        403,
        "client token already in use with another access token",
    )


def test_handshakes_that_break_a_rule_are_refused_and_use_nothing_up(service, stack, pki, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="localcloud.tunnels")
    ca, port = pki[0], service.port
    t = service.open("gw-1", ["SSH"], 60)
    gone = service.open("gw-2", ["SSH"], 60)
    service.close(gone.tunnel_id)
    tok = t.destination_token.encode()
    cases = [
        ({"target": "/other?local-proxy-mode=destination"}, 400, "the path must be /tunnel"),
        ({"target": "/tunnel"}, 400, "local-proxy-mode must be source or destination"),
        ({"target": "/tunnel?local-proxy-mode=both"}, 400, "local-proxy-mode must be"),
        ({"target": "/tunnel?local-proxy-mode=source&local-proxy-mode=destination"}, 400, "local-proxy-mode must"),
        ({"headers": ()}, 400, "exactly one access token"),
        ({"headers": ((b"access-token", tok), (b"access-token", tok))}, 400, "exactly one access token"),
        ({"headers": ((b"access-token", tok), (b"cookie", b"awsiot-tunnel-token=" + tok))}, 400, "exactly one"),
        ({"subprotocols": ("aws.iot.securetunneling-1.0",)}, 400, "Sec-WebSocket-Protocol must offer"),
        ({"subprotocols": ()}, 400, "Sec-WebSocket-Protocol must offer"),
        ({"client_token": "too-short"}, 400, "client-token must be 32-128 characters"),
        ({"client_token": CLIENT_A + "!"}, 400, "client-token must be"),
        ({"headers": ((b"access-token", tok), (b"client-token", CLIENT_A.encode()), (b"client-token", b"x"))}, 400, ""),
        ({"headers": ((b"access-token", tok), (b"x-padding", b"p" * 4096))}, 400, "request larger than 4096 bytes"),
        ({"headers": ((b"access-token", b"not-a-token"),)}, 403, "access token not valid"),
        ({"headers": ((b"access-token", t.source_token.encode()),)}, 403, "not for local-proxy-mode=destination"),
        ({"mode": "source"}, 403, "access token is not for local-proxy-mode=source"),
        ({"headers": ((b"access-token", gone.destination_token.encode()),)}, 403, "tunnel is closed"),
    ]
    for kw, status, words in cases:
        kw.setdefault("headers", ((b"access-token", tok),))
        got = refused(port, ca, **kw)
        assert got[0] == status and words in got[1], (kw.get("target"), kw.get("subprotocols"), got)
    for request in (b"GET /tunnel HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x16garbage\r\n\r\n"):
        ctx = ssl.create_default_context(cafile=str(ca))
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=pace.scaled(10)), server_hostname="localhost"
        ) as s:
            s.sendall(request)
            assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
    # None of that used the token up: it still opens the tunnel, once, from a cookie too.
    up = upgrade(port, ca, headers=((b"cookie", b"a=b; awsiot-tunnel-token=" + tok),))
    stack.callback(up.close)
    assert up.status == 101
    text = caplog.text + repr(list(service.refusals))
    assert t.destination_token not in text and t.source_token not in text and gone.destination_token not in text
    assert text.count("refused") >= len(cases)


def test_idle_and_excess_handshakes_are_dropped(service, stack, pki, monkeypatch):
    import localcloud.tunnels as tunnels

    monkeypatch.setattr(tunnels, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tunnels, "MAX_HANDSHAKING", 3)
    idle = [socket.create_connection(("127.0.0.1", service.port), timeout=pace.scaled(10)) for _ in range(3)]
    for s in idle:
        stack.callback(s.close)
    assert service.wait_sockets(3, pace.scaled(5))
    extra = socket.create_connection(("127.0.0.1", service.port), timeout=pace.scaled(10))
    stack.callback(extra.close)
    assert at_eof(extra)  # a fourth connection still in its handshake: closed at once
    assert all(at_eof(s) for s in idle)  # and the others when their time is up
    assert service.wait_sockets(0, pace.scaled(5))


# -- peers that go away and come back -----------------------------------------------------------------------------


def test_a_destination_dropped_by_the_network_reconnects_with_its_client_token(service, echo, stack, pki):
    ca = pki[0]
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, ca, t.destination_token, {"SSH": echo}, client_token=CLIENT_A)
    proxy = source(service, stack, ca, t.source_token)
    c1 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c1, b"before") == b"before"

    assert service.blip(t.tunnel_id, "destination")
    assert dest.wait(lambda d: d.ended) and dest.closed is None  # no close frame: the connection just broke
    assert service.wait_connected(t.tunnel_id, "destination", connected=False, timeout=pace.scaled(10))
    dest.close()
    assert proxy.open_connections() == 1  # the service does not announce a peer that left
    assert refused(service.port, ca, token=t.destination_token) == (403, "access token already used")

    back = destination(service, stack, ca, t.destination_token, {"SSH": echo}, client_token=CLIENT_A)
    assert at_eof(c1)  # the streams ended with the old connection: STREAM_RESET to the source
    assert proxy.wait_connections(0, timeout=pace.scaled(10))
    c2 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c2, b"after") == b"after"
    assert [m.stream_id for m in back.of_type(T.STREAM_START)] == [2]


def test_a_source_that_reconnects_resets_the_destinations_streams(service, echo, stack, pki):
    ca = pki[0]
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, ca, t.destination_token, {"SSH": echo})
    first = source(service, stack, ca, t.source_token, client_token=CLIENT_B)
    c1 = client(stack, first.addresses["SSH"])
    assert roundtrip(c1, b"hello") == b"hello"
    assert service.blip(t.tunnel_id, "source")
    assert first.ended.wait(pace.scaled(10)) and "lost" in first.end_reason
    assert at_eof(c1)
    assert dest.of_type(T.STREAM_RESET) == [] and len(dest.conns) == 1  # not yet: nobody told it
    second = source(service, stack, ca, t.source_token, client_token=CLIENT_B)
    assert dest.wait(lambda d: bool(d.of_type(T.STREAM_RESET)))
    assert dest.of_type(T.STREAM_RESET) == [Message(T.STREAM_RESET, stream_id=1, service_id="SSH")]
    assert dest.wait(lambda d: not d.conns)
    c2 = client(stack, second.addresses["SSH"])
    assert roundtrip(c2, b"hello again") == b"hello again"


def test_stream_messages_with_no_peer_to_reach_are_answered_with_a_reset(service, echo, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, pki[0], t.destination_token, {"SSH": echo}, client_token=CLIENT_A)
    proxy = source(service, stack, pki[0], t.source_token)
    c1 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c1, b"x") == b"x"
    assert service.blip(t.tunnel_id, "destination")
    assert service.wait_connected(t.tunnel_id, "destination", connected=False, timeout=pace.scaled(10))
    dest.close()
    c1.sendall(b"anyone there?")  # DATA with nowhere to go: STREAM_RESET, and the proxy closes c1
    assert at_eof(c1)
    c2 = client(stack, proxy.addresses["SSH"])  # a STREAM_START with no destination: the same
    assert at_eof(c2)
    assert proxy.wait_connections(0, timeout=pace.scaled(10))


# -- closing ---------------------------------------------------------------------------------------------------------


def test_close_disconnects_both_peers_and_ends_the_tokens(service, echo, stack, pki):
    ca = pki[0]
    t = service.open("gw-1", ["SSH"], 60)
    dest = destination(service, stack, ca, t.destination_token, {"SSH": echo}, client_token=CLIENT_A)
    proxy = source(service, stack, ca, t.source_token, client_token=CLIENT_B)
    c1 = client(stack, proxy.addresses["SSH"])
    assert roundtrip(c1, b"bye") == b"bye"
    seen = len(dest.received)

    assert service.close(t.tunnel_id) is True
    assert dest.wait(lambda d: d.closed is not None)
    assert (dest.closed.code, dest.closed.reason) == (1000, "tunnel closed")
    assert dest.received[seen:] == []  # no tunnel message: the WebSockets are closed, that is all
    assert proxy.ended.wait(pace.scaled(10)) and "1000 tunnel closed" in proxy.end_reason
    assert at_eof(c1)
    assert refused(service.port, ca, token=t.destination_token, client_token=CLIENT_A) == (403, "tunnel is closed")
    assert refused(service.port, ca, mode="source", token=t.source_token, client_token=CLIENT_B)[0] == 403
    assert service.close(t.tunnel_id) is False
    assert [(x.tunnel_id, x.status) for x in service.list()] == [(t.tunnel_id, "CLOSED")]
    assert service.wait_sockets(0, pace.scaled(10))


def test_a_tunnel_closed_by_another_process_or_by_its_lifetime_ends(service, stack, pki, tmp_path):
    ca = pki[0]
    short = service.open("gw-1", ["SSH"], 2.0)
    other = service.open("gw-2", ["SSH"], 60)
    d1 = destination(service, stack, ca, short.destination_token)
    d2 = destination(service, stack, ca, other.destination_token)
    elsewhere = Registry(tmp_path / "registry.sqlite")  # its own connection, as the CLI's process has
    stack.callback(elsewhere.close)
    assert TunnelRegistry(elsewhere.db, elsewhere.lock).close(other.tunnel_id)
    assert d2.wait(lambda d: d.closed is not None)
    assert (d2.closed.code, d2.closed.reason) == (1000, "tunnel closed")
    assert d1.wait(lambda d: d.closed is not None)
    assert (d1.closed.code, d1.closed.reason) == (1000, "tunnel expired")
    assert {x.tunnel_id: x.status for x in service.list()} == {short.tunnel_id: "CLOSED", other.tunnel_id: "CLOSED"}


# -- what peers may send ---------------------------------------------------------------------------------------------


def _with_unknown_field(msg: Message) -> bytes:
    body = frame(msg)[2:] + b"\x48\x01"  # field 9, a varint: not in the schema
    return len(body).to_bytes(2, "big") + body


_BIG = frame(Message(99, ignorable=True, payload=b"z" * 60000))
_SSH1 = frame(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))

RULES = [
    ("destination", V3, _SSH1, 1002, "a destination may not send STREAM_START"),
    ("destination", V3, frame(Message(T.SERVICE_IDS, available_service_ids=("SSH",))), 1002, "service only"),
    ("source", V3, frame(Message(T.SESSION_RESET)), 1002, "SESSION_RESET comes from the service only"),
    ("source", V3, frame(Message(T.STREAM_START, stream_id=1, service_id="FTP")), 1002, "not one of the tunnel's"),
    ("source", V3, frame(Message(T.STREAM_START, stream_id=0, service_id="SSH")), 1002, "stream id 0"),
    ("source", V3, frame(Message(T.DATA, stream_id=1, service_id="SSH", payload=b"x")), 1002, "no STREAM_START"),
    ("destination", V3, frame(Message(T.DATA, stream_id=1, service_id="SSH")), 1002, "no STREAM_START"),
    ("source", V3, frame(Message(42, stream_id=1)), 1002, "unknown message type 42 (not ignorable)"),
    ("source", V3, b"\x00\x02\x08\x00", 1002, "malformed tunnel message"),  # type 0, spelled out
    ("source", V3, b"\x00\x03\xff\xff\xff", 1002, "malformed tunnel message"),
    ("source", V3, _with_unknown_field(Message(T.STREAM_START, stream_id=1, service_id="SSH")), 1002, "schema"),
    (
        "source",
        V2,
        _SSH1 + frame(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2)),
        1002,
        "CONNECTION_START is not part of protocol v2",
    ),
    ("source", V3, "a text frame", 1003, "text frames are not part of the protocol"),
    ("source", V3, _BIG * 3, 1009, "WebSocket message larger than 131076 bytes"),
]


@pytest.mark.parametrize(("mode", "version", "data", "code", "words"), RULES, ids=[r[4] for r in RULES])
def test_a_peer_that_breaks_a_rule_is_closed(service, echo, stack, pki, mode, version, data, code, words):
    t = service.open("gw-1", ["SSH"], 60)
    token = t.source_token if mode == "source" else t.destination_token
    peer = destination(service, stack, pki[0], token, {"SSH": echo}, mode=mode, subprotocols=(version,))
    partner_token = t.destination_token if mode == "source" else t.source_token
    partner = destination(service, stack, pki[0], partner_token, {"SSH": echo}, mode=_other_mode(mode))
    peer.send_raw(data)
    assert peer.wait(lambda d: d.closed is not None)
    assert (peer.closed.code, words in peer.closed.reason) == (code, True), peer.closed
    assert service.wait_connected(t.tunnel_id, mode, connected=False, timeout=pace.scaled(10))
    # Nothing of it went through; but a message over the size limit is relayed as it streams in, so what came
    # whole before the limit was crossed has been passed on (here: ignorable messages of an unknown type).
    passed = [m.type for m in partner.received]
    assert passed == [T.SERVICE_IDS] or (code == 1009 and set(passed) == {T.SERVICE_IDS, 99})


def _other_mode(mode: str) -> str:
    return "destination" if mode == "source" else "source"


def test_an_ignorable_message_of_an_unknown_type_is_passed_on(service, echo, stack, pki):
    t = service.open("gw-1", ["SSH"], 60)
    src = destination(service, stack, pki[0], t.source_token, mode="source")
    dest = destination(service, stack, pki[0], t.destination_token, {"SSH": echo})
    future = Message(99, ignorable=True, payload=b"from a later protocol")
    src.send(future)
    assert dest.wait(lambda d: future in d.received)
    assert not src.ended


# -- fault knobs -----------------------------------------------------------------------------------------------------


def test_fault_knobs_for_a_devices_refusals(service, echo, stack, pki):
    ca = pki[0]
    t = service.open("gw-1", ["SSH"], 60)
    service.foreign_certificate = True
    with pytest.raises(ssl.SSLCertVerificationError):
        upgrade(service.port, ca, token=t.destination_token)
    with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        SourceProxy("localhost", service.port, ca, t.source_token, {"SSH": ("127.0.0.1", 0)}).start()
    service.foreign_certificate = False

    service.answer_subprotocol = "aws.iot.securetunneling-9.0"
    up = upgrade(service.port, ca, token=t.destination_token, client_token=CLIENT_A)
    up.close()
    assert "unrecognized subprotocol aws.iot.securetunneling-9.0" in up.error
    with pytest.raises(ConnectionError, match="aws.iot.securetunneling-9.0"):
        SourceProxy(
            "localhost", service.port, ca, t.source_token, {"SSH": ("127.0.0.1", 0)}, client_token=CLIENT_B
        ).start()
    service.answer_subprotocol = None

    dest = destination(service, stack, ca, t.destination_token, {"SSH": echo}, client_token=CLIENT_A)
    assert service.send_raw(t.tunnel_id, "destination", b"\x00\x03\xff\xff\xff")
    assert dest.wait(lambda d: "truncated" in d.frame_error or "invalid" in d.frame_error or bool(d.frame_error))
    assert service.send_raw(t.tunnel_id, "destination", b"\x01" * 200_000)
    assert dest.wait(lambda d: d.largest_ws_message == 200_000)
    assert not service.send_raw(t.tunnel_id, "source", b"nobody is there")
    assert not service.blip(t.tunnel_id, "source")


def test_awscrts_websocket_client_connects_and_hears_the_service_ids(tmp_path, pki):
    """The device agent's WebSocket is awscrt's: its handshake, TLS and framing work here unchanged, and a
    refusal reaches it as an HTTP status. (No leak check: awscrt keeps its event-loop threads for the process.)"""
    import awscrt.io
    import awscrt.websocket as crt_ws

    reg = Registry(tmp_path / "registry.sqlite")
    service = TunnelService(TunnelRegistry(reg.db, reg.lock), pki[1], pki[2]).start()
    try:
        t = service.open("gw-1", ["SSH", "VNC"], 60)

        def connect(client_token: str):
            req = crt_ws.create_handshake_request(host="localhost", path="/tunnel?local-proxy-mode=destination")
            req.headers.add("access-token", t.destination_token)
            req.headers.add("client-token", client_token)
            req.headers.add("Sec-WebSocket-Protocol", f"{V3}, {V2}")
            opts = awscrt.io.TlsContextOptions()
            opts.override_default_trust_store_from_path(None, str(pki[0]))
            tls = awscrt.io.ClientTlsContext(opts).new_connection_options()
            tls.set_server_name("localhost")
            setup, received, down, heard = threading.Event(), bytearray(), threading.Event(), threading.Event()
            box: dict = {"heard": heard}

            def on_setup(data) -> None:
                box["setup"] = data
                setup.set()

            def on_payload(data) -> None:
                received.extend(data.data)
                if len(received) >= 2 and len(received) >= 2 + int.from_bytes(received[:2], "big"):
                    box["messages"] = Deframer().feed(bytes(received))
                    heard.set()

            crt_ws.connect(
                host="localhost",
                port=service.port,
                handshake_request=req,
                tls_connection_options=tls,
                on_connection_setup=on_setup,
                on_connection_shutdown=lambda data: down.set(),
                on_incoming_frame_payload=on_payload,
            )
            assert setup.wait(pace.scaled(10))
            return box, down

        box, down = connect(CLIENT_A)
        data = box["setup"]
        assert data.exception is None, data.exception
        headers = {k.lower(): v for k, v in data.handshake_response_headers}
        assert headers["sec-websocket-protocol"] == V3 and len(headers["channel-id"]) == 32
        assert box["heard"].wait(pace.scaled(10))
        assert box["messages"] == [Message(T.SERVICE_IDS, available_service_ids=("SSH", "VNC"))]
        assert service.wait_connected(t.tunnel_id, "destination", timeout=pace.scaled(10))

        refused_box, _ = connect(CLIENT_B)  # the token is bound to CLIENT_A now
        assert refused_box["setup"].exception is not None
        assert refused_box["setup"].handshake_response_status == 403

        data.websocket.close()
        assert down.wait(pace.scaled(10))
        assert service.wait_connected(t.tunnel_id, "destination", connected=False, timeout=pace.scaled(10))
    finally:
        service.stop()
        reg.close()


# -- the registry ----------------------------------------------------------------------------------------------------


def test_the_registry_checks_what_it_opens_and_keeps_no_token(leakcheck, tmp_path):
    reg = Registry(tmp_path / "registry.sqlite")
    clock = [1000.0]
    tunnels = TunnelRegistry(reg.db, reg.lock, now=lambda: clock[0])
    try:
        for thing, services, timeout in (
            ("gw 1", ["SSH"], 60),
            ("gw", [], 60),
            ("gw", ["A", "B", "C", "D"], 60),
            ("gw", ["SSH", "SSH"], 60),
            ("gw", ["S S"], 60),
            ("gw", ["x" * 129], 60),
            ("gw", ["SSH"], 0),
            ("gw", ["SSH"], 12 * 3600 + 1),
        ):
            with pytest.raises(ValueError):
                tunnels.open(thing, services, timeout)
        t = tunnels.open("gw-1", ["SSH", "HTTP"], 60)
        [(topic, body)] = tunnels.take_outbox()
        assert topic == "$aws/things/gw-1/tunnels/notify"
        assert json.loads(body) == {
            "clientAccessToken": t.destination_token,
            "clientMode": "destination",
            "region": "us-east-1",
            "services": ["SSH", "HTTP"],
        }
        assert tunnels.take_outbox() == []  # once
        dump = "\n".join(reg.db.iterdump())
        assert t.source_token not in dump and t.destination_token not in dump
        quiet = tunnels.open("gw-2", ["SSH"], 60)
        tunnels.close(quiet.tunnel_id)  # closed before its notification went out: never announced
        assert tunnels.take_outbox() == []
        for i in range(MAX_OPEN_TUNNELS - 1):
            tunnels.open(f"gw-{i}", ["SSH"], 60)
        with pytest.raises(ValueError, match=f"{MAX_OPEN_TUNNELS} tunnels are open"):
            tunnels.open("gw-x", ["SSH"], 60)
        clock[0] += 61  # every tunnel's lifetime is over
        assert {x.status for x in tunnels.list()} == {"CLOSED"}
        assert tunnels.authorize(t.source_token, "source", None) == (None, (403, "tunnel is closed"))
        assert tunnels.open("gw-y", ["SSH"], 60).status == "OPEN"
    finally:
        reg.close()


# -- the CLI and the services process --------------------------------------------------------------------------------


def _cli(cloud, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(cloud.directory), *args],
        capture_output=True,
        text=True,
        timeout=pace.scaled(30),
    )


def _connect(cloud, stack: contextlib.ExitStack, *args: str) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "localcloud", "--dir", str(cloud.directory), "tunnels", "connect", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout])
    reader.start()

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(pace.scaled(10))
        reader.join(pace.scaled(10))
        proc.stdout.close()
        proc.stderr.close()

    stack.callback(stop)
    return proc, lines


def _first_line(proc: subprocess.Popen, lines: queue.Queue) -> str:
    try:
        return lines.get(timeout=pace.scaled(15))
    except queue.Empty:
        proc.kill()
        proc.wait(pace.scaled(10))
        raise AssertionError(f"`tunnels connect` said nothing (exit {proc.returncode}): {proc.stderr.read()}") from None


def test_the_cli_opens_a_tunnel_the_device_is_notified_and_connect_forwards(tmp_path, echo, stack):
    from cloudkit import provision_device

    from localcloud.cloud import LocalCloud

    cloud = LocalCloud(tmp_path / "cloud")
    stack.callback(cloud.registry.close)
    cloud.registry.allow_serials(["SN-T1"])
    info = cloud.up()
    stack.callback(cloud.down)
    assert info["tunnels_port"] not in (info["port"], info["artifacts_port"])
    device, _ = provision_device(cloud, info, tmp_path, "SN-T1")  # its own policy lets it hear the notification
    stack.callback(device.stop)
    thing = device.client_id
    assert device.subscribe(f"$aws/things/{thing}/tunnels/notify") < 128

    assert _cli(cloud, "tunnels", "open", "--thing", "gw-9", "--services", "SSH").returncode == 2  # no such thing
    r = _cli(cloud, "tunnels", "open", "--thing", thing, "--services", "SSH", "--timeout", "10m")
    assert r.returncode == 0, r.stderr
    opened = json.loads(r.stdout)
    note = json.loads(device.expect(f"$aws/things/{thing}/tunnels/notify", timeout=pace.scaled(10)))
    assert note == {
        "clientAccessToken": opened["destinationAccessToken"],
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    }
    dest = FakeDestination(info["tunnels_port"], cloud.ca.cert_path, note["clientAccessToken"], {"SSH": echo})
    stack.callback(dest.connect().close)

    token_file = tmp_path / "source-token"
    token_file.write_text(opened["sourceAccessToken"])
    proc, lines = _connect(cloud, stack, "--token-file", str(token_file), "--listen", "SSH=127.0.0.1:0")
    line = _first_line(proc, lines)
    assert line.startswith("SSH listening on 127.0.0.1:"), line
    with socket.create_connection(("127.0.0.1", int(line.rsplit(":", 1)[1])), timeout=pace.scaled(10)) as c:
        assert roundtrip(c, b"through the CLI") == b"through the CLI"
    listing = _cli(cloud, "tunnels", "list").stdout
    assert f"{opened['tunnelId']}\tOPEN\t{thing}\tSSH\tsource CONNECTED\tdestination CONNECTED" in listing

    r = _cli(cloud, "tunnels", "close", opened["tunnelId"])
    assert (r.returncode, r.stdout.strip()) == (0, f"{opened['tunnelId']} CLOSED")
    assert proc.wait(pace.scaled(15)) == 1
    assert "the tunnel ended" in proc.stderr.read()
    assert dest.wait(lambda d: d.closed is not None)
    assert f"{opened['tunnelId']}\tCLOSED" in _cli(cloud, "tunnels", "list").stdout
    assert _cli(cloud, "tunnels", "close", "no-such-tunnel").returncode == 2

    # Ctrl-C / SIGTERM ends `connect` quietly.
    second = json.loads(_cli(cloud, "tunnels", "open", "--thing", thing, "--services", "SSH").stdout)
    proc, lines = _connect(cloud, stack, f"--token={second['sourceAccessToken']}", "--listen", "SSH=127.0.0.1:0")
    assert _first_line(proc, lines).startswith("SSH listening on")
    proc.terminate()
    assert proc.wait(pace.scaled(15)) == 0
