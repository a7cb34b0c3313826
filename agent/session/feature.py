"""The one interface between the daemon and a capability: a Feature, started with a Session.

The daemon knows no capability by name. It builds the enabled features from the registry
(agent.runtime.features), starts each one with the session of the current connection, tells them of
every (re)connection, asks them for a status line, and stops them when the session ends (SIGTERM, a
rotation switching credentials, a refusal). A feature keeps nothing of a session after `stop()`: the
next session may use another certificate and key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.base.config import Config, Section
from agent.base.state import StateStore

if TYPE_CHECKING:
    from agent.session.connection import Connection

# A job handler: (job id, document, progress callback) -> an outcome (agent.jobs.engine.Outcome).
JobHandler = Callable[..., Any]


@dataclass(frozen=True)
class MessageProperties:
    """The MQTT 5 properties a handler may need (Commands: the payload's type and the execution's timeout; local
    messaging relays them all to apps)."""

    content_type: str | None = None
    message_expiry_s: int | None = None  # what is left of it when the message reached us
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


class MessageRouter:
    """Incoming publishes to the feature that asked for them, by topic prefix (first match wins)."""

    takes_properties = True  # agent.session.connection passes MessageProperties as a third argument

    def __init__(self) -> None:
        self.routes: list[tuple[str, Callable[..., None], bool]] = []
        self.watchers: list[Callable[[str, bytes, MessageProperties], None]] = []

    def add(self, prefix: str, handler: Callable[..., None], *, with_properties: bool = False) -> None:
        """with_properties: `handler(topic, payload, MessageProperties)` instead of `handler(topic, payload)`."""
        self.routes.append((prefix, handler, with_properties))

    def watch(self, handler: Callable[[str, bytes, MessageProperties], None]) -> None:
        """`handler(topic, payload, MessageProperties)` sees every message, after its route (local apps subscribe by
        filter, not by prefix)."""
        self.watchers.append(handler)

    def __call__(self, topic: str, payload: bytes, props: MessageProperties | None = None) -> None:
        for prefix, handler, with_properties in self.routes:
            if topic.startswith(prefix):
                if with_properties:
                    handler(topic, payload, props or MessageProperties())
                else:
                    handler(topic, payload)
                break
        for w in self.watchers:
            w(topic, payload, props or MessageProperties())


@dataclass(eq=False)
class Session:
    """What a feature may use while one connection lasts."""

    thing_name: str
    certificate_file: Path
    key_label: str
    conn: Connection  # publish, subscribe, connected, service_client: never the awscrt client itself
    store: StateStore
    router: MessageRouter
    stop: threading.Event  # set on SIGTERM: long waits end on it
    end: Callable[[], None]  # end this session; the daemon starts the next one (new credentials)
    request_restart: Callable[[], None]  # stop the agent so its launcher starts the new release
    # Apply a new config to the running features (agent.runtime.daemon); returns how it was applied.
    reconfigure: Callable[[Config], str] | None = None
    # Operations the jobs feature serves, by job document operation; features add theirs in start().
    job_handlers: dict[str, JobHandler] = field(default_factory=dict)


class Feature:
    """A capability the daemon runs over a session. Subclasses override what they need."""

    name = "feature"

    def start(self, session: Session) -> None:
        """Subscribe, add routes and job handlers, start threads. Must not block on the network."""

    def on_connected(self) -> None:
        """Every (re)connection of the session, including one that happened before start() returned."""

    def status(self) -> str | None:
        """One short line for `iot-agent status`'s and systemd's STATUS=, or None when idle."""
        return None

    def reconfigure(self, cfg: Config) -> bool:
        """Take a changed config (a configuration shadow's overlay) without stopping; True when done. False:
        the daemon starts a new session with it instead (a reconnect), so a feature needs this only to
        change without one."""
        return False

    def stop(self) -> None:
        """End the session's work and drop what holds the connection; bounded (a few seconds)."""


@dataclass(frozen=True)
class FeatureSpec:
    """A capability as the registry lists it: its config sections (with their validation), whether the
    config enables it, and how to build it for a run."""

    name: str
    sections: tuple[Section, ...]
    enabled: Callable[[Config], bool]
    build: Callable[[Config, StateStore], Feature]
    # What a feature keeps across sessions (local messaging's endpoint and spool) is released here, once,
    # when the daemon stops.
    close: Callable[[], None] | None = None
