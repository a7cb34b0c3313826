"""The source side of a secure tunnel: what AWS's localproxy does in source mode, for the local cloud.

`SourceProxy` connects to a tunneling endpoint with the source access token, waits for SERVICE_IDS (the
tunnel's services), then listens on one local TCP port per service it was given. Each accepted connection
becomes a stream or a connection of one (V3WebSocketProtocolGuide.md, "Protocol behavior model"): the first
connection of a service sends STREAM_START with a new stream id and connection id 1, later ones while that
stream lives send CONNECTION_START with a new connection id; bytes read go out as DATA (at most MAX_PAYLOAD
per message); a local close sends CONNECTION_RESET. From the tunnel, DATA of the current stream and a known
connection is written to that connection; CONNECTION_RESET closes one connection and STREAM_RESET every
connection of the stream (after writing what they still hold; the stream is then gone and the next local
connection starts a new one); SESSION_RESET closes everything. Messages of other stream ids are stale and
dropped. With protocol v2 (only when asked for), a stream carries one connection: no connection ids, a
local close sends STREAM_RESET, and a second connection to a service while one is open is refused.

Back-pressure both ways, with bounded buffers: local sockets are read only while the bytes waiting for the
WebSocket are under `buffer_bytes`, and the WebSocket only while no local connection holds more than that.
A lost WebSocket ends the proxy (no reconnect): its local connections are closed and `ended` is set.

One thread (a selector) owns every socket; TLS and WebSocket go through localcloud.tls_websocket.TlsWebSocket.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from wsproto.connection import ConnectionState
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
from wsproto.utilities import LocalProtocolError

from agent.tunneling.frames import MAX_PAYLOAD, Deframer, FrameError, Message, MessageType, frame

from .tls_websocket import MAX_WS_MESSAGE, TlsWebSocket
from .tunnels import HIGH_WATER, SUBPROTOCOLS, TICK_S

log = logging.getLogger("localcloud.tunnel_source")

MAX_REFUSAL_BODY = 1024


class TunnelRefused(ConnectionError):
    """The endpoint answered the handshake with an HTTP status (4xx: do not retry with the same request)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"the tunneling endpoint refused the handshake: HTTP {status} {reason}".rstrip())
        self.status = status
        self.reason = reason


@dataclass(eq=False)
class _Local:
    sock: socket.socket
    service: str
    stream_id: int
    conn_id: int
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False  # close once `out` is written (the tunnel ended it, or the client did)
    events: int = 0


@dataclass(eq=False)
class _Stream:
    stream_id: int
    conns: dict[int, _Local] = field(default_factory=dict)
    next_conn: int = 1


class SourceProxy:
    """Source mode: `listen` maps each service id to the local (host, port) to listen on (port 0: a free one;
    `addresses` has the real ones after start()). start() returns once the tunnel is connected and listening,
    or raises (TunnelRefused, ConnectionError, ValueError for services the tunnel does not have). `on_end(reason)`
    runs on the proxy's own thread when the tunnel ends: it may set an event, not call stop()."""

    def __init__(
        self,
        url_host: str,
        port: int,
        ca_file: Path | str,
        token: str,
        listen: dict[str, tuple[str, int]],
        *,
        connect_host: str | None = None,
        client_token: str | None = None,
        subprotocols: tuple[str, ...] = ("aws.iot.securetunneling-3.0",),
        connect_timeout_s: float = 10.0,
        buffer_bytes: int = HIGH_WATER,
        max_connections: int = 64,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        if not listen:
            raise ValueError("listen: at least one service")
        unknown = [p for p in subprotocols if p not in SUBPROTOCOLS]
        if unknown or not subprotocols:
            raise ValueError(f"subprotocols: some of {', '.join(SUBPROTOCOLS)}")
        self.url_host = url_host
        self.connect_host = connect_host or url_host
        self.port = port
        self.ca_file = Path(ca_file)
        self._token = token
        self.client_token = client_token
        self.listen = dict(listen)
        self.subprotocols = subprotocols
        self.connect_timeout_s = connect_timeout_s
        self.buffer_bytes = buffer_bytes
        self.max_connections = max_connections
        self.on_end = on_end
        self.version = 0
        self.available: tuple[str, ...] = ()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.ended = threading.Event()
        self.end_reason = ""
        self.changed = threading.Condition()  # notified when connections open or close, and at the end
        self._ready = threading.Event()
        self._deadline = 0.0
        self._failure: BaseException | None = None
        self._ws: TlsWebSocket | None = None
        self._deframer = Deframer()
        self._message_bytes = 0
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listeners: dict[socket.socket, str] = {}
        self._listener_events: dict[socket.socket, int] = {}
        self._ws_events = 0
        self._streams: dict[str, _Stream] = {}
        self._locals: set[_Local] = set()
        self._next_stream = 1
        self._open_counts: dict[str, int] = {}
        self._peak = 0  # the most bytes held for the WebSocket or for one local connection

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> dict[str, tuple[str, int]]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        sock = socket.create_connection((self.connect_host, self.port), timeout=self.connect_timeout_s)
        self._ws = TlsWebSocket(sock, ctx, server_side=False, server_hostname=self.url_host)
        headers = [(b"access-token", self._token.encode())]
        if self.client_token:
            headers.append((b"client-token", self.client_token.encode()))
        self._ws.request(
            Request(
                host=self.url_host,
                target="/tunnel?local-proxy-mode=source",
                extra_headers=headers,
                subprotocols=list(self.subprotocols),
            )
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._deadline = time.monotonic() + self.connect_timeout_s
        self._thread = threading.Thread(target=self._run, name="tunnel-source", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.connect_timeout_s + 5) and self._failure is None:
            self._failure = TimeoutError("the tunnel did not become ready")
        if self._failure is not None:
            failure = self._failure
            self.stop()
            raise failure
        return dict(self.addresses)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the tunnel source's thread did not end within {timeout} s")
        self._thread = None

    def open_connections(self, service: str | None = None) -> int:
        with self.changed:
            return self._open(service)

    def peak_buffered(self) -> int:
        return self._peak

    def wait_connections(self, n: int, service: str | None = None, timeout: float = 10.0) -> bool:
        """Whether `n` local connections (of `service`, or all) are open within `timeout` seconds (callers
        scale it: pace)."""
        with self.changed:
            return self.changed.wait_for(lambda: self._open(service) == n, timeout)

    def _open(self, service: str | None) -> int:
        return sum(self._open_counts.values()) if service is None else self._open_counts.get(service, 0)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._sel is not None and self._ws is not None
        reason = "stopped"
        try:
            self._sel.register(self._ws.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "ws")
            self._ws_events = selectors.EVENT_READ | selectors.EVENT_WRITE
            while not self._stop.is_set():
                self._interest()
                for key, mask in self._sel.select(TICK_S):
                    if key.data == "wake":
                        with contextlib.suppress(OSError):
                            while self._wake_r and self._wake_r.recv(4096):
                                pass
                    elif key.data == "ws":
                        if mask & selectors.EVENT_WRITE:
                            self._ws.flush()
                        if mask & selectors.EVENT_READ:
                            self._ws_read()
                    elif isinstance(key.data, str):
                        self._accept(cast(socket.socket, key.fileobj), key.data)
                    else:
                        loc = key.data
                        if mask & selectors.EVENT_WRITE:
                            self._local_write(loc)
                        if mask & selectors.EVENT_READ and loc in self._locals:
                            self._local_read(loc)
                if self.end_reason:
                    reason = self.end_reason
                    break
                if self._ws.dead:
                    reason = f"the WebSocket was lost ({self._ws.error or 'connection closed'})"
                    break
                if not self._ready.is_set() and time.monotonic() > self._deadline:
                    raise TimeoutError(f"no tunnel within {self.connect_timeout_s} s")
            self._ws.flush()
        except Exception as e:
            if not self._ready.is_set():
                self._failure = e
            else:
                log.exception("the tunnel source failed")
            reason = str(e) or e.__class__.__name__
        finally:
            self._shutdown(reason)

    def _interest(self) -> None:
        assert self._sel is not None and self._ws is not None
        held = max((len(loc.out) for loc in self._locals), default=0)
        self._peak = max(self._peak, held, len(self._ws.out))
        want = selectors.EVENT_READ if held < self.buffer_bytes else 0
        if self._ws.out:
            want |= selectors.EVENT_WRITE
        if want != self._ws_events:
            self._modify(self._ws.sock, self._ws_events, want, "ws")
            self._ws_events = want
        room = len(self._ws.out) < self.buffer_bytes
        for loc in self._locals:
            want = selectors.EVENT_READ if room and not loc.closing else 0
            if loc.out:
                want |= selectors.EVENT_WRITE
            if want != loc.events:
                self._modify(loc.sock, loc.events, want, loc)
                loc.events = want
        accepting = len(self._locals) < self.max_connections
        for lsock, service in self._listeners.items():
            want = selectors.EVENT_READ if accepting else 0
            if want != self._listener_events[lsock]:
                self._modify(lsock, self._listener_events[lsock], want, service)
                self._listener_events[lsock] = want

    def _modify(self, sock: socket.socket, old: int, new: int, data: object) -> None:
        assert self._sel is not None
        if old and new:
            self._sel.modify(sock, new, data)
        elif new:
            self._sel.register(sock, new, data)
        elif old:
            self._sel.unregister(sock)

    # -- the WebSocket -------------------------------------------------------------------------------------------
    def _ws_read(self) -> None:
        ws = self._ws
        assert ws is not None
        events = ws.receive()
        if ws.bad_request is not None:
            raise ConnectionError(f"the tunneling endpoint's answer was not acceptable: {ws.bad_request}")
        refusal: RejectConnection | None = None
        body = bytearray()
        for ev in events:
            if isinstance(ev, AcceptConnection):
                self.version = SUBPROTOCOLS.get(ev.subprotocol or "", 0)
                if not self.version:
                    raise ConnectionError(f"the tunneling endpoint chose protocol {ev.subprotocol!r}")
            elif isinstance(ev, RejectConnection):
                refusal = ev
                if not ev.has_body:
                    raise TunnelRefused(ev.status_code, "")
            elif isinstance(ev, RejectData):
                body += ev.data[: MAX_REFUSAL_BODY - len(body)]
                if ev.body_finished and refusal is not None:
                    raise TunnelRefused(refusal.status_code, body.decode("utf-8", "replace").strip())
            elif isinstance(ev, BytesMessage):
                self._message_bytes += len(ev.data)
                if self._message_bytes > MAX_WS_MESSAGE:
                    return self._end(f"a WebSocket message larger than {MAX_WS_MESSAGE} bytes", 1009)
                if ev.message_finished:
                    self._message_bytes = 0
                try:
                    messages = self._deframer.feed(bytes(ev.data))
                except FrameError as e:
                    return self._end(f"malformed tunnel message: {e}", 1002)
                for m in messages:
                    self._on_message(m)
                    if self.end_reason:
                        return None
            elif isinstance(ev, TextMessage):
                return self._end("a text frame from the tunneling endpoint", 1003)
            elif isinstance(ev, Ping):
                ws.send(ev.response())
            elif isinstance(ev, CloseConnection):
                with contextlib.suppress(LocalProtocolError):
                    ws.send(ev.response())
                self.end_reason = f"the tunneling endpoint closed the WebSocket ({ev.code} {ev.reason or ''})".rstrip()
                return None
        if ws.dead and not self._ready.is_set():
            raise ConnectionError(f"the tunneling endpoint closed the connection ({ws.error or 'no answer'})")
        return None

    def _end(self, reason: str, code: int) -> None:
        assert self._ws is not None
        with contextlib.suppress(LocalProtocolError):
            self._ws.send(CloseConnection(code=code, reason=reason[:120]))
        self.end_reason = reason
        if not self._ready.is_set():
            raise ConnectionError(reason)

    def _send(self, *messages: Message) -> None:
        assert self._ws is not None
        self._ws.send_frames([frame(m) for m in messages])

    def _on_message(self, m: Message) -> None:
        t = m.type
        if t == MessageType.SERVICE_IDS:
            self.available = tuple(m.available_service_ids)
            if not self._ready.is_set():
                self._listen()
            return
        if t == MessageType.SESSION_RESET:
            for ended in list(self._streams.values()):
                self._end_stream(ended)
            self._streams.clear()
            return
        if t not in (
            MessageType.DATA,
            MessageType.STREAM_RESET,
            MessageType.CONNECTION_RESET,
            MessageType.STREAM_START,
            MessageType.CONNECTION_START,
        ):
            if not m.ignorable:
                log.info("tunnel source: message type %s ignored", t)
            return
        service = m.service_id or (next(iter(self.listen)) if len(self.listen) == 1 else "")
        stream = self._streams.get(service)
        if stream is None or stream.stream_id != m.stream_id:
            return  # stale: of a stream that has ended, or never was
        conn_id = m.connection_id or 1  # no connection id: the peer speaks v2 (the guide: read it as 1)
        if t == MessageType.DATA:
            loc = stream.conns.get(conn_id)
            if loc is not None and not loc.closing:
                loc.out += m.payload
        elif t == MessageType.CONNECTION_RESET:
            loc = stream.conns.pop(conn_id, None)
            if loc is not None:
                self._retire(loc)
        elif t == MessageType.STREAM_RESET:
            self._end_stream(stream)
            del self._streams[service]
        else:  # STREAM_START / CONNECTION_START: a source never receives them (the guide: an error)
            log.warning("tunnel source: %s received; ending stream %d of %s", MessageType(t).name, m.stream_id, service)
            self._end_stream(stream)
            del self._streams[service]

    def _end_stream(self, stream: _Stream) -> None:
        for loc in list(stream.conns.values()):
            self._retire(loc)
        stream.conns.clear()

    # -- local connections ---------------------------------------------------------------------------------------
    def _listen(self) -> None:
        missing = [s for s in self.listen if s not in self.available]
        if missing:
            raise ValueError(
                f"service(s) {', '.join(missing)} not in the tunnel's services ({', '.join(self.available) or 'none'})"
            )
        for service, (host, port) in self.listen.items():
            lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind((host, port))
                lsock.listen(16)
                lsock.setblocking(False)
            except OSError as e:
                lsock.close()
                raise ConnectionError(f"{service}: cannot listen on {host}:{port}: {e.strerror or e}") from None
            self._listeners[lsock] = service
            self._listener_events[lsock] = 0
            self.addresses[service] = lsock.getsockname()[:2]
        log.info(
            "tunnel source: connected (protocol v%d); %s",
            self.version,
            ", ".join(f"{s} on {h}:{p}" for s, (h, p) in self.addresses.items()),
        )
        self._ready.set()

    def _accept(self, lsock: socket.socket, service: str) -> None:
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("tunnel source: %s: accept failed: %s", service, e)
            return
        sock.setblocking(False)
        stream = self._streams.get(service)
        if self.version == 2:
            if stream is not None and stream.conns:
                log.info("tunnel source: %s: a second connection refused (protocol v2: one per stream)", service)
                sock.close()
                return
            stream = None  # v2: every connection is a stream of its own
        if stream is None:
            stream = self._streams[service] = _Stream(self._next_stream)
            self._next_stream += 1
            conn_id = stream.next_conn
            stream.next_conn += 1
            self._send(
                Message(
                    MessageType.STREAM_START,
                    stream_id=stream.stream_id,
                    service_id=service,
                    connection_id=conn_id if self.version == 3 else 0,
                )
            )
        else:
            conn_id = stream.next_conn
            stream.next_conn += 1
            self._send(
                Message(
                    MessageType.CONNECTION_START, stream_id=stream.stream_id, service_id=service, connection_id=conn_id
                )
            )
        loc = _Local(sock, service, stream.stream_id, conn_id)
        stream.conns[conn_id] = loc
        self._locals.add(loc)
        self._counted(service, +1)

    def _local_read(self, loc: _Local) -> None:
        try:
            data = loc.sock.recv(MAX_PAYLOAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        stream = self._streams.get(loc.service)
        if stream is None or stream.conns.get(loc.conn_id) is not loc:
            self._retire(loc)  # its stream ended while the bytes were on their way
            return
        conn_id = loc.conn_id if self.version == 3 else 0
        if data:
            self._send(
                Message(
                    MessageType.DATA,
                    stream_id=loc.stream_id,
                    service_id=loc.service,
                    connection_id=conn_id,
                    payload=data,
                )
            )
            return
        # The client is done: tell the tunnel (v2 has only the stream to reset), then finish writing to it.
        reset = MessageType.CONNECTION_RESET if self.version == 3 else MessageType.STREAM_RESET
        self._send(Message(reset, stream_id=loc.stream_id, service_id=loc.service, connection_id=conn_id))
        del stream.conns[loc.conn_id]
        if self.version == 2:
            del self._streams[loc.service]
        self._retire(loc)

    def _local_write(self, loc: _Local) -> None:
        try:
            n = loc.sock.send(loc.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            loc.out.clear()
            loc.closing = True
            n = 0
        del loc.out[:n]
        if loc.closing and not loc.out:
            self._drop(loc)

    def _retire(self, loc: _Local) -> None:
        """No more reading; the socket closes once what it holds is written."""
        loc.closing = True
        if not loc.out:
            self._drop(loc)

    def _drop(self, loc: _Local) -> None:
        if loc not in self._locals:
            return
        if loc.events and self._sel is not None:
            self._sel.unregister(loc.sock)
            loc.events = 0
        with contextlib.suppress(OSError):
            loc.sock.close()
        self._locals.discard(loc)
        stream = self._streams.get(loc.service)
        if stream is not None and stream.conns.get(loc.conn_id) is loc:
            del stream.conns[loc.conn_id]
        self._counted(loc.service, -1)

    def _counted(self, service: str, delta: int) -> None:
        with self.changed:
            self._open_counts[service] = self._open_counts.get(service, 0) + delta
            self.changed.notify_all()

    def _shutdown(self, reason: str) -> None:
        for loc in list(self._locals):
            if loc.out:  # a last try: the connection is closed either way
                with contextlib.suppress(OSError):
                    loc.sock.send(loc.out)
            self._drop(loc)
        self._streams.clear()
        if self._ws is not None:
            if self._ws.ws.state is ConnectionState.OPEN:
                with contextlib.suppress(LocalProtocolError):
                    self._ws.send(CloseConnection(code=1000, reason="source stopping"))
                self._ws.flush()
            self._ws.close()
        for lsock in self._listeners:
            lsock.close()
        self._listeners.clear()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None
        self.end_reason = self.end_reason or reason
        if not self._ready.is_set() and self._failure is None:
            self._failure = ConnectionError(self.end_reason)
        if self._ready.is_set():
            log.info("tunnel source: ended: %s", self.end_reason)
        with self.changed:
            self.ended.set()
            self.changed.notify_all()
        self._ready.set()
        if self.on_end is not None:
            self.on_end(self.end_reason)
