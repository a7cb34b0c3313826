"""The identity capability's config: [identity], [provisioning] and [rotation], validated here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.config import DAY, GIB, WEEK, Bound, Config, Section, order  # noqa: F401


@dataclass(frozen=True)
class IdentityConfig:
    """How the device gets its identity, and its certificate (public; its key is on the token).

    mode: "claim" (fleet provisioning from a claim certificate; sets provisioning.enabled), "jitp" (a
    certificate the manufacturer's CA issued at the factory, registered by AWS on first contact),
    "preprovisioned" (a certificate already registered). Empty: "claim" if provisioning.enabled, else
    "preprovisioned"."""

    mode: str = ""
    certificate_file: Path | None = None
    jitp_first_refusals: int = 6  # JITP drops the first connection(s) while it registers: not a revocation


@dataclass(frozen=True)
class ProvisioningConfig:
    """Fleet provisioning by claim: used only while the device has no identity of its own."""

    enabled: bool = False  # true on a factory-fresh device that provisions itself
    template_name: str = "iot-agent-fleet"
    claim_certificate: Path = Path("claim.pem")  # public; its key is on the token (relative: in state_dir)
    claim_key_label: str = "claim"
    serial_number: str = ""  # as recorded by the factory step when empty
    parameters: dict[str, str] = field(default_factory=dict)  # extra template parameters
    delete_claim_key: bool = False  # remove the claim key from the token once provisioned
    retry_min_s: float = 30.0  # after a rejection: bounded, jittered backoff
    retry_max_s: float = 3600.0


@dataclass(frozen=True)
class RotationConfig:
    """Certificate rotation: a new key on the token and a new certificate, proven before the old is dropped."""

    enabled: bool = True  # automatic rotation by expiry window and age (jobs and `iot-agent rotate` always work)
    expiry_window_days: float = 30.0
    max_age_days: float = 90.0  # AWS's guidance: rotate device credentials regularly
    check_interval_s: float = 86400.0  # also checked at every start
    template_name: str = "iot-agent-rotation"  # provisioning template that attaches the new certificate
    prove_timeout_s: float = 60.0  # the new certificate must connect within this, or the old one is kept
    retry_min_s: float = 300.0
    retry_max_s: float = 86400.0


def _problems(c: Mapping[str, Any]) -> list[str]:
    out = []
    if c["identity"].mode not in ("", "claim", "jitp", "preprovisioned"):
        out.append(f"identity.mode: {c['identity'].mode!r} is not one of claim, jitp, preprovisioned")
    pv: ProvisioningConfig = c["provisioning"]
    out += order(c, "provisioning", "retry_min_s", "retry_max_s")
    if pv.enabled and pv.claim_key_label == c["pkcs11"].key_label:
        out.append("provisioning.claim_key_label: must differ from pkcs11.key_label (the device key)")
    out += order(c, "rotation", "retry_min_s", "retry_max_s")
    return out


def _files(cfg: Config) -> list[str]:
    cert = cfg.identity.certificate_file
    if cert is not None and not cfg.resolve(cert).is_file():
        return [f"identity.certificate_file: {cfg.resolve(cert)} does not exist; provision the device first"]
    return []


def identity_mode(cfg: Config) -> str:
    """claim, jitp or preprovisioned: identity.mode, or what the older provisioning.enabled switch meant."""
    if cfg.identity.mode:
        return cfg.identity.mode
    return "claim" if cfg.provisioning.enabled else "preprovisioned"


SECTIONS = (
    Section(
        "identity",
        IdentityConfig,
        bounds={IdentityConfig: {"jitp_first_refusals": Bound(0, 100)}},
        problems=_problems,
        files=_files,
    ),
    Section(
        "provisioning",
        ProvisioningConfig,
        bounds={ProvisioningConfig: {"retry_min_s": Bound(0.1, DAY, "s"), "retry_max_s": Bound(0.1, DAY, "s")}},
    ),
    Section(
        "rotation",
        RotationConfig,
        bounds={
            RotationConfig: {
                "expiry_window_days": Bound(0, 3650, "days"),
                "max_age_days": Bound(1, 3650, "days"),
                "check_interval_s": Bound(1, WEEK, "s"),
                "prove_timeout_s": Bound(1, 3600, "s"),
                "retry_min_s": Bound(1, DAY, "s"),
                "retry_max_s": Bound(1, WEEK, "s"),
            }
        },
    ),
)
