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


# AWS IoT named shadows: 1-64 of letters, digits, ':', '_' and '-' (no '$': reserved names are AWS's).
SHADOW_NAME_RE = re.compile(r"[A-Za-z0-9:_-]{1,64}")


def _problems(c: Mapping[str, Any]) -> list[str]:
    name = c["inventory"].shadow_name
    if not SHADOW_NAME_RE.fullmatch(name):
        return [f"inventory.shadow_name: {name!r} is not a shadow name (1-64 letters, digits, ':', '_' or '-')"]
    return []


SECTIONS = (Section("inventory", InventoryConfig, problems=_problems),)
