"""The jobs capability's config: [jobs]."""

from __future__ import annotations

from dataclasses import dataclass

from agent.base.config import DAY, GIB, WEEK, Bound, Config, Section, order  # noqa: F401


@dataclass(frozen=True)
class JobsConfig:
    """AWS IoT Jobs: the agent takes the next pending job on connect and on notify-next."""

    enabled: bool = True


SECTIONS = (Section("jobs", JobsConfig),)
