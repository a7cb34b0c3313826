"""Local messaging as a daemon feature: the endpoint and the spool outlive sessions; each session lends
them its connection.

A session ends when a rotation switches credentials or the broker refuses the device; apps must not
notice more than a connection state change. So the hub (endpoint, spool, forwarder, the cloud
subscriptions apps asked for) is built once per process, on the first session (the thing name is
known then), and closed by the daemon when it stops (FeatureSpec.close). A session only attaches its
connection, and detaches it before the connection stops.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.base.config import Config
from agent.base.state import StateStore
from agent.local_messaging.config import SECTIONS
from agent.session.feature import Feature, FeatureSpec, Session

if TYPE_CHECKING:
    from agent.local_messaging.forwarder import Forwarder
    from agent.local_messaging.server import Endpoint
    from agent.local_messaging.spool import Spool

log = logging.getLogger("agent")

SOCKET_NAME = "local.sock"
SPOOL_NAME = "spool.sqlite"


def socket_path(cfg: Config) -> Path:
    m = cfg.local_messaging
    if m.socket is not None:
        return cfg.resolve(m.socket)
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # systemd's RuntimeDirectory=iot-agent
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    return cfg.resolve(cfg.device.state_dir) / SOCKET_NAME


def spool_path(cfg: Config) -> Path:
    m = cfg.local_messaging
    return cfg.resolve(m.spool_file) if m.spool_file is not None else cfg.resolve(cfg.device.state_dir) / SPOOL_NAME


class Hub:
    """Endpoint + spool + forwarder for the whole run; the cloud side of the endpoint (CloudLink)."""

    def __init__(self, cfg: Config, thing: str) -> None:
        from agent.local_messaging.forwarder import Forwarder
        from agent.local_messaging.peers import gid_of, resolve_apps
        from agent.local_messaging.server import Endpoint
        from agent.local_messaging.spool import Spool, SpoolLimits

        m = cfg.local_messaging
        self.thing = thing
        self._lock = threading.Lock()
        self._conn: Any = None
        self._wants: collections.Counter[str] = collections.Counter()
        path = spool_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        limits = SpoolLimits(
            max_bytes=m.spool_max_mib * 1024 * 1024,
            max_messages=m.spool_max_messages,
            max_age_s=m.spool_max_age_s,
            when_full=m.when_full,
        )
        self.spool: Spool = Spool(path, limits)
        gid = None
        if m.socket_group:
            gid = gid_of(m.socket_group)
            if gid is None:
                self.spool.close()
                raise OSError(f"local_messaging.socket_group: no group {m.socket_group!r} on this system")
        self.forwarder: Forwarder = Forwarder(self.spool, m.forward_window, self._state)
        self.endpoint: Endpoint = Endpoint(m, socket_path(cfg), resolve_apps(m.apps, thing), self.spool, self, gid)

    def start(self) -> Hub:
        try:
            self.endpoint.start()
        except BaseException:
            self.spool.close()
            raise
        self.forwarder.start()
        stats = self.spool.stats()
        if stats.get("messages"):
            log.info(
                "local messaging: %s spooled message(s) (%s bytes) from before to send",
                stats["messages"],
                stats["bytes"],
            )
        return self

    def close(self) -> None:
        self.endpoint.stop()
        self.forwarder.stop()
        self.spool.close()

    # -- sessions ---------------------------------------------------------------------------------------------------
    def attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn
        self.forwarder.attach(conn)

    def detach(self) -> None:
        with self._lock:
            self._conn = None
        self.forwarder.detach()
        self.endpoint.cloud_state(False)

    def on_connected(self) -> None:
        with self._lock:
            conn, wants = self._conn, list(self._wants)
        for f in wants:  # a clean session: the broker forgot them
            self._subscribe(conn, f)
        self.forwarder.wake()

    def on_message(self, topic: str, payload: bytes, props: Any = None) -> None:
        from agent.local_messaging.topics import matches

        with self._lock:
            wanted = any(matches(f, topic) for f in self._wants)
        if wanted:
            self.endpoint.cloud_message(topic, payload, props)

    # -- CloudLink, called by the endpoint's loop ------------------------------------------------------------------
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.connected.is_set()

    def spooled(self) -> None:
        self.forwarder.wake()

    def publish_now(
        self, topic: str, payload: bytes, content_type: str | None, expiry: int | None, extras: Any = None
    ) -> bool:
        conn = self._conn
        if conn is None or not conn.connected.is_set():
            return False
        try:
            conn.publish_async(topic, payload, 0, content_type, expiry, extras)
        except Exception:
            return False
        return True

    def want(self, topic_filter: str) -> None:
        with self._lock:
            self._wants[topic_filter] += 1
            first = self._wants[topic_filter] == 1
            conn = self._conn
        if first and conn is not None and conn.connected.is_set():
            self._subscribe(conn, topic_filter)

    def unwant(self, topic_filter: str) -> None:
        with self._lock:
            self._wants[topic_filter] -= 1
            last = self._wants[topic_filter] <= 0
            if last:
                del self._wants[topic_filter]
            conn = self._conn
        if last and conn is not None and conn.connected.is_set():
            try:
                conn.unsubscribe_async(topic_filter)
            except Exception as e:
                log.debug("local messaging: unsubscribe not sent (%s)", e.__class__.__name__)

    def _subscribe(self, conn: Any, topic_filter: str) -> None:
        from agent.base.logfmt import escape

        def done(fut) -> None:
            try:
                code = int(fut.result().reason_codes[0])
            except Exception as e:
                log.warning(
                    "local messaging: subscribing to %s failed (%s)", escape(topic_filter, 200), e.__class__.__name__
                )
                return
            if code >= 128:
                log.warning(
                    "local messaging: the broker refused the subscription to %s (reason %d): check the device policy",
                    escape(topic_filter, 200),
                    code,
                )

        if conn is None:
            return
        try:
            conn.subscribe_async(topic_filter, 1).add_done_callback(done)
        except Exception as e:
            log.debug("local messaging: subscribe not sent (%s)", e.__class__.__name__)

    def _state(self, online: bool) -> None:
        self.endpoint.cloud_state(online)

    def stats(self) -> dict[str, Any]:
        return {"spool": self.spool.stats(), "endpoint": self.endpoint.stats()}


_hub: Hub | None = None
_hub_lock = threading.Lock()


def hub_for(cfg: Config, thing: str) -> Hub:
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = Hub(cfg, thing).start()
        return _hub


def close_hub() -> None:
    global _hub
    with _hub_lock:
        hub, _hub = _hub, None
    if hub is not None:
        hub.close()


class LocalMessagingFeature(Feature):
    name = "local_messaging"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.cfg = cfg
        self.hub: Hub | None = None

    def start(self, session: Session) -> None:
        from agent.local_messaging.spool import SpoolError

        try:
            self.hub = hub_for(self.cfg, session.thing_name)
        except (OSError, ValueError, SpoolError) as e:
            log.error("local messaging: cannot start (%s); apps cannot connect", e)
            return
        session.router.watch(self.hub.on_message)
        self.hub.attach(session.conn)

    def on_connected(self) -> None:
        if self.hub is not None:
            self.hub.on_connected()

    def status(self) -> str | None:
        if self.hub is None:
            return None
        s = self.hub.spool.stats()
        clients = self.hub.endpoint.stats()["clients"]
        return f"{clients} local app connection(s), {s.get('messages', 0)} message(s) spooled"

    def stop(self) -> None:
        if self.hub is not None:
            self.hub.detach()
        self.hub = None


FEATURE = FeatureSpec(
    "local_messaging",
    SECTIONS,
    enabled=lambda cfg: cfg.local_messaging.enabled,
    build=LocalMessagingFeature,
    close=close_hub,
)
