"""Configuration by shadow: a named shadow's `desired` state overlays a documented subset of the config file.

Why an overlay and not edits of the file: the file is the operator's (often managed by an image or a
configuration tool) and it decides trust; the overlay is the cloud's, kept apart in the state folder, and
can only reach the keys listed in SETTABLE. Settings that decide trust (the broker, its CA, the token and
PIN, the identity, the code-signing certificate and update targets, what tunnels reach, which local apps
may publish, what commands run) are never settable, and a desired state naming one is refused whole.

Every change is checked by the same validator as the file (the file's TOML with the overlay merged in is
parsed again), written in ONE atomic write together with the overlay it replaces and a deadline, applied
live (features that can, change in place; the others get a new session, a reconnect), and reported in the
shadow. If the agent cannot reach the cloud within `confirm_within_s` after a change, the previous overlay
comes back (the same one-write rule), so a bad change cannot strand a device.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.base import durable
from agent.base.config import Config
from agent.base.digest import sha256
from agent.base.errors import ConfigError
from agent.base.logfmt import escape

log = logging.getLogger("agent.remote_config")

FILE_NAME = "config-overlay.json"
MAX_DESIRED_BYTES = 8 * 1024  # AWS's shadow state limit: desired and reported together

# What the cloud may set, by section. Everything else is refused; TRUST names why for the worst of it.
SETTABLE: dict[str, frozenset[str]] = {
    "defender": frozenset(
        {
            "enabled",
            "interval_s",
            "format",
            "names",
            "max_list",
            "custom_number",
            "custom_number_list",
            "custom_string_list",
            "custom_ip_list",
            "destinations",
            "topic",
        }
    ),
    "log": frozenset({"level"}),
    "inventory": frozenset({"enabled"}),
    "tunneling": frozenset({"max_tunnels", "max_connections", "lifetime_s"}),
    "local_messaging": frozenset(
        {"spool_max_mib", "spool_max_messages", "spool_max_age_s", "when_full", "max_message_kib", "max_clients"}
    ),
}
TRUST: dict[str, str] = {
    "broker": "the endpoint, its CA and the connection decide whom the device trusts",
    "pkcs11": "the token, key and PIN are the device's identity",
    "device": "the thing name and state folder are the device's identity",
    "clock": "a trustworthy clock guards every certificate check",
    "identity": "how the device gets its identity",
    "provisioning": "how the device gets its identity",
    "rotation": "the device's certificate",
    "ota": "the code-signing certificate and the update targets decide what runs",
    "commands": "what the cloud may run on the device",
    "remote_config": "what the cloud may change",
    "jobs": "jobs install updates and rotate certificates: only the file turns them on or off",
    "tunneling.enabled": "a tunnel is a way into the device: only the file turns it on",
    "tunneling.services": "which ports a tunnel reaches",
    "tunneling.allow_pivot_to_other_hosts": "whether a tunnel reaches the LAN",
    "tunneling.endpoint": "where tunnels connect",
    "tunneling.ca_file": "which CA tunnels trust",
    "local_messaging.apps": "which local apps may publish as the device",
    "local_messaging.socket": "who can reach the local endpoint",
    "local_messaging.socket_group": "who can reach the local endpoint",
}


# -- the pure part ------------------------------------------------------------------------------------------
def digest(doc: Any) -> str:
    return sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def refusals(desired: Any) -> list[str]:
    """Why a desired state cannot be an overlay at all (shape, size, unsettable keys); [] when it can."""
    if desired is None:
        return []
    if not isinstance(desired, dict):
        return ['desired must be an object of sections, e.g. {"defender": {"interval_s": 600}}']
    if len(json.dumps(desired)) > MAX_DESIRED_BYTES:
        return [f"desired is larger than {MAX_DESIRED_BYTES} bytes"]
    out = []
    for section, table in sorted(desired.items(), key=lambda kv: str(kv[0])):
        name = escape(str(section), 64)
        if section in TRUST:
            out.append(f"{name}: decides trust ({TRUST[section]}); it can never be set from the cloud")
            continue
        if section not in SETTABLE:
            out.append(f"{name}: not a section the cloud may set (settable: {', '.join(sorted(SETTABLE))})")
            continue
        if not isinstance(table, dict):
            out.append(f"{name}: must be an object of settings")
            continue
        for key in sorted(table, key=str):
            full = f"{section}.{key}"
            if full in TRUST:
                out.append(f"{escape(full, 100)}: decides trust ({TRUST[full]}); it can never be set from the cloud")
            elif key not in SETTABLE[section]:
                out.append(
                    f"{escape(full, 100)}: not settable from the cloud (in [{section}]: "
                    f"{', '.join(sorted(SETTABLE[section]))})"
                )
    return out


def merged(data: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """The file's TOML with the overlay's keys set over it (one level deep: a section's key is replaced)."""
    out = copy.deepcopy(dict(data))
    for section, table in overlay.items():
        base = dict(out.get(section) or {})
        base.update(copy.deepcopy(table))
        out[section] = base
    return out


def effective(file_cfg: Config, overlay: Mapping[str, Any], parse: Callable[..., Config]) -> Config:
    """The config with the overlay applied, through the same validation as the file (ConfigError lines
    name the problems, `remote:` instead of the file's path)."""
    if not overlay:
        return file_cfg
    try:
        cfg = parse(merged(file_cfg.data, overlay), None)
    except ConfigError as e:
        raise ConfigError([f"remote: {line}" for line in e.problems]) from None
    # Relative paths keep resolving against the file's folder; the data stays the file's own.
    return dataclasses.replace(cfg, path=file_cfg.path, data=file_cfg.data)


def check(file_cfg: Config, desired: Any, parse: Callable[..., Config]) -> tuple[dict, Config] | list[str]:
    """(overlay, the config it makes) or the reasons it is refused."""
    problems = refusals(desired)
    if problems:
        return problems
    overlay = dict(desired or {})
    try:
        return overlay, effective(file_cfg, overlay, parse)
    except ConfigError as e:
        return list(e.problems)


# -- the record ----------------------------------------------------------------------------------------------
class OverlayStore:
    """state/config-overlay.json: the overlay in force, what it replaced and until when it must prove itself,
    and the digest of the last desired state handled. Each change is one atomic write."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()

    def load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("configuration shadow: %s unreadable (%s); the config file alone applies", self.path, e)
            return {}
        return doc if isinstance(doc, dict) else {}

    def save(self, record: dict[str, Any]) -> None:
        with self._lock:
            durable.write_json(self.path, record, 0o600)


def session_config(file_cfg: Config, state_dir: Path, parse: Callable[..., Config], first: bool = False) -> Config:
    """The config a session runs with: the file's, with the overlay in force when it still validates (derived
    from the record every time, so a change or a rollback takes effect at the next session). At the start of
    the process (`first`), a change still on probation gets a fresh deadline: the power cut that
    interrupted it is not its fault."""
    store = OverlayStore(state_dir)
    record = store.load()
    overlay = record.get("overlay") or {}
    if not overlay:
        return file_cfg
    result = check(file_cfg, overlay, parse)
    if isinstance(result, list):
        log.error(
            "configuration shadow: the overlay in %s no longer validates (%s); the config file alone applies",
            store.path,
            "; ".join(result)[:500],
        )
        return file_cfg
    if first and record.get("pending"):
        record["confirm_by"] = time.time() + file_cfg.remote_config.confirm_within_s
        store.save(record)
    if first:
        log.info("configuration shadow: overlay %s applies", json.dumps(overlay, sort_keys=True)[:300])
    return result[1]


class Guard:
    """Rolls back a change after which the cloud has not taken a report in time: the daemon ticks it."""

    def __init__(self, state_dir: Path, on_rollback: Callable[[], None]) -> None:
        self.store = OverlayStore(state_dir)
        self.on_rollback = on_rollback
        self._checked = 0.0

    def tick(self) -> None:
        now = time.time()
        if now - self._checked < 1.0:
            return
        self._checked = now
        record = self.store.load()
        if not record.get("pending"):
            return
        # Confirmed means the cloud took the report of the change (the feature clears `pending` then): a
        # connection that cannot even report is no better than none.
        if now >= float(record.get("confirm_by") or 0):
            previous = record.get("previous") or {}
            log.error(
                "configuration shadow: the cloud has not taken a report since the change to %s; rolling back to %s",
                json.dumps(record.get("overlay"), sort_keys=True)[:300],
                json.dumps(previous, sort_keys=True)[:300],
            )
            self.store.save(
                {
                    "overlay": previous,
                    "digest": record.get("digest"),  # not applied again from the same desired state
                    "status": {
                        "result": "rolled back",
                        "desired_version": (record.get("status") or {}).get("desired_version"),
                        "reasons": ["no report reached the cloud within remote_config.confirm_within_s of the change"],
                        "at": int(now),
                    },
                }
            )
            self.on_rollback()
