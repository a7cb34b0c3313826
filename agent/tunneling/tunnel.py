"""One open tunnel: its WebSocket to the tunneling service, its local TCP connections, one thread.

The WebSocket is awscrt's (already loaded for MQTT: no new dependency and no added library memory);
its callbacks run on the CRT's event-loop thread and only decode, ask the protocol state machine
(agent.tunneling.protocol) what to do, and queue bytes. The tunnel's own thread owns every local
socket (a selector: connect, read, write, close), reconnects after a network drop with the client
token, and ends the tunnel at its lifetime.

Every buffer is bounded, both ways. Towards the local services: the WebSocket's read window is given
back only for bytes written out (or dropped), so a slow service stops the WebSocket's reading and the
service's sender waits; nothing piles up here. Towards the tunnel: local sockets are read only while
the bytes handed to the WebSocket and not yet sent stay under the limit.

Refusals and protocol errors are log lines that never carry the access token (a tunnel is named by
a digest of it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base import digest
from agent.tunneling.config import TunnelingConfig, is_loopback, split_target
from agent.tunneling.frames import Deframer, FrameError, Message, frame
from agent.tunneling.protocol import Action, Close, ConnKey, Destination, Fail, Open, Refuse, Send, Write

log = logging.getLogger("agent")

SUBPROTOCOLS = {"aws.iot.securetunneling-3.0": 3, "aws.iot.securetunneling-2.0": 2}
# A WebSocket frame of this protocol is at most 2 + 131,074 bytes (the guides); anything larger is hostile.
MAX_WS_FRAME = 131076
READ_CHUNK = 16 * 1024
MAX_REFUSALS_LOGGED = 20


_TLS_CONTEXTS: dict[tuple[str, int], Any] = {}
_TLS_LOCK = threading.Lock()


def _tls_context(ca_file: Path) -> Any:
    """One TLS context per CA file (and its version), shared by every tunnel: a context holds the parsed
    trust store, most of what a tunnel would otherwise cost in memory."""
    import awscrt.io

    key = (str(ca_file), os.stat(ca_file).st_mtime_ns)
    with _TLS_LOCK:
        ctx = _TLS_CONTEXTS.get(key)
        if ctx is None:
            opts = awscrt.io.TlsContextOptions()
            opts.override_default_trust_store_from_path(None, str(ca_file))  # only this CA
            ctx = awscrt.io.ClientTlsContext(opts)
            _TLS_CONTEXTS.clear()  # a replaced CA file: the old context goes
            _TLS_CONTEXTS[key] = ctx
        return ctx


def tunnel_id(token: str) -> str:
    """A name for logs and status: the access token itself is a credential and is never shown."""
    return digest.sha256(token.encode()).hexdigest()[:12]


@dataclass(eq=False)
class LocalConn:
    key: ConnKey
    target: str
    opened_at: float = field(default_factory=time.time)
    sock: socket.socket | None = None
    connecting: bool = True
    outbuf: collections.deque[bytes] = field(default_factory=collections.deque)
    to_service: int = 0  # bytes written to the local service
    from_service: int = 0  # bytes read from it
    closing: str | None = None  # the reason, once the source ended it: flush, then close
    events: int = 0


class Tunnel:
    """A destination-side tunnel; start() returns at once, the tunnel's thread does the rest."""

    def __init__(
        self,
        *,
        token: str,
        services: tuple[str, ...],
        host: str,
        port: int,
        ca_file: Path,
        cfg: TunnelingConfig,
        connect_timeout_s: float,
        on_end: Callable[[Tunnel], None] = lambda t: None,
    ) -> None:
        self.id = tunnel_id(token)
        self._token = token
        self.services = services
        self.host, self.port, self.ca_file, self.cfg = host, port, ca_file, cfg
        self.connect_timeout_s = connect_timeout_s
        self.on_end = on_end
        self.client_token = digest.token_hex(24)  # 48 of [0-9a-f]: within the 32-128 the service accepts
        self.opened_at = time.time()
        self.state = "connecting"
        self.version = 0
        self.end_reason = ""
        self.limit = cfg.buffer_kib * 1024
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ws: Any = None
        self._ws_down = threading.Event()
        self._ws_shutdown_done = threading.Event()
        self._core: Destination | None = None
        self._deframer = Deframer()
        self._conns: dict[ConnKey, LocalConn] = {}
        self._opens: collections.deque[Open] = collections.deque()
        self._held = 0  # bytes queued for local services
        self._withheld = 0  # read window not yet given back
        self._inflight = 0  # bytes handed to the WebSocket, not yet sent
        self._frame_len = 0
        self._fatal = ""
        self._refusals = 0
        self._sel: selectors.DefaultSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # --- the outside ------------------------------------------------------------------------------

    def start(self) -> Tunnel:
        self._thread = threading.Thread(target=self._run, name=f"tunnel-{self.id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, reason: str = "stopped", wait_s: float = 10.0) -> None:
        with self._lock:
            if not self.end_reason:
                self.end_reason = reason
        self._stop.set()
        self._wake()
        self._close_ws()
        t = self._thread
        if t and t is not threading.current_thread():
            t.join(wait_s)

    def info(self) -> dict[str, Any]:
        with self._lock:
            by_service: dict[str, int] = {}
            for k in self._conns:
                by_service[k.service] = by_service.get(k.service, 0) + 1
            return {
                "id": self.id,
                "services": list(self.services),
                "state": self.state,
                "protocol": self.version or None,
                "opened_at": int(self.opened_at),
                "connections": by_service,
            }

    @property
    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    # --- the tunnel's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        life_end = self.opened_at + self.cfg.lifetime_s
        dropped_at: float | None = None
        attempts = 0
        delay = 0.5
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set() and time.time() < life_end:
                if self._connect():
                    attempts, delay, dropped_at = 0, 0.5, None
                    with self._lock:
                        self.state = "open"
                    self._serve(life_end)
                    self._end_connections()
                    if self._stop.is_set() or self._fatal or time.time() >= life_end:
                        break
                    dropped_at = time.monotonic()
                    log.warning("tunnel %s: the connection to the tunneling service dropped; reconnecting", self.id)
                elif self._fatal:
                    break
                attempts += 1
                if dropped_at is None:
                    dropped_at = time.monotonic()
                if attempts > 30 or time.monotonic() - dropped_at > self.cfg.reconnect_s:
                    self._fatal = self._fatal or f"could not reconnect within {self.cfg.reconnect_s:g} s"
                    break
                with self._lock:
                    self.state = "reconnecting"
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, 8.0)
            if time.time() >= life_end and not self._stop.is_set():
                self.end_reason = self.end_reason or f"its lifetime ({self.cfg.lifetime_s:g} s) is over"
        except Exception as e:  # a bug must end this tunnel, not the agent
            log.exception("tunnel %s: failed", self.id)
            self._fatal = self._fatal or f"internal error ({e.__class__.__name__})"
        finally:
            self._end_connections()
            if self._ws is not None:
                self._close_ws()
                self._ws_shutdown_done.wait(5.0)
            self._ws = None
            with self._lock:
                self.state = "ended"
                reason = self.end_reason or self._fatal or "ended"
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            if self._refusals > MAX_REFUSALS_LOGGED:
                log.warning("tunnel %s: %d refusals in all", self.id, self._refusals)
            log.info("tunnel %s closed: %s", self.id, reason)
            self.on_end(self)

    def _connect(self) -> bool:
        """One handshake; False with self._fatal set when retrying cannot help (a 4xx answer, a server
        certificate not accepted, a protocol version this side does not speak)."""
        import awscrt.io
        import awscrt.websocket as ws

        self._ws_down.clear()
        self._ws_shutdown_done.clear()
        self._deframer = Deframer()
        setup = threading.Event()
        result: dict[str, Any] = {}
        req = ws.create_handshake_request(host=self.host, path="/tunnel?local-proxy-mode=destination")
        req.headers.add("access-token", self._token)
        req.headers.add("client-token", self.client_token)
        req.headers.add("Sec-WebSocket-Protocol", ", ".join(SUBPROTOCOLS))
        try:
            tls = _tls_context(self.ca_file).new_connection_options()
        except Exception as e:
            self._fatal = f"the CA file {self.ca_file} could not be loaded ({getattr(e, 'name', e.__class__.__name__)})"
            log.warning("tunnel %s: %s", self.id, self._fatal)
            return False
        tls.set_server_name(self.host)
        sock_opts = awscrt.io.SocketOptions()
        sock_opts.connect_timeout_ms = int(self.connect_timeout_s * 1000)

        def on_setup(data: Any) -> None:
            # Runs before any frame callback: the state machine must exist before the first message
            # (the service's SERVICE_IDS comes at once).
            result["data"] = data
            if data.websocket is not None:
                self._ws = data.websocket
                headers = {k.lower(): v for k, v in data.handshake_response_headers or ()}
                chosen = headers.get("sec-websocket-protocol", "").strip()
                result["chosen"] = chosen
                if chosen in SUBPROTOCOLS:
                    with self._lock:
                        self.version = SUBPROTOCOLS[chosen]
                        self._core = Destination(self.version, self.cfg.services, self.cfg.max_connections)
                        self._held = self._withheld = self._inflight = 0
            setup.set()

        ws.connect(
            host=self.host,
            port=self.port,
            handshake_request=req,
            tls_connection_options=tls,
            socket_options=sock_opts,
            manage_read_window=True,
            initial_read_window=self.limit,
            on_connection_setup=on_setup,
            on_connection_shutdown=self._on_shutdown,
            on_incoming_frame_begin=self._on_frame_begin,
            on_incoming_frame_payload=self._on_frame_payload,
            on_incoming_frame_complete=self._on_frame_complete,
        )
        # s2n (awscrt's TLS) delays reporting a failed handshake by 10-30 s ("blinding", against timing
        # attacks): a certificate it refuses is only known after that.
        give_up = time.monotonic() + self.connect_timeout_s + 35
        while not setup.wait(0.2) and not self._stop.is_set() and time.monotonic() < give_up:
            pass
        if not setup.is_set():
            if self._stop.is_set():
                return False
            log.warning(
                "tunnel %s: %s:%d did not answer in %g s", self.id, self.host, self.port, self.connect_timeout_s
            )
            return False
        data = result["data"]
        if data.exception is not None:
            name = getattr(data.exception, "name", "") or data.exception.__class__.__name__
            status = data.handshake_response_status
            headers = {k.lower(): v for k, v in data.handshake_response_headers or ()}
            chosen = headers.get("sec-websocket-protocol", "").strip()
            if status == 101 and chosen not in SUBPROTOCOLS:  # awscrt refuses a subprotocol it did not offer
                self._fatal = f"the tunneling service chose protocol {chosen!r}, which this agent does not speak"
            elif status == 101:
                self._fatal = f"the tunneling service's upgrade answer was not valid ({name})"
            elif status is not None and 400 <= status < 500:
                self._fatal = f"the tunneling service refused the handshake (HTTP {status})"
            elif "TLS" in name or "X509" in name or "PKI" in name:
                self._fatal = f"the tunneling service's certificate was not accepted ({name})"
            log.warning(
                "tunnel %s: handshake with %s:%d failed: %s%s%s",
                self.id,
                self.host,
                self.port,
                name,
                f" (HTTP {status})" if status else "",
                f": {self._fatal}; not retrying" if self._fatal else "; retrying",
            )
            return False
        chosen = result.get("chosen", "")
        if chosen not in SUBPROTOCOLS:
            self._fatal = f"the tunneling service chose protocol {chosen!r}, which this agent does not speak"
            log.warning("tunnel %s: %s; closing", self.id, self._fatal)
            self._close_ws()
            return False
        log.info("tunnel %s: connected to %s:%d (protocol v%d)", self.id, self.host, self.port, self.version)
        return True

    def _serve(self, life_end: float) -> None:
        assert self._sel is not None
        while not self._stop.is_set() and not self._ws_down.is_set():
            left = life_end - time.time()
            if left <= 0:
                return
            self._sync()
            for key, mask in self._sel.select(min(1.0, left)):
                conn = key.data
                if conn is None:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._writable(conn)
                if mask & selectors.EVENT_READ and conn.key in self._conns:
                    self._readable(conn)

    # --- local sockets (the tunnel's thread only) -------------------------------------------------

    def _sync(self) -> None:
        """Start queued connections, close finished ones, and set what each socket waits for."""
        while True:
            with self._lock:
                if not self._opens:
                    break
                op = self._opens.popleft()
            self._start_conn(op)
        with self._lock:
            conns = list(self._conns.values())
            reading = self._inflight < self.limit
        for c in conns:
            if c.sock is None:
                continue
            if c.closing is not None and not c.outbuf:
                self._finish(c, c.closing)
                continue
            want = 0
            if c.connecting or c.outbuf:
                want |= selectors.EVENT_WRITE
            if not c.connecting and c.closing is None and reading:
                want |= selectors.EVENT_READ
            if want != c.events:
                assert self._sel is not None
                if c.events and want:
                    self._sel.modify(c.sock, want, c)
                elif want:
                    self._sel.register(c.sock, want, c)
                else:
                    self._sel.unregister(c.sock)
                c.events = want

    def _start_conn(self, op: Open) -> None:
        with self._lock:
            conn = self._conns.get(op.key)
        if conn is None:  # reset before it could start
            return
        try:
            host, port = split_target(op.target)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if not self.cfg.allow_pivot_to_other_hosts:
                infos = [i for i in infos if is_loopback(str(i[4][0]))]
                if not infos:
                    raise OSError(f"{host} does not resolve to a loopback address")
            family, _, proto, _, addr = infos[0]
            s = socket.socket(family, socket.SOCK_STREAM, proto)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock = s
            err = s.connect_ex(addr)
            if err not in (0, 115):  # EINPROGRESS
                raise OSError(err, os.strerror(err))
        except OSError as e:
            self._local_failed(conn, f"could not connect to {op.target}: {e.strerror or e}")

    def _writable(self, c: LocalConn) -> None:
        assert c.sock is not None
        if c.connecting:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._local_failed(c, f"could not connect to {c.target}: {os.strerror(err)}")
                return
            c.connecting = False
            log.debug("tunnel %s: %s connection %d open to %s", self.id, c.key.service, c.key.conn, c.target)
        sent = 0
        try:
            while c.outbuf:
                chunk = c.outbuf[0]
                n = c.sock.send(chunk)
                sent += n
                if n < len(chunk):
                    c.outbuf[0] = chunk[n:]
                    break
                c.outbuf.popleft()
        except BlockingIOError:
            pass
        except OSError as e:
            self._local_failed(c, f"the local service's socket failed ({e.strerror or e})")
        finally:
            if sent:
                c.to_service += sent
                self._release(sent)

    def _readable(self, c: LocalConn) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            self._local_failed(c, f"the local service's socket failed ({e.strerror or e})")
            return
        if not data:
            self._local_failed(c, "closed by the local service")
            return
        c.from_service += len(data)
        with self._lock:
            actions = self._core.local_data(c.key, data) if self._core else []
        self._apply(actions)

    def _local_failed(self, c: LocalConn, reason: str) -> None:
        with self._lock:
            actions = self._core.local_closed(c.key) if self._core else []
        self._apply(actions)
        self._finish(c, reason)

    def _finish(self, c: LocalConn, reason: str) -> None:
        """Closes one local connection; its audit line (service, start, end, bytes each way)."""
        with self._lock:
            if self._conns.get(c.key) is not c:
                return
            del self._conns[c.key]
            dropped = sum(len(b) for b in c.outbuf)
            c.outbuf.clear()
        if dropped:
            self._release(dropped)
        if c.sock is not None:
            if c.events and self._sel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(c.sock)
            c.sock.close()
        log.info(
            "tunnel %s: %s connection %d (stream %d) %s to %s: %s, %d bytes to the service, %d from it",
            self.id,
            c.key.service,
            c.key.conn,
            c.key.stream,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.opened_at)),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            reason,
            c.to_service,
            c.from_service,
        )

    def _end_connections(self) -> None:
        with self._lock:
            actions = self._core.end() if self._core else []
            self._core = None
            self._opens.clear()
        for a in actions:
            if isinstance(a, Close):
                with self._lock:
                    c = self._conns.get(a.key)
                if c is not None:
                    self._finish(c, a.reason)
        for c in list(self._conns.values()):  # any left (opened but never registered with the core)
            self._finish(c, "the tunnel's connection ended")

    # --- actions (either thread) ------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        wake = False
        for a in actions:
            if isinstance(a, Send):
                self._send(a.message)
            elif isinstance(a, Write):
                with self._lock:
                    c = self._conns.get(a.key)
                    if c is not None and c.closing is None:
                        c.outbuf.append(a.data)
                        self._held += len(a.data)
                        wake = True
                    # else: dropped; the frame's bytes are credited back when it completes
            elif isinstance(a, Open):
                with self._lock:
                    self._conns[a.key] = LocalConn(a.key, a.target)
                    self._opens.append(a)
                wake = True
            elif isinstance(a, Close):
                with self._lock:
                    c = self._conns.get(a.key)
                    if c is not None and c.closing is None:
                        c.closing = a.reason
                wake = True
            elif isinstance(a, Refuse):
                self._refusals += 1  # logged up to a bound: a source may ask for refused things in a loop
                if self._refusals <= MAX_REFUSALS_LOGGED:
                    log.warning("tunnel %s: %s", self.id, a.reason)
                if self._refusals == MAX_REFUSALS_LOGGED:
                    log.warning("tunnel %s: further refusals are counted, not logged, until it closes", self.id)
            elif isinstance(a, Fail):
                self._fatal = f"protocol error: {a.reason}"
                log.warning("tunnel %s: %s; closing the tunnel", self.id, self._fatal)
                self._close_ws()
        if wake:
            self._wake()

    def _send(self, m: Message) -> None:
        ws = self._ws
        if ws is None or self._ws_down.is_set():
            return
        import awscrt.websocket

        data = frame(m)
        with self._lock:
            self._inflight += len(data)

        def done(_result: Any, n: int = len(data)) -> None:
            with self._lock:
                before = self._inflight
                self._inflight -= n
            if before >= self.limit > self._inflight:
                self._wake()  # reading local sockets may resume

        ws.send_frame(awscrt.websocket.Opcode.BINARY, data, on_complete=done)

    def _release(self, n: int) -> None:
        """Bytes left this process towards a local service (or were dropped): read more from the tunnel."""
        with self._lock:
            self._held -= n
            give = 0
            if self._withheld and self._held <= self.limit // 2:
                give, self._withheld = self._withheld, 0
        if give:
            self._increment(give)

    def _credit(self, n: int) -> None:
        """A finished WebSocket frame: its bytes count against the read window until they are gone."""
        with self._lock:
            if self._held < self.limit:
                give = n
            else:
                self._withheld += n
                give = 0
        if give:
            self._increment(give)

    def _increment(self, n: int) -> None:
        ws = self._ws
        if ws is not None and not self._ws_down.is_set():
            with contextlib.suppress(Exception):
                ws.increment_read_window(n)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _close_ws(self) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()

    # --- WebSocket callbacks (the CRT's thread) ---------------------------------------------------

    def _on_shutdown(self, _data: Any) -> None:
        self._ws_down.set()
        self._ws_shutdown_done.set()
        self._wake()

    def _on_frame_begin(self, data: Any) -> None:
        import awscrt.websocket as ws

        f = data.frame
        self._frame_len = 0
        if f.opcode in (ws.Opcode.BINARY, ws.Opcode.CONTINUATION):
            if f.payload_length > MAX_WS_FRAME:
                self._apply([Fail(f"a WebSocket frame of {f.payload_length} bytes (at most {MAX_WS_FRAME})")])
                return
            self._frame_len = f.payload_length
        elif f.opcode == ws.Opcode.TEXT:
            self._apply([Fail("a text WebSocket frame (the protocol sends binary frames only)")])

    def _on_frame_payload(self, data: Any) -> None:
        if not self._frame_len or self._fatal:
            return
        chunk = bytes(data.data)
        try:
            messages = self._deframer.feed(chunk)
        except FrameError as e:
            self._apply([Fail(f"a malformed message ({e})")])
            return
        for m in messages:
            with self._lock:
                actions = self._core.receive(m) if self._core else []
            self._apply(actions)
            if self._fatal:
                return
        # These bytes count against the read window until they are gone: given back now while the
        # local buffers are below the limit, else once they drain (crediting only at a frame's end
        # stalled awscrt's reading mid-frame).
        self._credit(len(chunk))

    def _on_frame_complete(self, _data: Any) -> None:
        self._frame_len = 0
