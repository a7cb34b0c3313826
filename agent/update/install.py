"""Release slots for an update target, in the style of Greengrass's alts directories.

    <target>/releases/<version>/   staged contents (a file, or an extracted tar)
    <target>/current  -> releases/<version>   what runs
    <target>/previous -> releases/<version>   what to return to
    <target>/broken   -> releases/<version>   what failed its health check (never retried)

Every switch is a symlink written beside the old one and renamed over it (atomic on POSIX), then
the folder is fsync'd, so a power cut leaves either the old or the new link, never neither.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.base import durable
from agent.base.durable import fsync_dir as _fsync_dir
from agent.base.errors import AgentError


class InstallError(AgentError):
    pass


def _link(target_dir: Path, name: str, release: str | None) -> None:
    durable.symlink(target_dir / name, Path("releases") / release if release else None)


def slot(target_dir: Path, name: str) -> str | None:
    """The release a slot points at (its version), or None."""
    try:
        return os.readlink(target_dir / name).rsplit("/", 1)[-1]
    except OSError:
        return None


def stage(target_dir: Path, version: str, artifact: Path, name: str, unpack: bool) -> Path:
    """Put a verified artifact into releases/<version>, atomically (staging folder, then rename)."""
    releases = target_dir / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    final = releases / version
    if final.exists():
        if slot(target_dir, "current") == version:
            raise InstallError(f"version {version} is already installed")
        durable.remove_tree(final)  # a leftover from an interrupted install: stage it again
    staging = releases / f".{version}.staging"
    durable.remove_tree(staging)
    staging.mkdir()
    try:
        if unpack:
            import tarfile  # only when a tar is installed (about 1 MiB resident)

            try:
                with tarfile.open(artifact) as tar:
                    for m in tar.getmembers():  # refuse a suspicious archive outright rather than repair it
                        parts = m.name.replace("\\", "/").split("/")
                        if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                            raise InstallError(f"artifact is not a safe tar archive: member {m.name!r}")
                    if hasattr(tarfile, "data_filter"):
                        # Second guard: the "data" filter refuses absolute paths, '..', links and devices.
                        tar.extractall(staging, filter="data")
                    else:  # Python < 3.11.4 (Debian bookworm's 3.11.2): the checks above are the guard
                        for m in tar.getmembers():
                            m.mode = (m.mode & 0o755) | (0o600 if m.isfile() else 0o700)
                            m.uid = m.gid = 0
                            m.uname = m.gname = ""
                            tar.extract(m, staging, set_attrs=m.isfile())
            except (tarfile.TarError, OSError) as e:
                raise InstallError(f"artifact is not a safe tar archive: {e}") from None
        else:
            import shutil  # installs are rare: the idle daemon need not carry shutil

            shutil.copyfile(artifact, staging / name)
        os.replace(staging, final)  # durable: a folder renamed into place; fsync'd below
        _fsync_dir(releases)
    except BaseException:
        durable.remove_tree(staging)
        raise
    return final


def activate(target_dir: Path, version: str) -> None:
    """current -> version, previous -> what was current."""
    cur = slot(target_dir, "current")
    if cur and cur != version:
        _link(target_dir, "previous", cur)
    _link(target_dir, "current", version)


def roll_back(target_dir: Path) -> str | None:
    """broken -> current; current -> previous. Returns the version now current (None if there was none)."""
    bad, prev = slot(target_dir, "current"), slot(target_dir, "previous")
    if bad:
        _link(target_dir, "broken", bad)
    _link(target_dir, "current", prev)
    return prev


def restore(target_dir: Path, current: str | None, previous: str | None, broken: str | None = None) -> None:
    """Put the links back as recorded before an install (write-ahead), optionally marking one release broken.

    Used after an interrupted or failed install: unlike roll_back() it needs no guess about which
    link was already switched when the power went.
    """
    if broken:
        _link(target_dir, "broken", broken)
    _link(target_dir, "previous", previous)
    _link(target_dir, "current", current)


def prune(target_dir: Path) -> None:
    """Remove releases no slot points at, and staging leftovers: only current, previous and broken stay."""
    keep = {slot(target_dir, n) for n in ("current", "previous", "broken")}
    releases = target_dir / "releases"
    if not releases.is_dir():
        return
    for d in releases.iterdir():
        if d.name not in keep:
            durable.remove_tree(d)
    for n in ("current", "previous", "broken"):
        durable.remove(target_dir / f".{n}.tmp")
    _fsync_dir(releases)


def health_check(command: list[str], release_dir: Path, timeout_s: float) -> tuple[bool, str]:
    """Run the target's check against the new release; (healthy, reason)."""
    if not command:
        return True, "no health check configured"
    import subprocess  # health checks are rare: the idle daemon need not carry subprocess

    try:
        r = subprocess.run(
            command,
            cwd=release_dir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "IOT_AGENT_RELEASE": str(release_dir)},
        )
    except subprocess.TimeoutExpired:
        return False, f"health check timed out after {timeout_s:g} s"
    except OSError as e:
        return False, f"health check could not run: {e.strerror}"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return False, f"health check exited {r.returncode}: {tail[0][:200]}"
    return True, "healthy"
