"""`iot-agent-install`: the one privileged step of an update, for targets the agent cannot write.

The agent runs unprivileged: it downloads and verifies, then, for a target marked `privileged`,
leaves a request in its spool folder and waits for the answer. This helper runs as root (started by
a systemd path unit when a request appears, see systemd/), trusts nothing the agent wrote:

- its own root-owned config names the targets it may write and its own pinned code-signing
  certificate; a request for anything else is refused;
- it copies the artifact out of the spool into a root-owned folder (no symlinks followed, size
  bounded), re-computes the SHA-256 and re-verifies the signature from that private copy, so an
  agent that was taken over cannot get an unsigned file installed, nor swap it after the check;
- it enforces the version rule itself (never older than `current` unless its own config allows);
- it installs with the same atomic slots, health check and rollback as the agent, with its own
  write-ahead record so a power cut mid-switch is undone on its next start.

Request (`<key>.request.json` beside `<key>.artifact` in the spool):
    {"job_id", "target", "version", "name", "sha256", "signature"}   (signature: base64 DER)
Answer (`<key>.result.json`): {"status": "SUCCEEDED" | "FAILED" | "REJECTED", "reason", "version"}
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import install
from .otadoc import NAME_RE, VERSION_RE, version_key
from .signing import load_pinned_key, verify_digest

log = logging.getLogger("agent.privileged")

DEFAULT_CONFIG = Path("/etc/iot-agent/install.toml")
WAL = ".install.json"
KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")


class Refusal(Exception):
    pass


@dataclass(frozen=True)
class Target:
    directory: Path
    unpack: bool = True
    health_command: list[str] = field(default_factory=list)
    health_timeout_s: float = 60.0


@dataclass(frozen=True)
class HelperConfig:
    code_signing_certificate: Path
    spool: Path
    targets: dict[str, Target]
    max_artifact_bytes: int = 512 * 1024 * 1024
    insecure_allow_downgrade: bool = False


def load_config(path: Path) -> HelperConfig:
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (os.geteuid() == 0 and st.st_uid != 0):
        raise SystemExit(f"iot-agent-install: {path} must be owned by root and writable by root only")
    raw = tomllib.loads(path.read_text())
    known = {"code_signing_certificate", "spool", "targets", "max_artifact_bytes", "insecure_allow_downgrade"}
    unknown = set(raw) - known
    if unknown:
        raise SystemExit(f"iot-agent-install: {path}: unknown key(s) {', '.join(sorted(unknown))}")
    targets = {}
    for name, t in raw.get("targets", {}).items():
        if not NAME_RE.match(name) or not isinstance(t, dict) or "directory" not in t:
            raise SystemExit(f"iot-agent-install: {path}: targets.{name} needs a plain name and a directory")
        targets[name] = Target(Path(t["directory"]), bool(t.get("unpack", True)), list(t.get("health_command", [])),
                               float(t.get("health_timeout_s", 60.0)))
    return HelperConfig(Path(raw["code_signing_certificate"]), Path(raw["spool"]), targets,
                        int(raw.get("max_artifact_bytes", 512 * 1024 * 1024)),
                        bool(raw.get("insecure_allow_downgrade", False)))


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_spool_file(path: Path, limit: int) -> int:
    """An fd for a regular spool file (no symlink), checked against the size limit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refusal(f"{path.name} is a symbolic link; refused")
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        raise Refusal(f"{path.name}: not a regular file within the size limit")
    return fd


def recover(cfg: HelperConfig) -> None:
    """Undo a switch a power cut interrupted (the write-ahead record is still there)."""
    for name, t in cfg.targets.items():
        wal = t.directory / WAL
        try:
            rec = json.loads(wal.read_text())
        except (OSError, ValueError):
            continue
        install.restore(t.directory, rec.get("from_current"), rec.get("from_previous"))
        install.prune(t.directory)
        wal.unlink()
        log.warning("%s: interrupted install of %s undone", name, rec.get("version"))


def handle(cfg: HelperConfig, pinned, key: str) -> dict:
    spool = cfg.spool
    fd = _read_spool_file(spool / f"{key}.request.json", 16 * 1024)
    with os.fdopen(fd, "rb") as f:
        try:
            req = json.loads(f.read())
        except ValueError:
            raise Refusal("request is not JSON")
    if not isinstance(req, dict):
        raise Refusal("request is not a JSON object")
    target, version, name = req.get("target"), req.get("version"), req.get("name")
    if target not in cfg.targets:
        raise Refusal(f"target {target!r} is not one this helper may install")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise Refusal("version must be dotted numbers")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Refusal("artifact name must be a plain file name")
    try:
        sig = base64.b64decode(str(req.get("signature")), validate=True)
    except ValueError:
        raise Refusal("signature is not base64")
    t = cfg.targets[target]
    t.directory.mkdir(parents=True, exist_ok=True)
    current = install.slot(t.directory, "current")
    if current and not cfg.insecure_allow_downgrade and version_key(version) <= version_key(current):
        raise Refusal(f"version {version} is not newer than the installed {current}")
    if install.slot(t.directory, "broken") == version:
        raise Refusal(f"version {version} failed on this device before")
    # A private copy first; every check below is on bytes the agent can no longer change.
    incoming = t.directory / ".incoming"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(mode=0o700)
    copy = incoming / name
    h = hashlib.sha256()
    src = _read_spool_file(spool / f"{key}.artifact", cfg.max_artifact_bytes)
    with os.fdopen(src, "rb") as fin, open(copy, "wb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
    digest = h.digest()
    try:
        if not verify_digest(pinned, digest, sig):
            raise Refusal("signature does not verify with the helper's pinned code-signing certificate")
        if t.unpack:
            from .ota import Refused, version_in_tar

            try:
                inside = version_in_tar(copy)
            except Refused as e:
                raise Refusal(str(e))
            if inside is not None and inside != version:
                raise Refusal(f"VERSION inside the artifact ({inside}) differs from the request ({version})")
        try:
            release = install.stage(t.directory, version, copy, name, t.unpack)
        except install.InstallError as e:
            raise Refusal(str(e))
        _write_json(t.directory / WAL, {"version": version, "from_current": current,
                                        "from_previous": install.slot(t.directory, "previous")})
        prev = install.slot(t.directory, "previous")
        install.activate(t.directory, version)
        healthy, reason = install.health_check(t.health_command, release, t.health_timeout_s)
        if not healthy:
            install.restore(t.directory, current, prev, broken=version)
            install.prune(t.directory)
            (t.directory / WAL).unlink(missing_ok=True)
            return {"status": "FAILED", "reason": f"rolled back to {current}: {reason}", "version": version}
        install.prune(t.directory)
        (t.directory / WAL).unlink(missing_ok=True)
        return {"status": "SUCCEEDED", "reason": "installed", "version": version}
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def process_spool(cfg: HelperConfig) -> int:
    """Answer every pending request; returns how many were handled."""
    pinned = load_pinned_key(cfg.code_signing_certificate)
    recover(cfg)
    n = 0
    for req in sorted(cfg.spool.glob("*.request.json")):
        key = req.name[: -len(".request.json")]
        if not KEY_RE.match(key):
            req.unlink(missing_ok=True)
            continue
        try:
            result = handle(cfg, pinned, key)
        except Refusal as e:
            result = {"status": "REJECTED", "reason": str(e)}
        except OSError as e:
            result = {"status": "FAILED", "reason": f"{e.__class__.__name__}: {e.strerror}"}
        except Exception as e:  # answer anyway: a request left behind would start this unit again and again
            log.exception("request %s failed", key)
            result = {"status": "FAILED", "reason": f"{e.__class__.__name__}: {str(e)[:200]}"}
        log.info("request %s: %s (%s)", key, result["status"], result["reason"])
        _write_json(cfg.spool / f"{key}.result.json", result)
        (cfg.spool / f"{key}.artifact").unlink(missing_ok=True)
        req.unlink(missing_ok=True)
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    from . import killpoints

    killpoints.install()  # a no-op unless a test sweeps kill points
    ap = argparse.ArgumentParser(prog="iot-agent-install", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = ap.parse_args(argv)
    from .logfmt import basic_config  # one record, one bounded line

    basic_config(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    process_spool(load_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
