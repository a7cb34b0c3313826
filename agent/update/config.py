"""The update capability's config: [ota] and its [ota.targets.NAME] tables, validated here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.config import DAY, GIB, NAME_RE, REQUIRED, WEEK, Bound, Config, Section, order, toml_key  # noqa: F401
from agent.base.pemfile import certificate_file_problem


@dataclass(frozen=True)
class OtaTargetConfig:
    """Something the agent may update: its releases live in `directory` (releases/, current, previous, broken)."""

    directory: Path = REQUIRED
    unpack: bool = True  # the artifact is a tar archive extracted into the release; false: one file, kept as is
    health_command: list[str] = field(default_factory=list)  # run in the new release; exit 0 means healthy
    health_timeout_s: float = 60.0
    self_update: bool = False  # this target is the agent itself: restart into it, confirm after reconnecting
    afr_ota_filepath: str = ""  # afr_ota documents whose file has this filepath install here
    # Installed by the root helper iot-agent-install (which re-verifies everything) instead of the agent:
    # for directories the unprivileged agent must not write. Its health check is the helper's.
    privileged: bool = False


@dataclass(frozen=True)
class OtaConfig:
    """Signed updates. Nothing is installed unless it verifies against the pinned code-signing certificate."""

    code_signing_certificate: Path | None = None  # required when any target is declared
    ca_file: Path | None = None  # CA for HTTPS downloads; the system's trust store when unset
    max_artifact_bytes: int = 512 * 1024 * 1024
    insecure_allow_downgrade: bool = False  # lets an older version replace a newer one (re-opens fixed holes)
    # Legacy documents (schema 1, afr_ota) sign the artifact only: without VERSION and TARGET files inside a
    # signed tar, nothing binds what it installs as. True trusts the document's labels instead: a relabelled
    # old release can then install as "newer" (a downgrade) or into another target.
    insecure_trust_version_labels: bool = False
    download_attempts: int = 5  # per job, per agent run; a partial download resumes where it stopped
    self_update_deadline_s: float = 300.0  # the new agent must reconnect and confirm within this, or rolls back
    privileged_timeout_s: float = 600.0  # how long to wait for iot-agent-install to answer a request
    targets: dict[str, OtaTargetConfig] = field(default_factory=dict)


def _problems(c: Mapping[str, Any]) -> list[str]:
    out = []
    o: OtaConfig = c["ota"]
    if o.targets and o.code_signing_certificate is None:
        out.append(
            "ota.code_signing_certificate: required when update targets are declared (updates are "
            "verified against it; nothing else is trusted)"
        )
    for raw_name, t in o.targets.items():
        if t is None:
            continue
        name = toml_key(raw_name)
        if not NAME_RE.fullmatch(raw_name):  # not match(): "$" would accept a trailing newline
            out.append(f"ota.targets.{name}: target names are letters, digits, '.', '_' and '-'")
        if t.self_update and t.privileged:
            out.append(f"ota.targets.{name}: the agent itself is not a privileged target (it updates its own release)")
        if t.self_update and not t.unpack:
            out.append(f"ota.targets.{name}: a self-update target must be unpacked (a tar of the agent package)")
    if len([t for t in o.targets.values() if t and t.self_update]) > 1:
        out.append("ota.targets: at most one target can be the agent itself (self_update = true)")
    return out


def _files(cfg: Config) -> list[str]:
    out = []
    if cfg.ota.ca_file is not None:
        oca = cfg.resolve(cfg.ota.ca_file)
        problem = certificate_file_problem(oca)
        if problem:
            out.append(
                f"ota.ca_file: {oca} {problem}; point it at the PEM CA bundle of your download host, or "
                "remove it to use the system's trust store"
            )
    if cfg.ota.code_signing_certificate is not None:
        cs = cfg.resolve(cfg.ota.code_signing_certificate)
        if not cs.is_file():
            out.append(
                f"ota.code_signing_certificate: {cs} does not exist; install the code-signing certificate "
                "that signs your updates"
            )
    return out


SECTIONS = (
    Section(
        "ota",
        OtaConfig,
        problems=_problems,
        files=_files,
        bounds={
            OtaConfig: {
                "max_artifact_bytes": Bound(1, 2 * GIB, "bytes"),
                "download_attempts": Bound(1, 100),
                "self_update_deadline_s": Bound(10, 3600, "s"),
                "privileged_timeout_s": Bound(1, 3600, "s"),
            },
            OtaTargetConfig: {"health_timeout_s": Bound(1, 3600, "s")},
        },
    ),
)
