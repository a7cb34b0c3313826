"""Who is on the other end of a local connection, and which app entry (if any) that makes it.

The kernel tells us the peer's pid, uid and gid at connect time (SO_PEERCRED): they cannot be forged
by the peer, unlike anything it sends. The systemd unit comes from /proc/PID/cgroup, read right after
accept; it is only used to narrow an entry that already matched by uid, never to widen one.
"""

from __future__ import annotations

import grp
import pwd
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from agent.local_messaging.config import AppConfig
from agent.local_messaging.topics import covers, matches, substitute

_UNIT_IN_CGROUP = re.compile(r"/([^/]+\.(?:service|scope))(?:/|$)")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    unit: str | None  # the innermost systemd service or scope, None when not found

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid} gid {self.gid}" + (f" unit {self.unit}" if self.unit else "")


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, unit_of(pid))


def unit_of(pid: int) -> str | None:
    """The last service/scope in the process's unified cgroup path ("0::/system.slice/x.service")."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            found = _UNIT_IN_CGROUP.findall(line[3:])
            return found[-1] if found else None
    return None


def uid_of(user: str) -> int | None:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def gid_of(group: str) -> int | None:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


@dataclass(frozen=True)
class App:
    """An app entry made concrete for this device: names resolved, `${thing}` substituted."""

    name: str
    uid: int | None  # None: the user does not exist on this system (the entry matches nobody)
    gid: int | None
    unit: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    needs_gid: bool

    def accepts(self, peer: Peer) -> bool:
        if self.uid is None or peer.uid != self.uid:
            return False
        if self.needs_gid and peer.gid != self.gid:
            return False
        return not self.unit or peer.unit == self.unit

    def may_publish(self, topic: str) -> bool:
        return any(matches(f, topic) for f in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        return any(covers(f, topic_filter) for f in self.subscribe)


def resolve_apps(apps: Mapping[str, AppConfig], thing: str) -> list[App]:
    out = []
    for name, a in apps.items():
        out.append(
            App(
                name=name,
                uid=uid_of(a.user),
                gid=gid_of(a.group) if a.group else None,
                unit=a.unit,
                publish=tuple(substitute(f, thing) for f in a.publish),
                subscribe=tuple(substitute(f, thing) for f in a.subscribe),
                needs_gid=bool(a.group),
            )
        )
    return out


def identify(apps: list[App], peer: Peer) -> tuple[App | None, str]:
    """The one app entry this peer is, or None and the reason it is refused. Two entries matching the
    same peer is a refusal too: which rules apply must never depend on the order of the config."""
    found = [a for a in apps if a.accepts(peer)]
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, f"no local_messaging app entry matches this process ({peer.describe()})"
    names = ", ".join(a.name for a in found)
    return None, f"more than one local_messaging app entry matches this process ({names}); make them distinct"
