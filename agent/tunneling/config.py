"""The tunneling capability's config: [tunneling] and its [tunneling.services.NAME] allowlist.

Off by default: a tunnel is a way into the gateway. Only the services listed here can be reached,
each at one local address fixed by the operator, never one the tunnel names. A target must be a
loopback address unless `allow_pivot_to_other_hosts` is set: with it, whoever opens a tunnel reaches
other machines of the device's network through it (the switch is named for that risk).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.config import DAY, REQUIRED, Bound, Config, Section
from agent.base.pemfile import MISSING_FILE, certificate_file_problem

KIB = 1024
# AWS IoT secure tunneling service ids (destinationConfig.services): letters, digits, ':', '_', '-'.
SERVICE_ID_RE = re.compile(r"[A-Za-z0-9:_-]{1,128}")
# The tunneling data endpoint's host is built from the notification's region: it must be a region.
REGION_RE = re.compile(r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}")


@dataclass(frozen=True)
class TunnelService:
    """One service a tunnel may reach: where it listens on this device."""

    target: str = REQUIRED  # "127.0.0.1:22", "[::1]:22" or "localhost:22"
    max_connections: int = 8  # at once, per tunnel


@dataclass(frozen=True)
class TunnelingConfig:
    """AWS IoT secure tunneling, destination side."""

    enabled: bool = False
    services: dict[str, TunnelService] = field(default_factory=dict)
    # "" builds the AWS endpoint from the notification's region (data.tunneling.iot.REGION.amazonaws.com,
    # .com.cn in China); the local cloud sets its own host here.
    endpoint: str = ""
    port: int = 443
    ca_file: Path | None = None  # the CA that must have signed the tunneling endpoint; default: broker.ca_file
    allow_pivot_to_other_hosts: bool = False  # targets outside loopback: the tunnel reaches the LAN
    max_tunnels: int = 4  # open at once; a notification beyond it is refused
    max_connections: int = 16  # per tunnel, all services together
    buffer_kib: int = 256  # per tunnel, each way: bytes held for a slow side before reading stops
    lifetime_s: float = 43200.0  # a tunnel is closed after this even if the cloud has not (AWS's maximum: 12 h)
    reconnect_s: float = 60.0  # after a network drop, reconnect with the client token for this long


def split_target(target: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError with the reason."""
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be 1-65535")
    if not host:
        raise ValueError("empty host")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    import ipaddress  # here: a daemon without tunneling never loads it

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _problems(c: Mapping[str, Any]) -> list[str]:
    t: TunnelingConfig = c["tunneling"]
    out = []
    if t.enabled and not t.services:
        out.append('tunneling.services: empty; add [tunneling.services.SSH] target = "127.0.0.1:22", or disable it')
    for name, svc in t.services.items():
        key = f"tunneling.services.{name}"
        if not SERVICE_ID_RE.fullmatch(name):
            out.append(f"{key}: not a service id (1-128 letters, digits, ':', '_' or '-')")
            continue
        try:
            host, _ = split_target(svc.target)
        except ValueError as e:
            out.append(f"{key}.target: {svc.target!r}: {e}")
            continue
        if not is_loopback(host) and not t.allow_pivot_to_other_hosts:
            out.append(
                f"{key}.target: {host!r} is not a loopback address; a tunnel would reach other hosts through this "
                "device (set tunneling.allow_pivot_to_other_hosts = true only if that is intended)"
            )
    return out


def _files(cfg: Config) -> list[str]:
    """tunneling.ca_file, when tunneling is on and it names its own CA (broker.ca_file is checked anyway)."""
    t: TunnelingConfig = cfg.tunneling
    if not t.enabled or t.ca_file is None:
        return []
    ca = cfg.resolve(t.ca_file)
    problem = certificate_file_problem(ca)
    if problem is None:
        return []
    what = "does not exist" if problem == MISSING_FILE else problem
    return [f"tunneling.ca_file: {ca} {what}; put the tunneling endpoint's root CA (AmazonRootCA1.pem) there"]


SECTIONS = (
    Section(
        "tunneling",
        TunnelingConfig,
        problems=_problems,
        files=_files,
        bounds={
            TunnelingConfig: {
                "port": Bound(1, 65535),
                "max_tunnels": Bound(1, 20),
                "max_connections": Bound(1, 256),
                "buffer_kib": Bound(64, 16 * KIB, "KiB"),
                "lifetime_s": Bound(60, DAY, "s"),
                "reconnect_s": Bound(0, 3600, "s"),
            },
            TunnelService: {"max_connections": Bound(1, 256)},
        },
    ),
)
