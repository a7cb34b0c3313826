"""Secure tunneling as a daemon feature: a notification opens a tunnel; the operator's allowlist
decides what it reaches.

The notification (`$aws/things/<thing>/tunnels/notify`) is network input like any other: it is
checked completely (size, JSON shape, mode, region, service ids, the token's characters, since the
token becomes an HTTP header) before anything is opened, and a token is used once per run. Open
tunnels are written to the state file (for `iot-agent status` and the inventory shadow) when they
open and close, never their tokens.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.base import digest
from agent.base.config import Config
from agent.base.state import StateStore
from agent.session.feature import Feature, FeatureSpec, Session
from agent.tunneling.config import REGION_RE, SECTIONS, SERVICE_ID_RE

if TYPE_CHECKING:  # imported in start(): the daemon never loads a disabled feature's modules
    from agent.tunneling.tunnel import Tunnel

log = logging.getLogger("agent")

MAX_NOTIFICATION_BYTES = 8192
MAX_SERVICES = 10  # AWS allows 3 per tunnel
# The token travels as an HTTP header: visible ASCII only, so it cannot end the header or add one.
TOKEN_RE = re.compile(r"[\x21-\x7e]{16,4096}")
USED_TOKENS_KEPT = 256


@dataclass(frozen=True)
class Notification:
    token: str
    region: str
    services: tuple[str, ...]


def parse_notification(payload: bytes) -> Notification:
    """The notification, validated whole; ValueError with a reason that quotes no token."""
    if len(payload) > MAX_NOTIFICATION_BYTES:
        raise ValueError(f"{len(payload)} bytes (at most {MAX_NOTIFICATION_BYTES})")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    mode = doc.get("clientMode")
    if mode != "destination":
        raise ValueError(f"clientMode is {mode!r}, not 'destination'" if isinstance(mode, str) else "no clientMode")
    token = doc.get("clientAccessToken")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise ValueError("clientAccessToken is missing or not 16-4096 visible ASCII characters")
    region = doc.get("region")
    if not isinstance(region, str) or not REGION_RE.fullmatch(region):
        raise ValueError("region is missing or not an AWS region name")
    services = doc.get("services")
    if not isinstance(services, list) or not 1 <= len(services) <= MAX_SERVICES:
        raise ValueError(f"services is not a list of 1-{MAX_SERVICES} service ids")
    if not all(isinstance(s, str) and SERVICE_ID_RE.fullmatch(s) for s in services) or len(set(services)) < len(
        services
    ):
        raise ValueError("services holds something other than distinct service ids")
    return Notification(token, region, tuple(services))


def endpoint_host(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"data.tunneling.iot.{region}.{suffix}"


class TunnelingFeature(Feature):
    name = "tunneling"

    def __init__(self, cfg: Config, store: StateStore) -> None:
        self.cfg = cfg
        self.section = cfg.tunneling
        self.store = store
        self.tunnels: dict[str, Tunnel] = {}
        self._lock = threading.Lock()
        self._used: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._session: Session | None = None
        self.topic = ""

    def start(self, session: Session) -> None:
        self._session = session
        self.topic = f"$aws/things/{session.thing_name}/tunnels/notify"
        session.router.add(self.topic, self.on_notify)
        self._publish_state()  # none open: clears what a previous run left
        allowed = ", ".join(f"{n} -> {s.target}" for n, s in self.section.services.items())
        log.info("secure tunneling: services %s", allowed)

    def on_connected(self) -> None:
        session = self._session
        if session is None:
            return

        def subscribe() -> None:
            try:
                code = session.conn.subscribe(self.topic, qos=1)
                if code >= 128:
                    log.warning("secure tunneling: subscribing to %s refused (reason %d)", self.topic, code)
                else:
                    log.info("secure tunneling: waiting for tunnel notifications on %s", self.topic)
            except Exception as e:
                log.warning("secure tunneling: could not subscribe to %s (%s)", self.topic, e.__class__.__name__)

        threading.Thread(target=subscribe, name="tunneling-subscribe", daemon=True).start()

    def on_notify(self, _topic: str, payload: bytes) -> None:
        from agent.tunneling.tunnel import Tunnel, tunnel_id

        try:
            note = parse_notification(payload)
        except ValueError as e:
            log.warning("secure tunneling: notification refused: %s; nothing opened", e)
            return
        tid = tunnel_id(note.token)
        key = digest.sha256(note.token.encode()).hexdigest()
        listed = tuple(s for s in note.services if s in self.section.services)
        unlisted = [s for s in note.services if s not in self.section.services]
        with self._lock:
            refusal = ""
            if key in self._used:
                refusal = "its access token was already used"
            elif not listed:
                refusal = f"none of its services ({', '.join(note.services)}) is in tunneling.services"
            elif len(self.tunnels) >= self.section.max_tunnels:
                refusal = f"tunneling.max_tunnels ({self.section.max_tunnels}) are open"
            if refusal:
                log.warning("secure tunneling: tunnel %s refused: %s; nothing opened", tid, refusal)
                return
            self._used[key] = None
            while len(self._used) > USED_TOKENS_KEPT:
                self._used.popitem(last=False)
            if unlisted:
                log.warning(
                    "secure tunneling: tunnel %s: services %s are not in tunneling.services and will be refused",
                    tid,
                    ", ".join(unlisted),
                )
            host = self.section.endpoint or endpoint_host(note.region)
            ca = self.section.ca_file or self.cfg.broker.ca_file
            tunnel = Tunnel(
                token=note.token,
                services=note.services,
                host=host,
                port=self.section.port,
                ca_file=self.cfg.resolve(Path(ca)),
                cfg=self.section,
                connect_timeout_s=self.cfg.broker.connect_timeout_s,
                on_end=self._ended,
            )
            self.tunnels[tunnel.id] = tunnel
        log.info("secure tunneling: opening tunnel %s to %s:%d for %s", tid, host, self.section.port, ", ".join(listed))
        tunnel.start()
        self._publish_state()

    def _ended(self, tunnel: Tunnel) -> None:
        with self._lock:
            self.tunnels.pop(tunnel.id, None)
        self._publish_state()

    def _publish_state(self) -> None:
        try:
            keep = ("id", "services", "opened_at")  # what changes only when a tunnel opens or closes
            self.store.update(tunnels=[{k: i[k] for k in keep} for i in self.open_tunnels()])
        except Exception as e:  # the state is for status; a tunnel must not fail on it
            log.warning("secure tunneling: could not record open tunnels (%s)", e.__class__.__name__)

    def open_tunnels(self) -> list[dict[str, Any]]:
        with self._lock:
            tunnels = list(self.tunnels.values())
        return [t.info() for t in tunnels]

    def status(self) -> str | None:
        infos = self.open_tunnels()
        if not infos:
            return None
        conns = sum(sum(i["connections"].values()) for i in infos)
        return f"{len(infos)} tunnel(s) open, {conns} connection(s)"

    def stop(self) -> None:
        with self._lock:
            tunnels = list(self.tunnels.values())
        for t in tunnels:
            t.stop("the agent is stopping")
        self._session = None


FEATURE = FeatureSpec("tunneling", SECTIONS, enabled=lambda cfg: cfg.tunneling.enabled, build=TunnelingFeature)
