"""The registry: every capability the agent has, in start order, and the config they make up together.

A new capability is a package with a `config.py` (its sections, validated there) and a `feature.py`
(its FeatureSpec), listed here once. The jobs feature comes last: it serves the job operations the
features before it registered in the session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.base import config as base
from agent.base.config import Bound, Config, Section
from agent.commands.feature import FEATURE as COMMANDS
from agent.defender.feature import FEATURE as DEFENDER
from agent.identity.feature import FEATURE as ROTATION
from agent.inventory.feature import FEATURE as INVENTORY
from agent.jobs.feature import FEATURE as JOBS
from agent.local_messaging.feature import FEATURE as LOCAL_MESSAGING
from agent.runtime.remote_config.feature import FEATURE as REMOTE_CONFIG
from agent.session.feature import FeatureSpec
from agent.tunneling.feature import FEATURE as TUNNELING
from agent.update.feature import FEATURE as UPDATE

FEATURES: tuple[FeatureSpec, ...] = (
    ROTATION,
    UPDATE,
    DEFENDER,
    INVENTORY,
    TUNNELING,
    LOCAL_MESSAGING,
    COMMANDS,
    REMOTE_CONFIG,
    JOBS,
)

# Every section of the config file: the shared ones, then each capability's.
SECTIONS: tuple[Section, ...] = base.SHARED + tuple(s for f in FEATURES for s in f.sections)
SECTION_CLASSES: dict[str, type] = {s.name: s.cls for s in SECTIONS}
BOUNDS: dict[type, Any] = {cls: b for s in SECTIONS for cls, b in s.bounds.items()}
_FEATURE_SECTIONS = tuple(s for f in FEATURES for s in f.sections)


def parse(data: dict[str, Any], path: Path | None = None) -> Config:
    return base.parse(data, path, _FEATURE_SECTIONS)


def load(path: Path | str | None = None) -> Config:
    return base.load(path, _FEATURE_SECTIONS)


def check_files(cfg: Config) -> list[str]:
    """Problems with the files the config names, one line each (every section's own check)."""
    return [p for s in SECTIONS if s.files for p in s.files(cfg)]


def enabled(cfg: Config) -> list[FeatureSpec]:
    return [f for f in FEATURES if f.enabled(cfg)]


__all__ = ["BOUNDS", "FEATURES", "SECTIONS", "SECTION_CLASSES", "Bound", "check_files", "enabled", "load", "parse"]
