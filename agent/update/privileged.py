"""`iot-agent-install`: the one privileged step of an update, for targets the agent cannot write.

The agent runs unprivileged: it downloads and verifies, then, for a target marked `privileged`,
leaves a request in its spool folder and waits for the answer. This helper runs as root (started by
a systemd path unit when a request appears, see systemd/) and trusts nothing the agent wrote: a
taken-over agent controls the spool, the request and the artifact, and can make this helper do no
more than install a release the vendor signed, into a target root declared, no older than what is
there.

- Its own root-owned config names the targets it may write, its pinned code-signing certificate and
  its limits; a request for anything else is refused.
- What is installed, and as which version, comes from signed bytes: a schema 2 request carries the
  signed release manifest (agent.update.manifest: target, version, name, size, SHA-256), verified here with
  the helper's own pinned certificate; a legacy request (the artifact alone is signed) installs only
  a tar whose signed VERSION and TARGET files say what it is. The request's own words are labels.
- The spool is opened from / one component at a time without following links, every entry relative
  to that folder's descriptor with O_NOFOLLOW and O_NONBLOCK: a symlinked spool, a symlinked, FIFO or
  directory entry is refused, never followed or waited on. The artifact is copied into a root-owned
  folder with its size enforced WHILE copying (a file that keeps growing is cut off and refused),
  then hashed and verified from that private copy.
- Hand-over protocol: `<key>.request.json` is claimed (renamed `<key>.claimed.json`) before any work,
  so the agent can tell a request not yet taken (it may withdraw it) from one being installed. The
  answer `<key>.result.json` is written before the claim and the artifact are removed; the agent,
  once it has recorded the outcome, removes the answer and whatever is left of the claim.
- It installs with the agent's release slots, health check and rollback, behind its own write-ahead
  record per target (`.install.json`): "activating" is undone at the next start (the claimed request
  is then installed again); "committed" holds the answer, which is written out if a cut lost it.

Request: {"job_id", "target", "name", "signature", "manifest"?: base64, "version_label"?: str}
Answer:  {"status": "SUCCEEDED" | "FAILED" | "REJECTED", "reason", "target", "version"}
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from agent.base import durable
from agent.base.machine import Machine, State
from agent.update import install, manifest
from agent.update.versions import VersionError, installed_key, parse_version

log = logging.getLogger("agent.privileged")

DEFAULT_CONFIG = Path("/etc/iot-agent/install.toml")
WAL = ".install.json"
KEY_RE = re.compile(r"[0-9a-f]{8,64}", re.ASCII)
ENTRY_RE = re.compile(r"([0-9a-f]{8,64})\.(request|claimed)\.json", re.ASCII)
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
MAX_REQUEST_BYTES = 16 * 1024


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
    insecure_trust_version_labels: bool = False  # see agent.base.config OtaConfig: same risk, root's own switch


def load_config(path: Path) -> HelperConfig:
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (os.geteuid() == 0 and st.st_uid != 0):
        raise SystemExit(f"iot-agent-install: {path} must be owned by root and writable by root only")
    raw = tomllib.loads(path.read_text())
    known = {
        "code_signing_certificate",
        "spool",
        "targets",
        "max_artifact_bytes",
        "insecure_allow_downgrade",
        "insecure_trust_version_labels",
    }
    unknown = set(raw) - known
    if unknown:
        raise SystemExit(f"iot-agent-install: {path}: unknown key(s) {', '.join(sorted(unknown))}")
    targets = {}
    for name, t in raw.get("targets", {}).items():
        if not manifest.TARGET_RE.fullmatch(name) or not isinstance(t, dict) or "directory" not in t:
            raise SystemExit(f"iot-agent-install: {path}: targets.{name} needs a plain name and a directory")
        targets[name] = Target(
            Path(t["directory"]),
            bool(t.get("unpack", True)),
            list(t.get("health_command", [])),
            float(t.get("health_timeout_s", 60.0)),
        )
    limit = raw.get("max_artifact_bytes", 512 * 1024 * 1024)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= manifest.MAX_ARTIFACT_BYTES:
        raise SystemExit(f"iot-agent-install: {path}: max_artifact_bytes must be 1-{manifest.MAX_ARTIFACT_BYTES}")
    return HelperConfig(
        Path(raw["code_signing_certificate"]),
        Path(raw["spool"]),
        targets,
        limit,
        bool(raw.get("insecure_allow_downgrade", False)),
        bool(raw.get("insecure_trust_version_labels", False)),
    )


# -- the spool, never followed ---------------------------------------------------------------------
def open_spool(path: Path) -> int:
    """A descriptor of the spool folder, reached from / without following any symbolic link."""
    if not path.is_absolute():
        raise SystemExit(f"iot-agent-install: spool {path} must be an absolute path")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.parts[1:]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SystemExit(
                        f"iot-agent-install: {path}: {part!r} is a symbolic link or not a folder; refusing to follow it"
                    ) from None
                raise
            os.close(fd)
            fd = nxt
        if os.fstat(fd).st_mode & stat.S_IWOTH:
            raise SystemExit(f"iot-agent-install: spool {path} is writable by everyone; refusing it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_entry(dir_fd: int, name: str, limit: int) -> int:
    """A regular file of the spool, opened without following a link or blocking on a FIFO."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refusal(f"{name} is a symbolic link; refused") from None
        if e.errno == errno.ENXIO:
            raise Refusal(f"{name} is not a regular file; refused") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refusal(f"{name} is not a regular file; refused")
    if st.st_size > limit:
        os.close(fd)
        raise Refusal(f"{name} is larger than {limit} bytes")
    return fd


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _remove(dir_fd: int, name: str) -> None:
    """Remove a spool entry; one that is not a file (a directory) is renamed out of the path unit's sight."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError):
        os.rename(name, f".{name}.refused", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def _write_result(dir_fd: int, key: str, doc: dict) -> None:
    tmp, final = f".{key}.result.tmp", f"{key}.result.json"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def _copy(dir_fd: int, name: str, dst: Path, limit: int, exact: int | None) -> bytes:
    """Copy at most `limit` bytes (exactly `exact` when the manifest says); the SHA-256 of what was copied."""
    src = _open_entry(dir_fd, name, limit)
    h, total = hashlib.sha256(), 0
    with os.fdopen(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(min(1 << 20, limit + 1 - total)):
            total += len(chunk)
            if total > limit:
                raise Refusal(f"artifact grew past {limit} bytes while it was copied; refused")
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    if exact is not None and total != exact:
        raise Refusal(f"artifact has {total} bytes, the signed manifest says {exact}")
    return h.digest()


# -- one request -------------------------------------------------------------------------------------
def _request(dir_fd: int, key: str, cfg: HelperConfig) -> dict:
    fd = _open_entry(dir_fd, f"{key}.claimed.json", MAX_REQUEST_BYTES)
    with os.fdopen(fd, "rb") as f:
        try:
            req = json.loads(f.read())
        except (ValueError, RecursionError):
            raise Refusal("request is not JSON") from None
    if not isinstance(req, dict):
        raise Refusal("request is not a JSON object")
    if req.get("target") not in cfg.targets:
        raise Refusal(f"target {str(req.get('target'))[:64]!r} is not one this helper may install")
    if not isinstance(req.get("job_id"), str) or not JOB_ID_RE.fullmatch(req["job_id"]):
        raise Refusal("job_id is not a job id")
    for k in ("signature", "manifest"):
        if k in req and (not isinstance(req[k], str) or len(req[k]) > 4096):
            raise Refusal(f"{k} must be base64 text")
    return req


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(f"{what} is not base64") from None


def _check_version(cfg: HelperConfig, t: Target, version: str) -> str | None:
    try:
        key = parse_version(version) + (0,)
    except VersionError as e:
        raise Refusal(str(e)) from None
    if install.slot(t.directory, "broken") == version:
        raise Refusal(f"version {version} failed on this device before")
    current = install.slot(t.directory, "current")
    if current and not cfg.insecure_allow_downgrade:
        try:
            if key <= installed_key(current):
                raise Refusal(f"version {version} is not newer than the installed {current}")
        except VersionError as e:
            raise Refusal(str(e)) from None
    return current


def handle(cfg: HelperConfig, pinned, dir_fd: int, key: str) -> dict:
    """Install the claimed request `key`; returns the answer (also recorded in the target's WAL)."""
    req = _request(dir_fd, key, cfg)
    target = req["target"]
    t = cfg.targets[target]
    sig = _b64(str(req.get("signature", "")), "signature")
    m = None
    if "manifest" in req:
        try:
            m = manifest.verify(pinned, _b64(req["manifest"], "manifest"), sig)
        except manifest.ManifestError as e:
            raise Refusal(str(e)) from None
        if m.target != target:
            raise Refusal(f"the signed manifest is for target {m.target!r}, not {target!r}")
        if m.size > cfg.max_artifact_bytes:
            raise Refusal(f"artifact of {m.size} bytes exceeds the helper's max_artifact_bytes")
        _check_version(cfg, t, m.version)  # before copying anything
    name = m.name if m else req.get("name")
    if not isinstance(name, str) or not manifest.NAME_RE.fullmatch(name):
        raise Refusal("artifact name must be a plain file name")
    t.directory.mkdir(parents=True, exist_ok=True)
    incoming = t.directory / ".incoming"
    durable.remove_tree(incoming)
    incoming.mkdir(mode=0o700)
    copy = incoming / name
    try:
        # A private copy first; every check below is on bytes the agent can no longer change.
        digest = _copy(dir_fd, f"{key}.artifact", copy, cfg.max_artifact_bytes, m.size if m else None)
        inside, inside_target = (None, None)
        if t.unpack:
            from agent.update.ota import Refused, release_labels_in_tar

            try:
                inside, inside_target = release_labels_in_tar(copy)
            except Refused as e:
                raise Refusal(str(e)) from None
        if inside_target is not None and inside_target != target:
            raise Refusal(f"the artifact is a release of {inside_target!r}, not of {target!r}")
        if m:
            if digest.hex() != m.sha256:
                raise Refusal("artifact sha256 does not match the signed manifest")
            if inside is not None and inside != m.version:
                raise Refusal(f"VERSION inside the artifact ({inside}) differs from the signed manifest ({m.version})")
            version = m.version
        else:
            from agent.update.signing import verify_digest

            if not verify_digest(pinned, digest, sig):
                raise Refusal("signature does not verify with the helper's pinned code-signing certificate")
            label = req.get("version_label")
            if inside is not None and (inside_target is not None or cfg.insecure_trust_version_labels):
                version = inside
            elif cfg.insecure_trust_version_labels and isinstance(label, str):
                version = label
            else:
                raise Refusal(
                    "a legacy request binds no version or target: the artifact must be a tar with VERSION "
                    "and TARGET files, or come with a signed manifest"
                )
        current = _check_version(cfg, t, version)
        try:
            release = install.stage(t.directory, version, copy, name, t.unpack)
        except install.InstallError as e:
            raise Refusal(str(e)) from None
        prev = install.slot(t.directory, "previous")
        wal = {
            "key": key,
            "job_id": req["job_id"],
            "target": target,
            "version": version,
            "from_current": current,
            "from_previous": prev,
            "phase": "activating",
        }
        HELPER.move(None, wal["phase"])
        durable.write_json(t.directory / WAL, wal, 0o600)
        install.activate(t.directory, version)
        healthy, reason = install.health_check(t.health_command, release, t.health_timeout_s)
        if healthy:
            result = {"status": "SUCCEEDED", "reason": "installed", "target": target, "version": version}
        else:
            install.restore(t.directory, current, prev, broken=version)
            result = {
                "status": "FAILED",
                "reason": f"rolled back to {current}: {reason}",
                "target": target,
                "version": version,
            }
        HELPER.move(wal["phase"], "committed")
        durable.write_json(t.directory / WAL, {**wal, "phase": "committed", "result": result}, 0o600)
        install.prune(t.directory)
        return result
    finally:
        durable.remove_tree(incoming)


# The hand-over, one request's files in the spool: each state is which files exist, each move a rename or
# a write the module docstring orders. The agent's record (`handed_over`) does not change meanwhile.
HAND_OVER = Machine(
    "privileged hand-over (spool files)",
    State(
        "requested",
        "<key>.artifact and <key>.request.json written by the agent; the path unit starts the helper",
        ("claimed", "withdrawn"),
        "the helper claims it at its next start",
    ),
    State(
        "withdrawn",
        "the agent's deadline passed before a claim: it renamed the request away and fails the job",
        (),
        "the agent removes what is left",
    ),
    State(
        "claimed",
        "the helper renamed the request to <key>.claimed.json and installs (its own record: HELPER)",
        ("answered",),
        "the helper's recover() undoes an unfinished install and installs the claim again",
    ),
    State(
        "answered",
        "<key>.result.json written, then the claim and the artifact removed by the helper",
        (),
        "the agent records the outcome, then removes the claim and then the answer (in that order)",
    ),
    start=("requested",),
    end="the agent recorded the job's outcome and removed the answer",
)

# The helper's own write-ahead record per target (.install.json).
HELPER = Machine(
    "iot-agent-install",
    State(
        "activating",
        "links switched to the new release; the health check runs; failing, the old links are restored",
        ("committed",),
        "the old links are restored and the claimed request installed again",
    ),
    State(
        "committed",
        "the answer is in the record; written out as <key>.result.json if a cut lost it",
        (),
        "writes the answer if missing, removes the claim and the artifact",
    ),
    start=("activating",),
    end="recover() or the next install removes the record",
)


def recover(cfg: HelperConfig, dir_fd: int) -> None:
    """A cut mid-install: "activating" is undone (the claimed request is installed again);
    "committed" gets its answer written out if the cut lost it. A private copy a cut left is dropped."""
    for name, t in cfg.targets.items():
        durable.remove_tree(t.directory / ".incoming")
        path = t.directory / WAL
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        key = rec.get("key") if isinstance(rec, dict) else None
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            durable.remove(path)
            continue
        if rec.get("phase") == "committed" and isinstance(rec.get("result"), dict):
            # The agent takes an answer by removing the claim first, then the answer: an answer that is
            # missing while the claim is still there (checked in that order) was never written.
            if not _exists(dir_fd, f"{key}.result.json") and _exists(dir_fd, f"{key}.claimed.json"):
                _write_result(dir_fd, key, rec["result"])
            _remove(dir_fd, f"{key}.artifact")
            _remove(dir_fd, f"{key}.claimed.json")
        else:
            install.restore(t.directory, rec.get("from_current"), rec.get("from_previous"))
            log.warning("%s: interrupted install of %s undone", name, rec.get("version"))
        install.prune(t.directory)
        durable.remove(path)


def _answer(cfg: HelperConfig, pinned, dir_fd: int, key: str) -> dict:
    try:
        result = handle(cfg, pinned, dir_fd, key)
    except Refusal as e:
        result = {"status": "REJECTED", "reason": str(e)[:500]}
    except OSError as e:
        result = {"status": "FAILED", "reason": f"{e.__class__.__name__}: {e.strerror}"}
    except Exception as e:  # answer anyway: a request left behind would start this unit again and again
        log.exception("request %s failed", key)
        result = {"status": "FAILED", "reason": f"{e.__class__.__name__}: {str(e)[:200]}"}
    _write_result(dir_fd, key, result)
    for t in cfg.targets.values():  # the answer is out: the target's committed record has done its job
        try:
            if json.loads((t.directory / WAL).read_text()).get("key") == key:
                durable.remove(t.directory / WAL)
        except (OSError, ValueError, AttributeError):
            pass
    return result


def process_spool(cfg: HelperConfig) -> int:
    """Answer every pending request (and a claimed one a cut interrupted); returns how many."""
    from agent.update.signing import load_pinned_key

    pinned = load_pinned_key(cfg.code_signing_certificate)
    dir_fd = open_spool(cfg.spool)
    try:
        recover(cfg, dir_fd)
        n = 0
        for entry in sorted(os.listdir(dir_fd)):
            m = ENTRY_RE.fullmatch(entry)
            if not m:
                if entry.endswith((".request.json", ".claimed.json")):  # not a key the agent makes
                    log.warning("spool entry %r refused: not a request name", entry[:80])
                    _remove(dir_fd, entry)
                continue
            key, kind = m.groups()
            if kind == "request" and _exists(dir_fd, f"{key}.claimed.json"):
                _remove(dir_fd, entry)  # already claimed: a repeat
                continue
            if _exists(dir_fd, f"{key}.result.json"):  # answered before a cut: only the clean-up is left
                _remove(dir_fd, entry)
                _remove(dir_fd, f"{key}.artifact")
                continue
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                result = {"status": "REJECTED", "reason": f"{entry} is not a regular file; refused"}
                _write_result(dir_fd, key, result)
                _remove(dir_fd, entry)
                _remove(dir_fd, f"{key}.artifact")
                log.warning("request %s: REJECTED (%s)", key, result["reason"])
                n += 1
                continue
            if kind == "request":
                os.rename(entry, f"{key}.claimed.json", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.fsync(dir_fd)
            result = _answer(cfg, pinned, dir_fd, key)
            _remove(dir_fd, f"{key}.artifact")
            _remove(dir_fd, f"{key}.claimed.json")
            log.info("request %s: %s (%s)", key, result["status"], result["reason"])
            n += 1
        return n
    finally:
        os.close(dir_fd)


def main(argv: list[str] | None = None) -> int:
    from agent.base import killpoints

    killpoints.install()  # a no-op unless a test sweeps kill points
    ap = argparse.ArgumentParser(prog="iot-agent-install", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = ap.parse_args(argv)
    from agent.base.logfmt import basic_config

    basic_config(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    process_spool(load_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
