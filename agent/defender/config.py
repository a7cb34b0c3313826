"""The defender capability's config: [defender], validated here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.base.config import DAY, GIB, WEEK, Bound, Config, Section, order  # noqa: F401

# Where a report goes: AWS IoT Device Defender Detect's reserved topic, and/or a topic of the user's own
# (an IoT rule takes it on to CloudWatch or Timestream: Detect takes no new customers from 2026-08-31).
DESTINATIONS = ("defender", "topic")
THING_PLACEHOLDER = "${thing}"
# AWS IoT Core's limits on a topic name a device publishes to (its quotas page).
TOPIC_MAX_BYTES = 256
TOPIC_MAX_SLASHES = 7
THING_NAME_MAX_BYTES = 128  # the longest thing name: a topic template must fit with it


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
    # "defender": Detect's $aws/things/<thing>/defender/metrics/<format>; "topic": `topic` below (same document)
    destinations: list[str] = field(default_factory=lambda: ["defender"])
    topic: str = "dt/${thing}/metrics"  # ${thing} is the thing name; the device policy allows dt/<thing>/*

    def metrics_topic(self, thing: str) -> str:
        """The `topic` destination for this thing."""
        return self.topic.replace(THING_PLACEHOLDER, thing)


def topic_problem(template: str) -> str | None:
    """Why `template` cannot be the topic a device publishes its metrics to (AWS IoT Core's rules for a
    topic name), or None. Checked with the longest thing name, so any thing can use it."""
    if not template:
        return 'is empty; set a topic such as "dt/${thing}/metrics"'
    rest = template.replace(THING_PLACEHOLDER, "")
    if "${" in rest:
        return f"{template!r}: only ${{thing}} is replaced (by the thing name); remove the other ${{...}}"
    if "\0" in template:
        return f"{template!r}: contains a NUL character, which a topic name may not"
    if "+" in template or "#" in template:
        return f"{template!r}: contains a wildcard (+ or #); a topic to publish to names one topic"
    if template.startswith("$aws/"):
        return f"{template!r}: $aws/ topics are reserved by AWS IoT; use one of your own, such as dt/${{thing}}/metrics"
    if template.startswith("$") and not template.startswith(THING_PLACEHOLDER):
        return (
            f"{template!r}: topics starting with $ are reserved for the broker; use one such as dt/${{thing}}/metrics"
        )
    longest = template.replace(THING_PLACEHOLDER, "x" * THING_NAME_MAX_BYTES)
    try:
        size = len(longest.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{template!r}: not valid UTF-8 text"
    if size > TOPIC_MAX_BYTES:
        return (
            f"{template!r}: {size} bytes with a {THING_NAME_MAX_BYTES}-character thing name; "
            f"AWS IoT allows {TOPIC_MAX_BYTES}"
        )
    if template.count("/") > TOPIC_MAX_SLASHES:
        return f"{template!r}: {template.count('/')} slashes; AWS IoT allows at most {TOPIC_MAX_SLASHES}"
    return None


def destinations_problems(destinations: list[str]) -> list[str]:
    """One line per problem with the destinations list (none when it is a set of known destinations)."""
    if not destinations:
        return [
            f"defender.destinations: empty; list {' and/or '.join(map(repr, DESTINATIONS))} "
            "(set defender.enabled = false to stop reporting)"
        ]
    out, seen = [], set()
    for d in destinations:
        if d not in DESTINATIONS:
            out.append(f"defender.destinations: {d!r} is not a destination (known: {', '.join(DESTINATIONS)})")
        elif d in seen:
            out.append(f"defender.destinations: {d!r} is listed twice; list each destination once")
        seen.add(d)
    return out


def _problems(c: Mapping[str, Any]) -> list[str]:
    import ipaddress

    out = []
    d: DefenderConfig = c["defender"]
    # Detect's throttle is the reason for the minimum: a device that reports to its own topic only may go faster.
    if d.interval_s < 300 and not d.testing_allow_short_interval and "defender" in d.destinations:
        out.append(f"defender.interval_s: {d.interval_s:g} is below AWS's 300 s minimum (reports would be throttled)")
    for name, ips in d.custom_ip_list.items():
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                out.append(f"defender.custom_ip_list.{name}: {ip!r} is not an IP address")
    out += destinations_problems(d.destinations)
    problem = topic_problem(d.topic)
    if problem:
        out.append(f"defender.topic: {problem}")
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
