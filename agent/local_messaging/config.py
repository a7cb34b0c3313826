"""The local messaging capability's config: [local_messaging] and its [local_messaging.apps.NAME] entries.

Off by default: the endpoint lets local programs publish as this device. Who may connect is decided
twice: by the socket file's group (the kernel checks it at connect) and by the peer's credentials
(SO_PEERCRED), which must match one app entry; each app then publishes and subscribes only within its
own topic lists. A `${thing}` in a topic filter is the device's thing name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.config import DAY, GIB, Bound, Section

KIB = 1024
MIB = 1024 * KIB
# A systemd unit name as /proc/PID/cgroup shows it: "sensor.service", "app@1.service".
UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}\.(service|scope)")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WHEN_FULL = ("refuse", "evict-oldest")


@dataclass(frozen=True)
class AppConfig:
    """One local program: how to recognise it and what it may do.

    `user` (a name or a numeric uid) must match the peer's uid. `group` and `unit`, when set, must match
    too: the peer's primary gid, and the systemd unit its process runs in (from /proc/PID/cgroup)."""

    user: str = ""
    group: str = ""
    unit: str = ""
    publish: list[str] = field(default_factory=list)  # topic filters; `$aws/...` only when listed as such
    subscribe: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LocalMessagingConfig:
    """A local MQTT 5 endpoint for gateway apps, with a durable store-and-forward spool."""

    enabled: bool = False
    # "" -> $RUNTIME_DIRECTORY/local.sock under systemd (RuntimeDirectory=iot-agent), else state_dir/local.sock
    socket: Path | None = None
    # The socket file's group (0660): members may connect; the app entries then decide. "" keeps the agent's.
    socket_group: str = ""
    apps: dict[str, AppConfig] = field(default_factory=dict)
    spool_file: Path | None = None  # "" -> state_dir/spool.sqlite
    spool_max_mib: int = 64  # topic + payload (+ MQTT 5 properties) bytes held while the cloud is out of reach
    spool_max_messages: int = 1_000_000
    spool_max_age_s: float = 7 * DAY  # older messages are dropped (counted)
    # When the spool is full: "refuse" new QoS 1 messages (the app hears why), or "evict-oldest" (counted).
    when_full: str = "refuse"
    max_message_kib: int = 128  # AWS IoT Core's limit for one message
    max_clients: int = 32
    max_subscriptions: int = 32  # per client
    # Bytes queued to one client (messages it subscribed to); past it, messages for that client are dropped
    # (counted) and it is not read from until it catches up: a client that never reads cannot grow the agent.
    client_buffer_kib: int = 256
    receive_maximum: int = 64  # QoS 1 publishes a client may have unacknowledged
    forward_window: int = 64  # QoS 1 messages in flight to the broker at once


def _problems(c: Mapping[str, Any]) -> list[str]:
    from agent.local_messaging.topics import filter_problem

    m: LocalMessagingConfig = c["local_messaging"]
    out: list[str] = []
    if m.enabled and not m.apps:
        out.append(
            'local_messaging.apps: empty; add [local_messaging.apps.NAME] with user = "..." and publish = [...], '
            "or disable local messaging"
        )
    for name, app in m.apps.items():
        key = f"local_messaging.apps.{name}"
        if not NAME_RE.fullmatch(name):
            out.append(f"{key}: not an app name (letters, digits, '.', '_', '-'; at most 64)")
        if not app.user:
            out.append(f"{key}.user: required (the user name or uid the app runs as)")
        if app.unit and not UNIT_RE.fullmatch(app.unit):
            out.append(f"{key}.unit: {app.unit!r} is not a systemd unit name such as 'sensor.service'")
        for kind in ("publish", "subscribe"):
            for f in getattr(app, kind):
                problem = _filter_problem(f, filter_problem)
                if problem:
                    out.append(f"{key}.{kind}: {f!r}: {problem}")
    return out


def _filter_problem(template: str, filter_problem) -> str | None:
    from agent.local_messaging.topics import substitute

    try:
        concrete = substitute(template, "thing")
    except ValueError as e:
        return str(e)
    return filter_problem(concrete)


SECTIONS = (
    Section(
        "local_messaging",
        LocalMessagingConfig,
        problems=_problems,
        choices={"when_full": WHEN_FULL},
        bounds={
            LocalMessagingConfig: {
                "spool_max_mib": Bound(1, 64 * GIB // MIB, "MiB"),
                "spool_max_messages": Bound(1, 100_000_000),
                "spool_max_age_s": Bound(60, 365 * DAY, "s"),
                "max_message_kib": Bound(1, 128, "KiB", hint="AWS IoT Core takes at most 128 KiB per message"),
                "max_clients": Bound(1, 1024),
                "max_subscriptions": Bound(1, 256),
                "client_buffer_kib": Bound(16, 16 * KIB, "KiB"),
                "receive_maximum": Bound(1, 1024),
                "forward_window": Bound(1, 1024),
            },
            AppConfig: {},
        },
    ),
)
