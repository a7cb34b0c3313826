"""AWS IoT secure tunneling, the service's side: a tunnel registry and the WebSocket proxy both peers reach.

Checked against aws-samples/aws-iot-securetunneling-localproxy at 8a71618 (docs/V2WebSocketProtocolGuide.md,
docs/V3WebSocketProtocolGuide.md, resources/Message.proto) and the CloseTunnel API reference. What the service
does there, and here:

- Handshake: `wss://HOST:PORT/tunnel?local-proxy-mode=source|destination` with exactly one access token (the
  `access-token` header or the `awsiot-tunnel-token` cookie) of that mode, a request under 4 KB, and a
  `Sec-WebSocket-Protocol` offering `aws.iot.securetunneling-3.0` or `-2.0` (3.0 is chosen when offered). An
  optional `client-token` (32-128 of [a-zA-Z0-9-]) binds the access token to that client, which may then
  reconnect with both; without one the token is used up by its first successful handshake. A refusal is an
  HTTP 400 (malformed request) or 403 (token not valid for this), or 500 when the registry cannot be read
  (the guides: retry 5xx with backoff), with a one-line reason as its body, logged in one line that never
  holds a token. The 101 answer carries a `channel-id`, as AWS's does.
- On connect the service sends the peer SERVICE_IDS: the services the tunnel was opened with.
- Messages are relayed from one peer to the other after decoding (agent.tunneling.frames) and checking the
  guides' rules: a type must be set; SESSION_RESET and SERVICE_IDS come from the service only; a destination
  never sends STREAM_START; stream messages need a stream id; a service id must be one of the tunnel's, and
  one a STREAM_START started before anything else names it; the schema may not be extended (a message that
  does not re-encode to the bytes received is refused); a WebSocket message is at most 131,076 bytes, and
  binary. A peer that breaks one is closed (1002; 1003 for text, 1009 for size: a WebSocket message is
  relayed as it streams in, so the whole tunnel messages before the limit was crossed have gone through).
- "The proxy server may generate StreamReset messages [when] the tunnel peer is replaced (likely has
  reconnected) by a new peer bearing a valid access token, [or] an internal error has disrupted the internal
  routing": when a peer (re)connects, the other peer gets a STREAM_RESET for each stream that was active;
  and a stream message that has no peer to go to is answered with STREAM_RESET (CONNECTION_RESET for a
  CONNECTION_START) instead of vanishing. A peer that merely disconnects is not announced ("the tunnel peers
  have no knowledge if the other side has disconnected").
- SESSION_RESET "can only originate from Secure Tunneling service if an internal data transmission error is
  detected": this service has none to report and never sends it (send_raw can, for a test).
- Closing a tunnel (CloseTunnel, or its lifetime ending): "we close the WebSocket connections between the
  client and proxy server so no data can be transmitted": both peers get a WebSocket close (1000) and no
  tunnel message; its tokens are refused from then on.

Versions. The protocol is per peer: a peer speaks what its handshake chose. Between two v3 peers messages go
through unchanged. Towards a v2 peer (which "should not use a connection ID" and carries one TCP connection
per stream): connection ids are cleared; a CONNECTION_START is not delivered but answered with
CONNECTION_RESET; DATA of any connection but the stream's first is dropped (its start was refused); a
CONNECTION_RESET of the stream's first connection becomes a STREAM_RESET (and others are dropped). From a v2
peer messages go through unchanged (no connection id: a v3 peer reads that as connection 1, as the guide
says); CONNECTION_START and CONNECTION_RESET from a v2 peer are not part of its protocol and close it.

Bounds: open tunnels (MAX_OPEN_TUNNELS), services per tunnel (3, AWS's), one connection per mode per tunnel
(a new one replaces the old), connections still in their handshake (MAX_HANDSHAKING, each with a deadline),
the request (MAX_HANDSHAKE_BYTES), WebSocket messages (MAX_WS_MESSAGE) and tunnel messages (the codec's).
Nothing is queued without limit: a peer is read only while what waits to be sent to its partner, and to
itself, is under HIGH_WATER, so a slow reader stops its sender instead of filling memory.

One thread (a selector) owns every socket; ssl.SSLObject on memory BIOs and wsproto keep TLS and WebSocket
sans-I/O (localcloud.tls_websocket, shared with the source side). The registry lives in the local cloud's
SQLite file (the CLI opens and closes tunnels, the services process serves them) and keeps SHA-256 digests of
the tokens, never the tokens: only open() returns them, and the destination's travels once in the
notification, from an outbox row deleted when published (or when the tunnel closes first).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import selectors
import socket
import sqlite3
import ssl
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from agent.tunneling.frames import Deframer, FrameError, Message, MessageType, frame

from .tls_websocket import MAX_WS_MESSAGE, TlsWebSocket, foreign_context, server_context

log = logging.getLogger("localcloud.tunnels")

REGION = "us-east-1"
MODES = ("source", "destination")
# The service's preference first: 3.0 whenever the peer offers it.
SUBPROTOCOLS = {"aws.iot.securetunneling-3.0": 3, "aws.iot.securetunneling-2.0": 2}
SERVICE_ID_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")  # DestinationConfig.services
THING_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")
CLIENT_TOKEN_RE = re.compile(r"[A-Za-z0-9-]{32,128}")
MAX_SERVICES = 3  # AWS: 1-3 services per tunnel
MAX_LIFETIME_S = 12 * 3600.0  # AWS: maxLifetimeTimeoutMinutes 1-720 (the local cloud allows shorter, for tests)
MAX_OPEN_TUNNELS = 64
CLOSED_KEPT = 256  # closed tunnels kept for `tunnels list`
MAX_HANDSHAKE_BYTES = 4096  # "The HTTP request size must not exceed 4k bytes in length"
MAX_HANDSHAKING = 32  # connections accepted and not yet upgraded (or refused)
MAX_CONNECTIONS = 256  # sockets held at once, all states
HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_GRACE_S = 2.0  # a closing connection gets this long to take its last bytes
TICK_S = 0.25  # deadlines, and tunnels closed or expired elsewhere, are looked at this often
HIGH_WATER = 256 * 1024
NOTIFY_TOPIC = "$aws/things/{thing}/tunnels/notify"

_STREAM_TYPES = (
    MessageType.DATA,
    MessageType.STREAM_START,
    MessageType.STREAM_RESET,
    MessageType.CONNECTION_START,
    MessageType.CONNECTION_RESET,
)
_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_token() -> str:
    """An access token: 384 random bits, URL-safe, and never starting with "-" (a command line would read it as
    an option)."""
    return "lc" + secrets.token_urlsafe(48)


def _other(mode: str) -> str:
    return "destination" if mode == "source" else "source"


# -- the registry -------------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS tunnels (
    id TEXT PRIMARY KEY,
    thing TEXT NOT NULL,
    services TEXT NOT NULL,                  -- JSON list
    status TEXT NOT NULL,                    -- OPEN | CLOSED
    created REAL NOT NULL,
    expires REAL NOT NULL,
    closed REAL,
    source_token TEXT UNIQUE NOT NULL,       -- SHA-256 of the access token; the token is never stored
    destination_token TEXT UNIQUE NOT NULL,
    source_client TEXT,                      -- NULL: token unused; '': used up; else SHA-256 of the client token
    destination_client TEXT,
    source_connected INTEGER NOT NULL DEFAULT 0,
    destination_connected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tunnel_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, tunnel TEXT NOT NULL,
                                          topic TEXT NOT NULL, payload TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Tunnel:
    tunnel_id: str
    thing: str
    services: tuple[str, ...]
    expiry: float  # epoch seconds
    status: str = "OPEN"
    created: float = 0.0
    source_token: str = ""  # only open() fills these: the registry keeps digests
    destination_token: str = ""
    source_connected: bool = False
    destination_connected: bool = False

    def describe(self) -> dict[str, Any]:
        """What `tunnels list` shows (DescribeTunnel's words); never a token."""
        state = {True: "CONNECTED", False: "DISCONNECTED"}
        return {
            "tunnelId": self.tunnel_id,
            "status": self.status,
            "thingName": self.thing,
            "services": list(self.services),
            "sourceConnectionState": state[self.source_connected],
            "destinationConnectionState": state[self.destination_connected],
            "expiresAt": round(self.expiry, 3),
        }


@dataclass(eq=False)
class TunnelRegistry:
    """Tunnels in the local cloud's SQLite file (shared with the jobs and shadows stores, used with `lock`)."""

    db: sqlite3.Connection
    lock: threading.RLock
    now: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        with self.lock:
            self.db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _tx(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _expire(self, now: float) -> None:
        """Tunnels past their lifetime become CLOSED; closed ones beyond CLOSED_KEPT are forgotten (in a tx)."""
        self.db.execute("UPDATE tunnels SET status='CLOSED', closed=expires WHERE status='OPEN' AND expires<=?", (now,))
        self.db.execute("DELETE FROM tunnel_outbox WHERE tunnel NOT IN (SELECT id FROM tunnels WHERE status='OPEN')")
        self.db.execute(
            "DELETE FROM tunnels WHERE status='CLOSED' AND id NOT IN "
            "(SELECT id FROM tunnels WHERE status='CLOSED' ORDER BY closed DESC LIMIT ?)",
            (CLOSED_KEPT,),
        )

    def open(self, thing: str, services: list[str] | tuple[str, ...], timeout_s: float = MAX_LIFETIME_S) -> Tunnel:
        """OpenTunnel: a tunnel to `thing` for `services`, with a fresh access token for each side. The
        destination's is queued for `$aws/things/<thing>/tunnels/notify`. ValueError names what is wrong."""
        if not isinstance(thing, str) or not THING_RE.fullmatch(thing):
            raise ValueError(f"thing name {thing!r}: 1-128 characters of [a-zA-Z0-9:_-]")
        services = tuple(services)
        if not 1 <= len(services) <= MAX_SERVICES:
            raise ValueError(f"services: 1 to {MAX_SERVICES} service ids, not {len(services)}")
        for s in services:
            if not isinstance(s, str) or not SERVICE_ID_RE.fullmatch(s):
                raise ValueError(f"service id {s!r}: 1-128 characters of [a-zA-Z0-9:_-]")
        if len(set(services)) != len(services):
            raise ValueError("services: each service id once")
        if not 0 < timeout_s <= MAX_LIFETIME_S:
            raise ValueError(f"timeout: more than 0 and at most {MAX_LIFETIME_S:g} s (12 h)")
        now = self.now()
        t = Tunnel(
            tunnel_id=str(uuid.uuid4()),
            thing=thing,
            services=services,
            expiry=now + timeout_s,
            created=now,
            source_token=_new_token(),
            destination_token=_new_token(),
        )
        notification = {
            "clientAccessToken": t.destination_token,
            "clientMode": "destination",
            "region": REGION,
            "services": list(services),
        }
        with self._tx():
            self._expire(now)
            (n,) = self.db.execute("SELECT COUNT(*) FROM tunnels WHERE status='OPEN'").fetchone()
            if n >= MAX_OPEN_TUNNELS:
                raise ValueError(f"{n} tunnels are open (at most {MAX_OPEN_TUNNELS}); close one first")
            self.db.execute(
                "INSERT INTO tunnels (id, thing, services, status, created, expires, source_token, destination_token)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (
                    t.tunnel_id,
                    thing,
                    json.dumps(list(services)),
                    "OPEN",
                    now,
                    t.expiry,
                    _digest(t.source_token),
                    _digest(t.destination_token),
                ),
            )
            self.db.execute(
                "INSERT INTO tunnel_outbox (tunnel, topic, payload) VALUES (?,?,?)",
                (t.tunnel_id, NOTIFY_TOPIC.format(thing=thing), json.dumps(notification)),
            )
        return t

    _COLUMNS = "id, thing, services, expires, status, created, source_connected, destination_connected"

    @staticmethod
    def _tunnel(row: tuple) -> Tunnel:
        tid, thing, services, expires, status, created, src, dst = row
        return Tunnel(tid, thing, tuple(json.loads(services)), expires, status, created, "", "", bool(src), bool(dst))

    def list(self) -> list[Tunnel]:
        with self._tx():
            self._expire(self.now())
            rows = self.db.execute(f"SELECT {self._COLUMNS} FROM tunnels ORDER BY created").fetchall()
        return [self._tunnel(r) for r in rows]

    def get(self, tunnel_id: str) -> Tunnel | None:
        with self.lock:
            row = self.db.execute(f"SELECT {self._COLUMNS} FROM tunnels WHERE id=?", (tunnel_id,)).fetchone()
        return self._tunnel(row) if row else None

    def close(self, tunnel_id: str) -> bool:
        """CloseTunnel: True if it was open. Its tokens are refused from now on."""
        now = self.now()
        with self._tx():
            self._expire(now)
            cur = self.db.execute(
                "UPDATE tunnels SET status='CLOSED', closed=? WHERE id=? AND status='OPEN'", (now, tunnel_id)
            )
            self.db.execute("DELETE FROM tunnel_outbox WHERE tunnel=?", (tunnel_id,))
            return cur.rowcount == 1

    def open_ids(self) -> set[str]:
        with self.lock:
            rows = self.db.execute("SELECT id FROM tunnels WHERE status='OPEN' AND expires>?", (self.now(),)).fetchall()
        return {r[0] for r in rows}

    def authorize(self, token: str, mode: str, client_token: str | None) -> tuple[Tunnel | None, tuple[int, str]]:
        """The tunnel `token` opens in `mode`, marking the token used (bound to `client_token` if given);
        or None and the (HTTP status, reason) of the refusal."""
        now = self.now()
        digest = _digest(token)
        with self._tx():
            row = self.db.execute(
                f"SELECT {self._COLUMNS}, source_token, source_client, destination_client FROM tunnels "
                "WHERE source_token=? OR destination_token=?",
                (digest, digest),
            ).fetchone()
            if row is None:
                return None, (403, "access token not valid")
            tunnel = self._tunnel(row[:8])
            token_mode = "source" if row[8] == digest else "destination"
            if token_mode != mode:
                return None, (403, f"access token is not for local-proxy-mode={mode}")
            if tunnel.status != "OPEN" or tunnel.expiry <= now:
                return None, (403, "tunnel is closed")
            bound = row[9] if mode == "source" else row[10]
            client = _digest(client_token) if client_token else ""
            if bound is None:
                if client:
                    (uses,) = self.db.execute(
                        "SELECT COUNT(*) FROM tunnels WHERE status='OPEN' "
                        "AND (source_client=? OR destination_client=?)",
                        (client, client),
                    ).fetchone()
                    if uses:
                        return None, (403, "client token already in use with another access token")
                self.db.execute(f"UPDATE tunnels SET {mode}_client=? WHERE id=?", (client, tunnel.tunnel_id))
            elif not bound or bound != client:
                return None, (403, "access token already used")
        return tunnel, (101, "")

    def set_connected(self, tunnel_id: str, mode: str, connected: bool) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        with self.lock:
            self.db.execute(f"UPDATE tunnels SET {mode}_connected=? WHERE id=?", (int(connected), tunnel_id))

    def reset_connected(self) -> None:
        """At the service's start: nobody is connected to a service that was not running."""
        with self.lock:
            self.db.execute("UPDATE tunnels SET source_connected=0, destination_connected=0")

    def take_outbox(self) -> builtins.list[tuple[str, bytes]]:
        """Notifications to publish, each handed out once."""
        with self._tx():
            self._expire(self.now())
            rows = self.db.execute("SELECT topic, payload FROM tunnel_outbox ORDER BY id").fetchall()
            self.db.execute("DELETE FROM tunnel_outbox")
        return [(t, p.encode()) for t, p in rows]


# -- TLS + WebSocket on a non-blocking socket ------------------------------------------------------------------


# -- the service ---------------------------------------------------------------------------------------------

_HANDSHAKE, _OPEN, _CLOSING = "handshake", "open", "closing"


@dataclass(eq=False)
class _Peer:
    conn: TlsWebSocket
    addr: str
    deadline: float  # of the handshake, then (closing) of the last bytes
    state: str = _HANDSHAKE
    tunnel_id: str = ""
    mode: str = ""
    version: int = 0
    live: _Live | None = None
    deframer: Deframer = field(default_factory=Deframer)
    message_bytes: int = 0  # of the WebSocket message being received
    events: int = 0  # selector registration
    shut: int = 0  # closing: 1 once TLS's close_notify is queued, 2 once the FIN is sent


@dataclass(eq=False)
class _Live:
    """A tunnel with at least one peer since the service started: who is connected and which streams run."""

    tunnel_id: str
    services: tuple[str, ...]
    expiry: float
    peers: dict[str, _Peer] = field(default_factory=dict)
    streams: dict[str, tuple[int, int]] = field(default_factory=dict)  # service -> (stream id, first connection)
    started: set[str] = field(default_factory=set)  # service ids a STREAM_START has named


class TunnelService:
    """The tunneling endpoint: a TLS WebSocket server on `host` (a free port unless given) that pairs each
    tunnel's source and destination and relays their messages. start() and stop() own its one thread.

    Fault knobs, for tests of a device's refusals and reconnects:
      foreign_certificate = True   new connections get a server certificate from another CA
      answer_subprotocol = "..."   a handshake is answered with this Sec-WebSocket-Protocol instead
      send_raw(tunnel, mode, data) one binary WebSocket message of any bytes (malformed, oversized) to a peer
      blip(tunnel, mode)           the peer's TCP connection dropped at once (RST, no close of any layer)
    """

    def __init__(
        self,
        registry: TunnelRegistry,
        cert_file: Path | str,
        key_file: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._context = server_context(cert_file, key_file)
        self._foreign: ssl.SSLContext | None = None
        self.foreign_certificate = False
        self.answer_subprotocol: str | None = None
        self.refusals: collections.deque[tuple[int, str]] = collections.deque(maxlen=64)  # the latest (status, reason)
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._calls_lock = threading.Lock()
        self._peers: set[_Peer] = set()
        self._live: dict[str, _Live] = {}
        self._last_check = 0.0
        # What other threads may look at, under `changed` (notified on every change).
        self.changed = threading.Condition()
        self._connected: set[tuple[str, str]] = set()
        self._sockets = 0
        self._peak = 0  # the most bytes one connection has held for sending

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> TunnelService:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((self.host, self.port))
            lsock.listen(64)
            lsock.setblocking(False)
        except OSError:
            lsock.close()
            raise
        self.port = lsock.getsockname()[1]
        self._listener = lsock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(lsock, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.registry.reset_connected()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tunnel-service", daemon=True)
        self._thread.start()
        log.info("tunneling endpoint on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the tunnel service's thread did not end within {timeout} s")
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the API (any thread) -------------------------------------------------------------------------------
    def open(self, thing: str, services: list[str] | tuple[str, ...], timeout_s: float = MAX_LIFETIME_S) -> Tunnel:
        return self.registry.open(thing, services, timeout_s)

    def list(self) -> list[Tunnel]:
        return self.registry.list()

    def close(self, tunnel_id: str) -> bool:
        """CloseTunnel: both peers' WebSockets are closed now and the tokens refused from now on."""
        closed = self.registry.close(tunnel_id)
        if self.running:
            self._submit(lambda: self._end_tunnel(tunnel_id, "tunnel closed"))
        return closed

    def connected(self, tunnel_id: str, mode: str) -> bool:
        with self.changed:
            return (tunnel_id, mode) in self._connected

    def wait_connected(self, tunnel_id: str, mode: str, connected: bool = True, timeout: float = 10.0) -> bool:
        """Whether the peer of `mode` is (dis)connected within `timeout` seconds (callers scale it: pace)."""
        with self.changed:
            return self.changed.wait_for(lambda: ((tunnel_id, mode) in self._connected) == connected, timeout)

    def sockets(self) -> int:
        """Client connections held (any state): 0 once everything has been closed."""
        with self.changed:
            return self._sockets

    def wait_sockets(self, n: int, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self._sockets == n, timeout)

    def peak_buffered(self) -> int:
        """The most bytes any one connection has held waiting to be sent (tests: the bound holds)."""
        return self._peak

    def send_raw(self, tunnel_id: str, mode: str, data: bytes) -> bool:
        """Fault knob: `data` as one binary WebSocket message to the peer, unchecked. False if none is connected."""

        def run() -> bool:
            peer = self._peer(tunnel_id, mode)
            if peer is None:
                return False
            peer.conn.send(BytesMessage(bytes(data)))
            return True

        return bool(self._submit(run))

    def blip(self, tunnel_id: str, mode: str = "destination") -> bool:
        """Fault knob: drop the peer's TCP connection abruptly (RST; no WebSocket close, no TLS close_notify),
        as a network failure would. The peer must reconnect with its client token. False if none is connected."""

        def run() -> bool:
            peer = self._peer(tunnel_id, mode)
            if peer is None:
                return False
            log.info("tunnel %s: dropping the %s's connection (fault knob)", tunnel_id, mode)
            with contextlib.suppress(OSError):
                peer.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._detach(peer)
            self._finish(peer)
            return True

        return bool(self._submit(run))

    def _peer(self, tunnel_id: str, mode: str) -> _Peer | None:
        live = self._live.get(tunnel_id)
        return live.peers.get(mode) if live else None

    def _submit(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` on the service's thread (which owns every socket) and return its result."""
        if not self.running:
            raise RuntimeError("the tunnel service is not running")
        done = threading.Event()
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["result"] = fn()
            except Exception as e:
                box["error"] = e
            finally:
                done.set()

        with self._calls_lock:
            self._calls.append(call)
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError("the tunnel service did not answer")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                self._wake_w.send(b"\0")

    # -- the loop (the service's thread) -----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._sel is not None
        try:
            while not self._stop.is_set():
                for peer in list(self._peers):
                    self._interest(peer)
                for key, mask in self._sel.select(TICK_S):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            while self._wake_r and self._wake_r.recv(4096):
                                pass
                    else:
                        self._serve(key.data, mask)
                while self._calls:
                    with self._calls_lock:
                        call = self._calls.popleft()
                    call()
                self._tick()
        except Exception:
            log.exception("the tunnel service failed")
        finally:
            self._shutdown()

    def _serve(self, peer: _Peer, mask: int) -> None:
        """One connection's turn. Whatever goes wrong with it ends that connection, never the service."""
        try:
            if mask & selectors.EVENT_WRITE:
                peer.conn.flush()
            if mask & selectors.EVENT_READ and peer in self._peers:
                self._read(peer)
            self._settle(peer)
        except Exception:
            log.exception("tunneling endpoint: the connection from %s failed; closing it", peer.addr)
            self._detach(peer)
            self._finish(peer)

    def _interest(self, peer: _Peer) -> None:
        assert self._sel is not None
        want = 0
        if peer.conn.out:
            want |= selectors.EVENT_WRITE
            self._peak = max(self._peak, len(peer.conn.out))
        if peer.state != _CLOSING and len(peer.conn.out) < HIGH_WATER:
            partner = peer.live.peers.get(_other(peer.mode)) if peer.live and peer.state == _OPEN else None
            if partner is None or len(partner.conn.out) < HIGH_WATER:
                want |= selectors.EVENT_READ
        if peer.state == _CLOSING:
            want |= selectors.EVENT_READ  # the peer's close frame, or its EOF
        if want == peer.events:
            return
        if peer.events and want:
            self._sel.modify(peer.conn.sock, want, peer)
        elif want:
            self._sel.register(peer.conn.sock, want, peer)
        else:
            self._sel.unregister(peer.conn.sock)
        peer.events = want

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("tunneling endpoint: accept failed: %s", e)
                return
            handshaking = sum(1 for p in self._peers if p.state == _HANDSHAKE)
            if handshaking >= MAX_HANDSHAKING or len(self._peers) >= MAX_CONNECTIONS:
                log.warning("tunneling endpoint: connection from %s:%d dropped (too many connections)", *addr[:2])
                sock.close()
                continue
            try:
                context = self._context
                if self.foreign_certificate:
                    if self._foreign is None:
                        self._foreign = foreign_context()
                    context = self._foreign
                conn = TlsWebSocket(sock, context, server_side=True)
            except Exception:
                log.exception("tunneling endpoint: cannot take the connection from %s:%d", *addr[:2])
                sock.close()
                continue
            peer = _Peer(conn, f"{addr[0]}:{addr[1]}", time.monotonic() + HANDSHAKE_TIMEOUT_S)
            self._peers.add(peer)
            self._count()

    def _read(self, peer: _Peer) -> None:
        events = peer.conn.receive()
        if peer.state == _HANDSHAKE:
            if peer.conn.bad_request is not None:
                return self._refuse(peer, 400, f"not a WebSocket upgrade request ({peer.conn.bad_request})")
            if peer.conn.app_bytes > MAX_HANDSHAKE_BYTES:
                return self._refuse(peer, 400, f"request larger than {MAX_HANDSHAKE_BYTES} bytes")
        for ev in events:
            if peer.state == _HANDSHAKE and isinstance(ev, Request):
                self._handshake(peer, ev)
            elif peer.state == _OPEN:
                if isinstance(ev, BytesMessage):
                    peer.message_bytes += len(ev.data)
                    if peer.message_bytes > MAX_WS_MESSAGE:
                        self._close(peer, 1009, f"WebSocket message larger than {MAX_WS_MESSAGE} bytes")
                    else:
                        if ev.message_finished:
                            peer.message_bytes = 0
                        self._relay(peer, bytes(ev.data))
                elif isinstance(ev, TextMessage):
                    self._close(peer, 1003, "text frames are not part of the protocol")
                elif isinstance(ev, Ping):
                    peer.conn.send(ev.response())
                elif isinstance(ev, CloseConnection):
                    with contextlib.suppress(LocalProtocolError):
                        peer.conn.send(ev.response())
                    log.info("tunnel %s: the %s closed its WebSocket (%s)", peer.tunnel_id, peer.mode, ev.code)
                    self._detach(peer)
                    self._closing(peer)
            if peer.state == _CLOSING or peer not in self._peers:
                break
        if peer.conn.dead and peer in self._peers:
            if peer.state == _OPEN:
                why = peer.conn.error or "connection closed"
                log.info("tunnel %s: the %s disconnected (%s)", peer.tunnel_id, peer.mode, why)
            elif peer.state == _HANDSHAKE and peer.conn.error:
                log.info("tunneling endpoint: handshake with %s failed: %s", peer.addr, peer.conn.error)
            self._detach(peer)
            self._finish(peer)

    def _settle(self, peer: _Peer) -> None:
        """A closing connection sends its last bytes, then TLS's close_notify, then a FIN, and ends when the
        peer closes its side (or at its deadline). Closing the socket at once could turn into a reset that
        makes the peer drop what it had not read yet: the WebSocket close, or the refusal's HTTP answer."""
        if peer not in self._peers:
            return
        if peer.conn.dead:
            self._detach(peer)
            self._finish(peer)
        elif peer.state == _CLOSING and not peer.conn.out:
            if peer.shut == 0:
                peer.shut = 1
                peer.conn.close_notify()
                peer.conn.flush()
            if peer.shut == 1 and not peer.conn.out:
                peer.shut = 2
                with contextlib.suppress(OSError):
                    peer.conn.sock.shutdown(socket.SHUT_WR)

    def _tick(self) -> None:
        now = time.monotonic()
        for peer in list(self._peers):
            if peer.state != _OPEN and now > peer.deadline:
                if peer.state == _HANDSHAKE:
                    log.info("tunneling endpoint: handshake with %s timed out", peer.addr)
                self._finish(peer)
            else:
                self._settle(peer)
        if self._live and now - self._last_check >= TICK_S:
            self._last_check = now
            try:
                open_ids = self.registry.open_ids()
            except sqlite3.Error as e:
                log.warning("tunneling endpoint: cannot read the registry (%s); trying again", e)
                return
            for tid in list(self._live):
                if tid not in open_ids:
                    expired = self._live[tid].expiry <= time.time()
                    if expired:
                        with contextlib.suppress(sqlite3.Error):  # list() marks it closed otherwise
                            self.registry.close(tid)
                    self._end_tunnel(tid, "tunnel expired" if expired else "tunnel closed")

    # -- handshake -----------------------------------------------------------------------------------------------
    def _refuse(self, peer: _Peer, status: int, reason: str) -> None:
        log.info("tunneling endpoint: handshake from %s refused: %d %s", peer.addr, status, reason)
        self.refusals.append((status, reason))
        body = reason.encode("ascii", "replace")[:200] + b"\n"
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            peer.conn.send(RejectConnection(status_code=status, headers=headers, has_body=True))
            peer.conn.send(RejectData(body))
        except LocalProtocolError:
            pass  # nothing more can be said on this connection
        self._closing(peer)

    def _handshake(self, peer: _Peer, req: Request) -> None:
        url = urllib.parse.urlsplit(req.target)
        if url.path != "/tunnel":
            return self._refuse(peer, 400, "the path must be /tunnel")
        try:
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True, max_num_fields=8)
        except ValueError:
            return self._refuse(peer, 400, "too many query parameters")
        modes = query.get("local-proxy-mode", [])
        if len(modes) != 1 or modes[0] not in MODES:
            return self._refuse(peer, 400, "local-proxy-mode must be source or destination")
        mode = modes[0]
        tokens: builtins.list[bytes] = []
        clients: builtins.list[bytes] = []
        for name, value in req.extra_headers:
            if name == b"access-token":
                tokens.append(value)
            elif name == b"client-token":
                clients.append(value)
            elif name == b"cookie":
                for part in value.split(b";"):
                    k, _, v = part.strip().partition(b"=")
                    if k == b"awsiot-tunnel-token":
                        tokens.append(v)
        if len(tokens) != 1 or not tokens[0]:
            return self._refuse(peer, 400, "exactly one access token (access-token header or awsiot-tunnel-token)")
        if len(clients) > 1:
            return self._refuse(peer, 400, "at most one client-token")
        client = clients[0].decode("ascii", "replace") if clients else None
        if client is not None and not CLIENT_TOKEN_RE.fullmatch(client):
            return self._refuse(peer, 400, "client-token must be 32-128 characters of [a-zA-Z0-9-]")
        chosen = next((p for p in SUBPROTOCOLS if p in req.subprotocols), None)
        if chosen is None:
            return self._refuse(peer, 400, f"Sec-WebSocket-Protocol must offer one of {', '.join(SUBPROTOCOLS)}")
        try:
            tunnel, (status, reason) = self.registry.authorize(tokens[0].decode("ascii", "replace"), mode, client)
        except sqlite3.Error as e:  # 5xx: the guides tell clients to retry with backoff
            log.warning("tunneling endpoint: cannot read the registry (%s)", e)
            return self._refuse(peer, 500, "internal error; try again")
        if tunnel is None:
            return self._refuse(peer, status, reason)
        extra = [(b"channel-id", secrets.token_hex(16).encode())]
        if self.answer_subprotocol is not None:  # fault knob: wsproto would refuse to send what was not offered
            peer.conn.send(
                AcceptConnection(extra_headers=[*extra, (b"Sec-WebSocket-Protocol", self.answer_subprotocol.encode())])
            )
        else:
            peer.conn.send(AcceptConnection(subprotocol=chosen, extra_headers=extra))
        peer.state, peer.tunnel_id, peer.mode, peer.version = _OPEN, tunnel.tunnel_id, mode, SUBPROTOCOLS[chosen]
        log.info(
            "tunnel %s: %s connected from %s (protocol v%d%s)",
            tunnel.tunnel_id,
            mode,
            peer.addr,
            peer.version,
            ", client token" if client else "",
        )
        self._attach(peer, tunnel)

    def _attach(self, peer: _Peer, tunnel: Tunnel) -> None:
        live = self._live.get(tunnel.tunnel_id)
        if live is None:
            live = self._live[tunnel.tunnel_id] = _Live(tunnel.tunnel_id, tunnel.services, tunnel.expiry)
        old = live.peers.get(peer.mode)
        if old is not None:
            self._close(old, 1000, "replaced by a new connection")
        if live.streams:
            # The streams ran through the peer this one replaces: they ended with it.
            partner = live.peers.get(_other(peer.mode))
            resets = [
                frame(Message(MessageType.STREAM_RESET, stream_id=s, service_id=svc))
                for svc, (s, _) in live.streams.items()
            ]
            live.streams.clear()
            if partner is not None:
                partner.conn.send_frames(resets)
        live.peers[peer.mode] = peer
        peer.live = live
        peer.conn.send_frames([frame(Message(MessageType.SERVICE_IDS, available_service_ids=live.services))])
        self._set_connected(live.tunnel_id, peer.mode, True)
        with self.changed:
            self._connected.add((live.tunnel_id, peer.mode))
            self.changed.notify_all()

    # -- relaying --------------------------------------------------------------------------------------------------
    def _relay(self, peer: _Peer, data: bytes) -> None:
        live = peer.live
        assert live is not None
        before = peer.deframer.pending
        try:
            messages = peer.deframer.feed(data)
            raws = [frame(m) for m in messages]
        except FrameError as e:
            return self._close(peer, 1002, f"malformed tunnel message: {e}")
        if sum(map(len, raws)) != before + len(data) - peer.deframer.pending:
            return self._close(peer, 1002, "a tunnel message with fields outside the schema")
        to_partner: builtins.list[bytes] = []
        to_sender: builtins.list[bytes] = []
        for m, raw in zip(messages, raws, strict=True):
            problem = self._problem(live, peer, m)
            if problem:
                return self._close(peer, 1002, problem)
            self._route(live, peer, m, raw, to_partner, to_sender)
        partner = live.peers.get(_other(peer.mode))
        if to_partner and partner is not None:
            partner.conn.send_frames(to_partner)
        if to_sender:
            peer.conn.send_frames(to_sender)

    @staticmethod
    def _problem(live: _Live, peer: _Peer, m: Message) -> str | None:
        t = m.type
        if t not in _KNOWN_TYPES:
            return None if m.ignorable else f"unknown message type {t} (not ignorable)"
        if t == MessageType.UNKNOWN:
            return "a message without a type"
        if t in (MessageType.SESSION_RESET, MessageType.SERVICE_IDS):
            return f"{MessageType(t).name} comes from the service only"
        if t == MessageType.STREAM_START and peer.mode == "destination":
            return "a destination may not send STREAM_START"
        if t in (MessageType.CONNECTION_START, MessageType.CONNECTION_RESET) and peer.version == 2:
            return f"{MessageType(t).name} is not part of protocol v2"
        if m.stream_id == 0:
            return f"{MessageType(t).name} with stream id 0"
        if m.service_id and m.service_id not in live.services:
            return f"service id {m.service_id!r} is not one of the tunnel's"
        if t != MessageType.STREAM_START and m.service_id not in live.started:
            return f"{MessageType(t).name} for service {m.service_id!r}, which no STREAM_START named"
        return None

    @staticmethod
    def _route(
        live: _Live, peer: _Peer, m: Message, raw: bytes, out: builtins.list[bytes], back: builtins.list[bytes]
    ) -> None:
        """Where `m` goes: `out` (the partner) or `back` (the sender, when the partner cannot take it)."""
        t, svc, sid = m.type, m.service_id, m.stream_id
        partner = live.peers.get(_other(peer.mode))
        active = live.streams.get(svc)
        current = active is not None and active[0] == sid
        v2 = partner is not None and partner.version == 2

        def forward(msg: Message = m) -> None:
            if v2 and msg.connection_id:
                msg = dataclasses.replace(msg, connection_id=0)
            out.append(raw if msg is m else frame(msg))

        if t == MessageType.STREAM_START:
            live.started.add(svc)
            if partner is None:
                live.streams.pop(svc, None)
                back.append(frame(Message(MessageType.STREAM_RESET, stream_id=sid, service_id=svc)))
            else:
                live.streams[svc] = (sid, m.connection_id or 1)  # no id: v2, read as 1 (the guide)
                forward()
        elif t == MessageType.CONNECTION_START:
            if partner is None or v2:  # nowhere to go; or a v2 peer, which carries one connection per stream
                back.append(
                    frame(
                        Message(
                            MessageType.CONNECTION_RESET, stream_id=sid, service_id=svc, connection_id=m.connection_id
                        )
                    )
                )
            else:
                forward()
        elif t == MessageType.DATA:
            if partner is None:
                if current:  # the routing broke: the sender hears it once, then the stream is gone
                    del live.streams[svc]
                    back.append(frame(Message(MessageType.STREAM_RESET, stream_id=sid, service_id=svc)))
            elif not v2 or not current or (m.connection_id or 1) == (active[1] if active else 1):
                forward()
        elif t == MessageType.STREAM_RESET:
            if current:
                del live.streams[svc]
            if partner is not None:
                forward()
        elif t == MessageType.CONNECTION_RESET:
            if partner is not None and not v2:
                forward()
            elif v2 and current and active is not None and (m.connection_id or 1) == active[1]:
                del live.streams[svc]
                forward(Message(MessageType.STREAM_RESET, stream_id=sid, service_id=svc))
        elif partner is not None:  # an ignorable type this service does not know: the peers may
            forward()

    # -- ending connections ------------------------------------------------------------------------------------------
    def _close(self, peer: _Peer, code: int, reason: str) -> None:
        """Close the peer's WebSocket (code, reason), then its connection once that is sent."""
        if peer.state == _OPEN:
            if code != 1000:
                log.info("tunnel %s: closing the %s: %s", peer.tunnel_id, peer.mode, reason)
            with contextlib.suppress(LocalProtocolError):
                peer.conn.send(CloseConnection(code=code, reason=reason[:120]))
        self._detach(peer)
        self._closing(peer)

    def _closing(self, peer: _Peer) -> None:
        peer.state = _CLOSING
        peer.deadline = time.monotonic() + CLOSE_GRACE_S

    def _detach(self, peer: _Peer) -> None:
        live = peer.live
        if live is None:
            return
        peer.live = None
        if live.peers.get(peer.mode) is peer:
            del live.peers[peer.mode]
            self._set_connected(live.tunnel_id, peer.mode, False)
            with self.changed:
                self._connected.discard((live.tunnel_id, peer.mode))
                self.changed.notify_all()

    def _set_connected(self, tunnel_id: str, mode: str, connected: bool) -> None:
        try:
            self.registry.set_connected(tunnel_id, mode, connected)
        except sqlite3.Error as e:  # only what `tunnels list` shows is behind
            log.warning("tunnel %s: cannot record the %s as %s (%s)", tunnel_id, mode, connected, e)

    def _finish(self, peer: _Peer) -> None:
        """The connection is closed now, whatever was left to send."""
        if peer not in self._peers:
            return
        if peer.events and self._sel is not None:
            self._sel.unregister(peer.conn.sock)
            peer.events = 0
        peer.conn.close()
        self._peers.discard(peer)
        self._count()

    def _end_tunnel(self, tunnel_id: str, reason: str) -> None:
        live = self._live.pop(tunnel_id, None)
        if live is None:
            return
        log.info("tunnel %s: %s", tunnel_id, reason)
        for peer in list(live.peers.values()):
            self._close(peer, 1000, reason)
            peer.conn.flush()
            self._settle(peer)

    def _count(self) -> None:
        with self.changed:
            self._sockets = len(self._peers)
            self.changed.notify_all()

    def _shutdown(self) -> None:
        for peer in list(self._peers):
            if peer.state == _OPEN:
                with contextlib.suppress(LocalProtocolError):
                    peer.conn.send(CloseConnection(code=1001, reason="service stopping"))
                peer.conn.flush()
            self._detach(peer)
            self._finish(peer)
        self._live.clear()
        with self.changed:
            self._connected.clear()
            self.changed.notify_all()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        with self._calls_lock:
            calls = list(self._calls)
            self._calls.clear()
        for call in calls:  # their callers are waiting: they learn it ran (against a stopped service)
            call()
