"""The inventory capability's config: [inventory], validated here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.base.config import DAY, GIB, WEEK, Bound, Config, Section, order  # noqa: F401


@dataclass(frozen=True)
class InventoryConfig:
    """What the device runs, reported into a named shadow (fleet indexing and dynamic groups query it)."""

    enabled: bool = True
    shadow_name: str = "inventory"
    # AWS IoT Device Management Software Package Catalog: the agent and each update target, with the version
    # installed, in the reserved named shadow `$package` (fleet indexing and dynamic groups query it).
    packages: bool = True
    agent_package: str = "iot-agent"  # the package name the agent itself is reported under


# AWS IoT named shadows: 1-64 of letters, digits, ':', '_' and '-' (no '$': reserved names are AWS's).
SHADOW_NAME_RE = re.compile(r"[A-Za-z0-9:_-]{1,64}")


# Software Package Catalog package names: 1-128 of letters, digits, '-', '_' and '.'.
PACKAGE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _problems(c: Mapping[str, Any]) -> list[str]:
    out = []
    inv = c["inventory"]
    if not SHADOW_NAME_RE.fullmatch(inv.shadow_name):
        out.append(
            f"inventory.shadow_name: {inv.shadow_name!r} is not a shadow name (1-64 letters, digits, ':', '_' or '-')"
        )
    if not PACKAGE_NAME_RE.fullmatch(inv.agent_package):
        out.append(
            f"inventory.agent_package: {inv.agent_package!r} is not a package name (1-128 letters, digits, '.', '_' "
            "or '-')"
        )
    return out


SECTIONS = (Section("inventory", InventoryConfig, problems=_problems),)
