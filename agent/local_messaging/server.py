"""The local endpoint: MQTT 5 on a Unix socket, one selector thread, QoS 1 acknowledged only once durable.

Why MQTT 5 on the socket rather than a protocol of our own: every language has a client for it (paho
connects to Unix sockets), and version 5 lets the agent answer a refused publish or subscription with
a reason code and a reason string the app can read, which 3.1.1 cannot.

The loop's turn is the group commit: every QoS 1 publish read in one turn, from every client, goes
into ONE spool transaction (one fsync); only after it returns are the PUBACKs written. A client that
publishes faster than the disk allows simply waits for its acknowledgements (Receive Maximum bounds
what it may have outstanding), so memory stays flat whatever the apps do. Messages for subscribers
are queued per client up to a bound; past it they are dropped for that client (counted), and a client
whose queue is full is not read from, so a client that never reads cannot grow the agent.

Messages from the cloud reach apps at QoS 0 (the agent keeps no per-app session); the connection state
is a topic of its own, `$agent/connection`, that any app may subscribe to.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.base import durable
from agent.base.logfmt import escape
from agent.local_messaging import mqtt5
from agent.local_messaging.config import LocalMessagingConfig
from agent.local_messaging.peers import App, Peer, identify, peer_of
from agent.local_messaging.spool import NO_EXTRAS, Extras, Spool, SpoolError, SpoolRefused
from agent.local_messaging.topics import aws_topic_problem, filter_problem, matches

log = logging.getLogger("agent")

STATE_TOPIC = "$agent/connection"
READ_CHUNK = 64 * 1024
MAX_INBOX = 1024  # cloud messages waiting for the loop; past it they are dropped (counted)
REFUSAL_LOG_EVERY_S = 60.0
CONNECT_TIMEOUT_S = 10.0  # a client must send CONNECT this soon after connecting
# Response topic, correlation data and user properties of one publish, together: more is refused (the spool
# stays bounded per message whatever the payload limit; a bound of the agent's own, not AWS's quota).
MAX_EXTRAS_BYTES = 8 * 1024


class CloudProperties(Protocol):
    """The MQTT 5 properties of a cloud message (agent.session.feature.MessageProperties)."""

    content_type: str | None
    message_expiry_s: int | None
    response_topic: str | None
    correlation_data: bytes | None
    user_properties: tuple[tuple[str, str], ...]


class CloudLink(Protocol):
    """What the endpoint needs of the agent's cloud side (agent.local_messaging.hub)."""

    def connected(self) -> bool: ...
    def spooled(self) -> None: ...  # new QoS 1 messages are in the spool
    def publish_now(
        self, topic: str, payload: bytes, content_type: str | None, expiry: int | None, extras: Extras = NO_EXTRAS
    ) -> bool: ...
    def want(self, topic_filter: str) -> None: ...  # a local client subscribed: receive it from the cloud
    def unwant(self, topic_filter: str) -> None: ...


@dataclass(eq=False)
class Client:
    sock: socket.socket
    peer: Peer
    accepted_at: float
    decoder: mqtt5.Decoder
    app: App | None = None
    client_id: str = ""
    keepalive: int = 0
    max_packet: int | None = None
    last_heard: float = 0.0
    out: bytearray = field(default_factory=bytearray)
    subs: dict[str, int] = field(default_factory=dict)
    closing: bool = False  # send what is queued, then close
    problem_info: bool = True  # the client's Request Problem Information: reason strings on acks or not
    dropped: int = 0

    def fileno(self) -> int:
        return self.sock.fileno()


@dataclass
class Counters:
    connections: int = 0
    refused_connections: int = 0
    refused_publishes: int = 0
    refused_subscriptions: int = 0
    qos0_forwarded: int = 0
    qos0_dropped: int = 0  # QoS 0 from apps while the cloud was out of reach
    delivered_to_apps: int = 0
    dropped_to_apps: int = 0  # a client's queue was full, or the loop's inbox was
    protocol_errors: int = 0


def extras_of(p: mqtt5.Publish) -> Extras:
    """What of an app's publish travels to its receivers beyond content type and expiry."""
    if p.response_topic is None and p.correlation_data is None and not p.user_properties:
        return NO_EXTRAS
    return Extras(p.response_topic, p.correlation_data, tuple(p.user_properties))


class RateLimitedLog:
    """One line per (app, kind) per minute, with how many were suppressed since the last one."""

    def __init__(self, every_s: float = REFUSAL_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.last: dict[tuple[str, str], float] = {}
        self.suppressed: collections.Counter[tuple[str, str]] = collections.Counter()

    def warning(self, who: str, kind: str, msg: str, *args: Any) -> None:
        key = (who, kind)
        now = self.clock()
        if key in self.last and now - self.last[key] < self.every_s:
            self.suppressed[key] += 1
            return
        if len(self.last) > 4096:  # bounded whatever the peers do
            self.last.clear()
        self.last[key] = now
        n = self.suppressed.pop(key, 0)
        log.warning("local messaging: " + msg + (f" ({n} more like it not logged)" if n else ""), *args)


class Endpoint:
    """The socket, its clients and the loop. Start with start(); stop() is bounded."""

    def __init__(
        self,
        cfg: LocalMessagingConfig,
        path: Path,
        apps: list[App],
        spool: Spool,
        cloud: CloudLink,
        socket_gid: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.path = path
        self.apps = apps
        self.spool = spool
        self.cloud = cloud
        self.socket_gid = socket_gid
        self.counters = Counters()
        self.refusals = RateLimitedLog()
        self.clients: dict[int, Client] = {}
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max_packet = cfg.max_message_kib * 1024 + 1024  # the payload limit plus room for topic and props
        self._buffer_cap = cfg.client_buffer_kib * 1024
        self._last_state: bool | None = None
        self._verdicts: dict[tuple[str, str], tuple[int, str] | None] = {}  # (app, topic) -> why refused, or None

    # -- life -------------------------------------------------------------------------------------------------------
    def start(self) -> Endpoint:
        self._listener = self._bind()
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="local-messaging", daemon=True)
        self._thread.start()
        log.info("local messaging: serving MQTT 5 on %s", self.path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for c in list(self.clients.values()):
            self._drop(c)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    durable.remove(self.path)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _bind(self) -> socket.socket:
        """Bind the socket 0660 (group: local_messaging.socket_group). A socket file left by a previous run
        is replaced; one that another process still serves is not."""
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(
                    errno.EEXIST, f"{path} exists and is not a socket; remove it or change local_messaging.socket"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
                raise OSError(errno.EADDRINUSE, f"{path}: another process serves this socket")
            except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
                durable.remove(path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # the socket file is created 0660 at bind: never briefly wider
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self.socket_gid is not None:
            os.chown(path, -1, self.socket_gid)
        os.chmod(path, 0o660)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    # -- from other threads -----------------------------------------------------------------------------------------
    def cloud_message(self, topic: str, payload: bytes, props: CloudProperties | None = None) -> None:
        """A message from the cloud (MQTT client thread): queued for the loop, bounded. Its MQTT 5 properties go
        to the apps unaltered (MQTT 5 3.3.2.3), what is left of its expiry included."""
        with self._inbox_lock:
            if len(self._inbox) >= MAX_INBOX:
                self.counters.dropped_to_apps += 1
                return
            self._inbox.append(("message", (topic, payload, props)))
        self._wake()

    def cloud_state(self, connected: bool) -> None:
        with self._inbox_lock:
            self._inbox.append(("state", connected))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.monotonic() + 1.0
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=1.0)
            except OSError as e:
                log.error("local messaging: select failed (%s); stopping the endpoint", e.strerror)
                return
            batch: list[tuple[Client, mqtt5.Publish]] = []
            dirty: set[Client] = set()
            for key, mask in events:
                if key.data == "listener":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    self._drain_inbox(dirty)
                else:
                    c: Client = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(c, batch)
                    dirty.add(c)
            if batch:
                self._commit(batch)
                dirty.update(c for c, _ in batch)
            for c in dirty:
                self._flush(c)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 1.0
                self._tick(now)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the listener stays; the peer waits in the backlog
                self.refusals.warning("-", "accept", "cannot accept a connection (%s)", e.strerror)
                return
            try:
                peer = peer_of(sock)
            except OSError:
                sock.close()
                continue
            if len(self.clients) >= self.cfg.max_clients:
                self.counters.refused_connections += 1
                self.refusals.warning(
                    str(peer.uid), "busy", "refused %s: local_messaging.max_clients reached", peer.describe()
                )
                sock.close()
                continue
            sock.setblocking(False)
            c = Client(sock, peer, time.monotonic(), mqtt5.Decoder(self._max_packet))
            c.last_heard = c.accepted_at
            self.clients[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _read(self, c: Client, batch: list[tuple[Client, mqtt5.Publish]]) -> None:
        if c.closing:
            return
        try:
            data = c.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.last_heard = time.monotonic()
        error: mqtt5.ProtocolError | None = None
        try:
            packets = c.decoder.feed(data)
        except mqtt5.ProtocolError as e:
            error, packets = e, list(e.packets)  # what came before the bad packet is still served
            self.counters.protocol_errors += 1
            who = c.app.name if c.app else str(c.peer.uid)
            if getattr(e, "mqtt311", False):
                c.out += mqtt5.connack_v311(1)
                self._refuse_connection(c, "an MQTT 3.1.1 client: this endpoint speaks MQTT 5 only")
                return
            self.refusals.warning(who, "protocol", "closed a connection from %s: %s", c.peer.describe(), e.message)
            if e.in_connect:  # the connection's answer is a CONNACK
                c.out += mqtt5.connack(e.reason_code, reason_string=e.message)
                c.closing = True
                return
        for p in packets:
            if c.closing:
                return
            if isinstance(p, mqtt5.Connect):
                self._on_connect(c, p)
            elif isinstance(p, mqtt5.Publish):
                self._on_publish(c, p, batch)
            elif isinstance(p, mqtt5.Subscribe):
                self._on_subscribe(c, p)
            elif isinstance(p, mqtt5.Unsubscribe):
                self._on_unsubscribe(c, p)
            elif isinstance(p, mqtt5.PingReq):
                c.out += mqtt5.pingresp()
            elif isinstance(p, mqtt5.Disconnect):
                self._drop(c)
                return
            # PubAck: the client acknowledging a message we sent; we send QoS 0 only, nothing to do
        if error is not None and not c.closing:
            c.out += mqtt5.disconnect(error.reason_code, error.message, max_packet_size=c.max_packet)
            c.closing = True

    def _refuse_connection(self, c: Client, reason: str, log_it: bool = True) -> None:
        self.counters.refused_connections += 1
        if log_it:
            self.refusals.warning(str(c.peer.uid), "connect", "refused %s: %s", c.peer.describe(), reason)
        c.closing = True

    def _on_connect(self, c: Client, p: mqtt5.Connect) -> None:
        c.max_packet = p.maximum_packet_size
        c.problem_info = p.request_problem_information
        app, reason = identify(self.apps, c.peer)
        if app is None:
            c.out += mqtt5.connack(mqtt5.NOT_AUTHORIZED, reason_string=reason, max_packet_size=c.max_packet)
            self._refuse_connection(c, reason)
            return
        if p.will:
            reason = "a will message is not supported by this endpoint"
            c.out += mqtt5.connack(mqtt5.IMPLEMENTATION_SPECIFIC, reason_string=reason, max_packet_size=c.max_packet)
            self._refuse_connection(c, f"app {app.name}: {reason}")
            return
        assigned = None
        client_id = p.client_id
        if not client_id:
            client_id = assigned = f"{app.name}-{c.peer.pid}-{c.sock.fileno()}"
        for other in list(self.clients.values()):  # MQTT: a second connection with the same id takes over
            if other is not c and other.app is app and other.client_id == client_id:
                other.out += mqtt5.disconnect(0x8E, "session taken over", max_packet_size=other.max_packet)
                other.closing = True
                self._flush(other)
        c.app, c.client_id, c.keepalive = app, client_id, p.keepalive
        self.counters.connections += 1
        c.out += mqtt5.connack(
            0,
            receive_maximum=self.cfg.receive_maximum,
            maximum_qos=1,
            retain_available=False,
            maximum_packet_size=self._max_packet,
            assigned_client_id=assigned,
            topic_alias_maximum=0,
            session_expiry=0,
            max_packet_size=c.max_packet,
        )
        log.info(
            "local messaging: app %s connected (%s, client id %s)", app.name, c.peer.describe(), escape(client_id, 64)
        )

    def _publish_problem(self, app: App, p: mqtt5.Publish) -> tuple[int, str] | None:
        if len(p.payload) > self.cfg.max_message_kib * 1024:
            return mqtt5.QUOTA_EXCEEDED, f"payload of {len(p.payload)} bytes (local_messaging.max_message_kib)"
        if p.user_properties or p.correlation_data or p.response_topic:
            n = extras_of(p).size()
            if n > MAX_EXTRAS_BYTES:
                return mqtt5.QUOTA_EXCEEDED, (
                    f"response topic, correlation data and user properties of {n} bytes (at most {MAX_EXTRAS_BYTES})"
                )
        key = (app.name, p.topic)
        try:
            return self._verdicts[key]  # an app publishes to few topics, many times: decide each once
        except KeyError:
            pass
        verdict = self._topic_problem(app, p)
        if len(p.topic) <= 256:  # bounded: at most 4096 short topics (longer ones are refused anyway)
            if len(self._verdicts) >= 4096:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _topic_problem(self, app: App, p: mqtt5.Publish) -> tuple[int, str] | None:
        if p.topic.startswith("$agent/"):
            return mqtt5.NOT_AUTHORIZED, f"{p.topic}: $agent/ topics are the agent's; apps may only subscribe to them"
        if not app.may_publish(p.topic):
            return mqtt5.NOT_AUTHORIZED, f"{p.topic}: not in local_messaging.apps.{app.name}.publish"
        problem = aws_topic_problem(p.topic)
        if problem:
            return mqtt5.TOPIC_NAME_INVALID, f"{p.topic}: AWS IoT would refuse it ({problem})"
        return None

    def _on_publish(self, c: Client, p: mqtt5.Publish, batch: list[tuple[Client, mqtt5.Publish]]) -> None:
        app = c.app
        if app is None:
            return
        problem = self._publish_problem(app, p)
        if problem:
            code, reason = problem
            self.counters.refused_publishes += 1
            self.refusals.warning(app.name, "publish", "app %s: publish refused: %s", app.name, escape(reason, 300))
            if p.qos == 1:
                assert p.packet_id is not None
                c.out += mqtt5.puback(p.packet_id, code, self._why(c, reason), max_packet_size=c.max_packet)
            else:  # QoS 0 has no answer but this: the connection ends with the reason
                c.out += mqtt5.disconnect(code, reason, max_packet_size=c.max_packet)
                c.closing = True
            return
        if p.qos == 1:
            batch.append((c, p))
            return
        if self.cloud.publish_now(p.topic, p.payload, p.content_type, p.message_expiry, extras_of(p)):
            self.counters.qos0_forwarded += 1
        else:
            self.counters.qos0_dropped += 1

    def _commit(self, batch: list[tuple[Client, mqtt5.Publish]]) -> None:
        items = []
        for c, p in batch:
            assert c.app is not None
            items.append((c.app.name, p.topic, p.payload, p.content_type, p.message_expiry, extras_of(p)))
        try:
            results: list[int | SpoolRefused] | None = self.spool.add_many(items)
        except SpoolError as e:
            results = None
            reason = f"the spool cannot store messages now: {e}"
            self.refusals.warning("-", "spool", "%s; QoS 1 publishes are refused until it can", reason)
        stored = 0
        for i, (c, p) in enumerate(batch):
            assert p.packet_id is not None and c.app is not None
            r = results[i] if results is not None else None
            if c.closing:  # it broke the protocol after this publish: no answer after our DISCONNECT
                stored += isinstance(r, int)
                continue
            if isinstance(r, int):
                c.out += mqtt5.puback(p.packet_id)
                stored += 1
                continue
            self.counters.refused_publishes += 1
            if isinstance(r, SpoolRefused):
                why = str(r)
                self.refusals.warning(c.app.name, "full", "app %s: publish refused: %s", c.app.name, why)
            else:
                why = reason
            c.out += mqtt5.puback(p.packet_id, mqtt5.QUOTA_EXCEEDED, self._why(c, why), max_packet_size=c.max_packet)
        if stored:
            self.cloud.spooled()

    def _on_subscribe(self, c: Client, p: mqtt5.Subscribe) -> None:
        app = c.app
        if app is None:
            return
        codes: list[int] = []
        reasons: list[str] = []
        for s in p.subscriptions:
            f = s.topic_filter
            problem = filter_problem(f)
            if p.subscription_identifier is not None:
                codes.append(mqtt5.SUB_IDS_NOT_SUPPORTED)
                reasons.append(f"{f}: subscription identifiers are not supported")
            elif f.startswith("$share/"):
                codes.append(mqtt5.SHARED_SUB_NOT_SUPPORTED)
                reasons.append(f"{f}: shared subscriptions are not supported")
            elif problem:
                codes.append(mqtt5.TOPIC_FILTER_INVALID)
                reasons.append(f"{f}: {problem}")
            elif f != STATE_TOPIC and not app.may_subscribe(f):
                codes.append(mqtt5.NOT_AUTHORIZED)
                reasons.append(f"{f}: not in local_messaging.apps.{app.name}.subscribe")
            elif f not in c.subs and len(c.subs) >= self.cfg.max_subscriptions:
                codes.append(mqtt5.QUOTA_EXCEEDED)
                reasons.append(f"{f}: local_messaging.max_subscriptions ({self.cfg.max_subscriptions}) reached")
            else:
                codes.append(0)  # granted QoS 0: the agent keeps no session for apps
                if f not in c.subs:
                    c.subs[f] = 0
                    if f != STATE_TOPIC:
                        self.cloud.want(f)
                if f == STATE_TOPIC:
                    self._send_state(c, self.cloud.connected())
        refused = reasons  # one reason per refused filter
        if refused:
            self.counters.refused_subscriptions += len(refused)
            self.refusals.warning(
                app.name, "subscribe", "app %s: subscription refused: %s", app.name, escape("; ".join(refused), 300)
            )
        c.out += mqtt5.suback(
            p.packet_id, codes, self._why(c, "; ".join(refused) or None), max_packet_size=c.max_packet
        )

    def _on_unsubscribe(self, c: Client, p: mqtt5.Unsubscribe) -> None:
        codes = []
        for f in p.topic_filters:
            if c.subs.pop(f, None) is None:
                codes.append(mqtt5.NO_SUBSCRIPTION_EXISTED)
                continue
            codes.append(0)
            if f != STATE_TOPIC:
                self.cloud.unwant(f)
        c.out += mqtt5.unsuback(p.packet_id, codes)

    @staticmethod
    def _why(c: Client, reason: str | None) -> str | None:
        """A reason string for an ack, unless the client asked for none (Request Problem Information = 0)."""
        return reason if c.problem_info else None

    # -- to clients -------------------------------------------------------------------------------------------------
    def _drain_inbox(self, dirty: set[Client]) -> None:
        with self._inbox_lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, value in items:
            if kind == "state":
                if value == self._last_state:
                    continue
                self._last_state = value
                for c in self.clients.values():
                    if STATE_TOPIC in c.subs:
                        self._send_state(c, value)
                        dirty.add(c)
            else:
                topic, payload, props = value
                for c in self.clients.values():
                    if c.app is not None and any(f != STATE_TOPIC and matches(f, topic) for f in c.subs):
                        self._deliver(c, topic, payload, props)
                        dirty.add(c)

    def _send_state(self, c: Client, connected: bool) -> None:
        doc = json.dumps({"connected": connected, "at": int(time.time())}).encode()
        self._deliver(c, STATE_TOPIC, doc)

    def _deliver(self, c: Client, topic: str, payload: bytes, props: CloudProperties | None = None) -> None:
        try:
            data = mqtt5.publish(
                topic,
                payload,
                content_type=getattr(props, "content_type", None),
                message_expiry=getattr(props, "message_expiry_s", None),
                response_topic=getattr(props, "response_topic", None),
                correlation_data=getattr(props, "correlation_data", None),
                user_properties=getattr(props, "user_properties", ()) or (),
            )
        except ValueError as e:  # the broker let through what MQTT 5 forbids (a bad topic or property): not relayed
            c.dropped += 1
            self.counters.dropped_to_apps += 1
            self.refusals.warning("-", "cloud-message", "a cloud message not relayed to apps: %s", escape(str(e), 200))
            return
        if len(c.out) + len(data) > self._buffer_cap or (c.max_packet is not None and len(data) > c.max_packet):
            c.dropped += 1
            self.counters.dropped_to_apps += 1
            if c.app is not None:
                self.refusals.warning(
                    c.app.name, "slow", "app %s is not reading: dropped messages for it (client_buffer_kib)", c.app.name
                )
            return
        c.out += data
        self.counters.delivered_to_apps += 1

    def _flush(self, c: Client) -> None:
        if c.sock.fileno() < 0:
            return
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(c)
                return
            del c.out[:n]
        if c.closing and not c.out:
            self._drop(c)
            return
        want = selectors.EVENT_WRITE if c.out else 0
        if not c.closing and len(c.out) < self._buffer_cap:
            want |= selectors.EVENT_READ  # back-pressure: a client we cannot write to is not read from
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._sel.modify(c.sock, want or selectors.EVENT_READ, c)

    def _drop(self, c: Client) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._sel.unregister(c.sock)
            self.clients.pop(fd, None)
            c.sock.close()
        for f in list(c.subs):
            if f != STATE_TOPIC:
                self.cloud.unwant(f)
        c.subs.clear()
        if c.app is not None:
            log.info("local messaging: app %s disconnected (client id %s)", c.app.name, escape(c.client_id, 64))

    def _tick(self, now: float) -> None:
        for c in list(self.clients.values()):
            if c.app is None and now - c.accepted_at > CONNECT_TIMEOUT_S:
                self._refuse_connection(c, "no CONNECT within 10 s", log_it=False)
                self._drop(c)
            elif c.app is not None and c.keepalive and now - c.last_heard > 1.5 * c.keepalive:
                self._drop(c)  # MQTT 5 3.1.2.10: the client is gone

    def stats(self) -> dict[str, int]:
        out = dict(vars(self.counters))
        out["clients"] = sum(1 for c in self.clients.values() if c.app is not None)
        return out
