"""The configuration shadow's own config: [remote_config], validated here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.base.config import DAY, Bound, Section


@dataclass(frozen=True)
class RemoteConfigConfig:
    """The configuration shadow: off unless enabled, because it lets the cloud change how the agent runs."""

    enabled: bool = False
    shadow_name: str = "config"
    confirm_within_s: float = 300.0  # after a change, the cloud must be reached this soon, or it is rolled back


def _problems(c: Mapping[str, Any]) -> list[str]:
    name = c["remote_config"].shadow_name
    if not re.fullmatch(r"[A-Za-z0-9:_-]{1,64}", name):
        return [f"remote_config.shadow_name: {name!r} is not a shadow name (1-64 letters, digits, ':', '_' or '-')"]
    return []


SECTIONS = (
    Section(
        "remote_config",
        RemoteConfigConfig,
        problems=_problems,
        bounds={RemoteConfigConfig: {"confirm_within_s": Bound(10, DAY, "s")}},
    ),
)
