"""The defender capability's config: [defender], validated here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.base.config import DAY, GIB, WEEK, Bound, Config, Section, order  # noqa: F401


@dataclass(frozen=True)
class DefenderConfig:
    """Device Defender device-side metrics."""

    enabled: bool = True
    interval_s: float = 300.0  # AWS throttles more than one report per 300 s
    testing_allow_short_interval: bool = False  # lets tests go below 300 s; never on a real device
    format: str = "json"  # or "cbor"
    names: str = "long"  # or "short"
    max_list: int = 50  # list entries per metric; `total` keeps the full count
    custom_number: dict[str, float] = field(default_factory=dict)
    custom_number_list: dict[str, list[float]] = field(default_factory=dict)
    custom_string_list: dict[str, list[str]] = field(default_factory=dict)
    custom_ip_list: dict[str, list[str]] = field(default_factory=dict)


def _problems(c: Mapping[str, Any]) -> list[str]:
    import ipaddress

    out = []
    d: DefenderConfig = c["defender"]
    if d.interval_s < 300 and not d.testing_allow_short_interval:
        out.append(f"defender.interval_s: {d.interval_s:g} is below AWS's 300 s minimum (reports would be throttled)")
    for name, ips in d.custom_ip_list.items():
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                out.append(f"defender.custom_ip_list.{name}: {ip!r} is not an IP address")
    return out


SECTIONS = (
    Section(
        "defender",
        DefenderConfig,
        problems=_problems,
        choices={"format": ("json", "cbor"), "names": ("long", "short")},
        bounds={
            DefenderConfig: {
                "interval_s": Bound(1, DAY, "s"),
                "max_list": Bound(1, 1000),
                "custom_number": None,
                "custom_number_list": None,
            }
        },
    ),
)
