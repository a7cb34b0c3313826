"""Which identity the device connects with: what provisioning recorded in the state, else the config's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.base.config import Config
from agent.base.errors import AgentError


@dataclass(frozen=True, eq=False)
class Identity:
    thing_name: str
    certificate_file: Path
    key_label: str


def current_identity(cfg: Config, state: dict) -> Identity:
    thing = state.get("thing_name") or cfg.device.thing_name
    cert = state.get("certificate_file") or (
        str(cfg.resolve(cfg.identity.certificate_file)) if cfg.identity.certificate_file else None
    )
    key_label = state.get("key_label") or cfg.pkcs11.key_label
    if not thing or not cert:
        raise AgentError(
            "no device identity yet: set device.thing_name and identity.certificate_file for a pre-provisioned "
            "device, or provision it by claim"
        )
    if not Path(cert).is_file():
        raise AgentError(f"{cert}: device certificate not found; restore it or provision the device again")
    return Identity(thing, Path(cert), key_label)


def has_identity(cfg: Config, state: dict) -> bool:
    return bool(
        (state.get("thing_name") or cfg.device.thing_name)
        and (state.get("certificate_file") or cfg.identity.certificate_file)
    )
