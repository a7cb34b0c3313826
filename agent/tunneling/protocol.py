"""One tunnel's destination side as a pure state machine: messages in, actions out, no I/O.

Kept apart from the WebSocket and the sockets (as h11 keeps HTTP apart from I/O) so every rule that
decides what is opened can be tested with plain values, and so the I/O layer cannot open anything the
rules did not ask for. The rules (from aws-samples/aws-iot-securetunneling-localproxy's V2 and V3
WebSocket protocol guides):

- A service is reached only if the operator listed it (tunneling.services); the target is the
  operator's, never the tunnel's. Anything else is refused with a reset and one log line.
- A STREAM_START opens a stream for a service (a newer one replaces the older: its connections end);
  in v3 CONNECTION_START opens further TCP connections in that stream, each with its connection id.
- Messages for a stream that is not the service's current one are stale and dropped.
- When the local side of a connection ends, the source is told: CONNECTION_RESET in v3,
  STREAM_RESET in v2 (one connection per stream there).
- A message type this side does not know ends the tunnel unless the sender marked it ignorable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.tunneling.config import TunnelService
from agent.tunneling.frames import MAX_PAYLOAD, Message, MessageType


@dataclass(frozen=True, slots=True)
class ConnKey:
    service: str
    stream: int
    conn: int  # 0 in v2 (one connection per stream)


@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class Open:
    key: ConnKey
    target: str


@dataclass(frozen=True, slots=True)
class Write:
    key: ConnKey
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    key: ConnKey
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Something the source asked for was refused: one log line; nothing was opened."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The peer broke the protocol: the tunnel ends."""

    reason: str


Action = Send | Open | Write | Close | Refuse | Fail


@dataclass
class Destination:
    version: int  # 2 or 3: what the handshake negotiated
    services: Mapping[str, TunnelService]  # the operator's allowlist
    max_connections: int  # per tunnel, all services together
    streams: dict[str, int] = field(default_factory=dict)  # service -> its current stream id
    conns: set[ConnKey] = field(default_factory=set)
    available: tuple[str, ...] = ()  # the tunnel's services, from SERVICE_IDS

    def receive(self, m: Message) -> list[Action]:
        t = m.type
        if t == MessageType.SERVICE_IDS:
            return self._service_ids(m)
        if t == MessageType.STREAM_START:
            return self._stream_start(m)
        if t == MessageType.CONNECTION_START:
            return self._connection_start(m)
        if t == MessageType.DATA:
            key = self._key(m)
            if key is None or key not in self.conns:
                return []  # stale: a stream or connection that already ended
            return [Write(key, m.payload)] if m.payload else []
        if t == MessageType.CONNECTION_RESET:
            key = self._key(m)
            if key is None or key not in self.conns:
                return []
            self.conns.discard(key)
            return [Close(key, "reset by the source")]
        if t == MessageType.STREAM_RESET:
            svc = self._service_of(m)
            if svc is None or self.streams.get(svc) != m.stream_id:
                return []
            del self.streams[svc]
            stream = m.stream_id
            return self._close_where(lambda k: k.service == svc and k.stream == stream, "stream reset by the source")
        if t == MessageType.SESSION_RESET:
            self.streams.clear()
            return self._close_where(lambda k: True, "session reset by the tunnel")
        if m.ignorable:
            return []
        return [Fail(f"message type {int(t)} is not part of protocol v{self.version} and not ignorable")]

    def local_data(self, key: ConnKey, data: bytes) -> list[Action]:
        """Bytes the local service sent: DATA messages of at most MAX_PAYLOAD each."""
        if key not in self.conns:
            return []
        view = memoryview(data)
        return [
            Send(
                Message(
                    MessageType.DATA,
                    stream_id=key.stream,
                    service_id=key.service,
                    connection_id=key.conn,
                    payload=bytes(view[i : i + MAX_PAYLOAD]),
                )
            )
            for i in range(0, len(data), MAX_PAYLOAD)
        ]

    def local_closed(self, key: ConnKey) -> list[Action]:
        """The local side of a connection ended (or could not be opened): the source must know."""
        if key not in self.conns:
            return []
        self.conns.discard(key)
        return [self._reset(key)]

    def end(self) -> list[Action]:
        """The WebSocket is gone: every local connection ends (the service resets the source's)."""
        self.streams.clear()
        return self._close_where(lambda k: True, "the tunnel's connection ended")

    # --- helpers -----------------------------------------------------------------------------

    def _service_ids(self, m: Message) -> list[Action]:
        known = set(self.available)
        self.available = tuple(m.available_service_ids)
        return [
            Refuse(f"the tunnel offers service {s!r}, which tunneling.services does not list: it will be refused")
            for s in self.available
            if s not in self.services and s not in known  # said once per service, however often it is sent
        ]

    def _service_of(self, m: Message) -> str | None:
        """The message's service; an empty id means the tunnel's only service (v1/v2 peers)."""
        if m.service_id:
            return m.service_id
        candidates = self.available or tuple(self.services)
        return candidates[0] if len(candidates) == 1 else None

    def _conn_id(self, m: Message) -> int:
        if self.version < 3:
            return 0
        return m.connection_id or 1  # a v3 peer that omits it means the stream's first connection

    def _key(self, m: Message) -> ConnKey | None:
        svc = self._service_of(m)
        if svc is None or self.streams.get(svc) != m.stream_id:
            return None
        return ConnKey(svc, m.stream_id, self._conn_id(m))

    def _stream_start(self, m: Message) -> list[Action]:
        if m.stream_id == 0:
            return [Fail("STREAM_START with stream id 0 (the guides reserve it)")]
        svc = self._service_of(m)
        if svc is None or svc not in self.services:
            shown = svc if svc is not None else m.service_id
            reply = Message(MessageType.STREAM_RESET, stream_id=m.stream_id, service_id=m.service_id)
            return [Refuse(f"stream for service {shown!r} refused: not in tunneling.services"), Send(reply)]
        out: list[Action] = []
        old = self.streams.get(svc)
        if old is not None:
            out += self._close_where(lambda k: k.service == svc and k.stream == old, "replaced by a new stream")
        self.streams[svc] = m.stream_id
        return out + self._open(ConnKey(svc, m.stream_id, self._conn_id(m)))

    def _connection_start(self, m: Message) -> list[Action]:
        if self.version < 3:
            return [Fail("CONNECTION_START from a peer that negotiated protocol v2")]
        svc = self._service_of(m)
        if svc is None or svc not in self.services:
            reply = Message(
                MessageType.CONNECTION_RESET,
                stream_id=m.stream_id,
                service_id=m.service_id,
                connection_id=m.connection_id,
            )
            return [Refuse(f"connection for service {m.service_id!r} refused: not in tunneling.services"), Send(reply)]
        key = self._key(m)
        if key is None or key in self.conns:
            return []  # a stale stream, or a connection id already open
        return self._open(key)

    def _open(self, key: ConnKey) -> list[Action]:
        svc = self.services[key.service]
        same = sum(1 for k in self.conns if k.service == key.service)
        if len(self.conns) >= self.max_connections or same >= svc.max_connections:
            limit = (
                f"tunneling.max_connections ({self.max_connections})"
                if len(self.conns) >= self.max_connections
                else f"tunneling.services.{key.service}.max_connections ({svc.max_connections})"
            )
            return [Refuse(f"{key.service} connection {key.conn} refused: {limit} reached"), self._reset(key)]
        self.conns.add(key)
        return [Open(key, svc.target)]

    def _reset(self, key: ConnKey) -> Send:
        if self.version >= 3:
            return Send(
                Message(
                    MessageType.CONNECTION_RESET,
                    stream_id=key.stream,
                    service_id=key.service,
                    connection_id=key.conn,
                )
            )
        self.streams.pop(key.service, None)
        return Send(Message(MessageType.STREAM_RESET, stream_id=key.stream, service_id=key.service))

    def _close_where(self, match, reason: str) -> list[Action]:
        gone = sorted((k for k in self.conns if match(k)), key=lambda k: (k.service, k.stream, k.conn))
        self.conns.difference_update(gone)
        return [Close(k, reason) for k in gone]
