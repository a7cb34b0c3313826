"""The commands capability's config: [commands] and its handlers, validated here.

Off by default: a device that runs what the cloud asks is a remote-execution surface, so the operator
opts in and names every action; nothing else runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.base.config import DAY, REQUIRED, Bound, Config, Section

# The agent's own actions (agent.commands.builtin); an operator handler may not take their names.
BUILTINS = ("report-status", "rotate-certificate", "restart-agent")
ACTION_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class HandlerConfig:
    """An operator's command: an executable run with the request's parameters as JSON on stdin."""

    command: list[str] = REQUIRED  # argv; the first is the absolute path of the executable (no shell)
    user: str = ""  # run as this user (and its primary group); "" = the agent's own user
    timeout_s: float = 60.0  # then the whole process group is killed and the execution is TIMED_OUT
    max_output_kib: int = 16  # stdout+stderr kept for the result; the rest is read and dropped
    description: str = ""


@dataclass(frozen=True)
class CommandsConfig:
    """AWS IoT Device Management Commands: which actions the cloud may ask this device to run."""

    enabled: bool = False
    builtin: list[str] = field(default_factory=lambda: ["report-status"])
    handlers: dict[str, HandlerConfig] = field(default_factory=dict)
    max_request_kib: int = 32  # a request payload larger than this is REJECTED unread
    max_pending: int = 8  # requests waiting behind the running one; more are REJECTED (BUSY)
    history: int = 1000  # execution ids remembered, so that each runs at most once


def _problems(c: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    cc: CommandsConfig = c["commands"]
    for name in cc.builtin:
        if name not in BUILTINS:
            out.append(f"commands.builtin: {name!r} is not a built-in action (known: {', '.join(BUILTINS)})")
    if len(set(cc.builtin)) != len(cc.builtin):
        out.append("commands.builtin: an action is listed twice")
    for name, h in cc.handlers.items():
        key = f"commands.handlers.{name}"
        if not ACTION_RE.fullmatch(name):
            out.append(f"{key}: a handler name is 1-64 of a-z, 0-9, '.', '_', '-' (starting with a letter or digit)")
        if name in BUILTINS:
            out.append(f"{key}: {name!r} is a built-in action's name; choose another")
        if not h.command or not h.command[0].startswith("/"):
            out.append(f"{key}.command: the first item must be the executable's absolute path (no shell is used)")
        if any("\0" in a for a in h.command):
            out.append(f"{key}.command: an argument contains a NUL character")
    return out


def _files(cfg: Config) -> list[str]:
    """The executables exist and the users can be switched to: found before `run`, not at the first request."""
    import pwd

    out: list[str] = []
    cc: CommandsConfig = cfg.commands
    if not cc.enabled:
        return out
    for name, h in cc.handlers.items():
        key = f"commands.handlers.{name}"
        exe = h.command[0]
        if not os.path.isfile(exe) or not os.access(exe, os.X_OK):
            out.append(f"{key}.command: {exe} is not an executable file")
        if h.user:
            try:
                pw = pwd.getpwnam(h.user)
            except KeyError:
                out.append(f"{key}.user: no user {h.user!r} on this system")
                continue
            if pw.pw_uid != os.geteuid() and os.geteuid() != 0:
                out.append(
                    f"{key}.user: the agent runs as uid {os.geteuid()} and cannot switch to {h.user!r}; "
                    "leave user empty (the agent's own user) or give the handler a sudo rule of its own"
                )
    return out


SECTIONS = (
    Section(
        "commands",
        CommandsConfig,
        problems=_problems,
        files=_files,
        bounds={
            CommandsConfig: {
                "max_request_kib": Bound(1, 128, "KiB", "AWS IoT's MQTT payload limit is 128 KiB"),
                "max_pending": Bound(0, 1000),
                "history": Bound(16, 100000),
            },
            HandlerConfig: {
                "timeout_s": Bound(0.1, DAY, "s"),
                "max_output_kib": Bound(0, 64, "KiB", "the whole response must stay well under 128 KiB"),
            },
        },
    ),
)
