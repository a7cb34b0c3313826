"""Every durable change the agent makes to its files goes through here: one implementation of the
atomic write, so none of them forgets an fsync.

A power cut can stop the machine between any two system calls. A file is therefore never changed in
place: the new content goes to a temporary file in the same folder, is fsync'd, renamed over the old
one, and the folder is fsync'd so the rename itself survives. Readers see the old content or the new,
never a mix. Removals and symlink switches fsync their folder too, so what a flow recorded as done is
done on disk.

`agent.killpoints` counts these operations (and token key changes) when a test sweeps SIGKILL over
every one of them; nothing here knows about it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path | str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably; the file gets `mode` (0600 unless public)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # a stale temp file may exist with another mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, doc: Any, mode: int = 0o600) -> None:
    write_atomic(path, (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode(), mode)


def replace(src: Path, dst: Path) -> None:
    """Rename within one file system, durably (both folders fsync'd)."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)


def remove(path: Path) -> bool:
    """Remove a file if it exists, durably; True if it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(Path(path).parent)
    return True


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it, if it exists."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        remove(path)
    elif path.exists():
        import shutil  # here only: the steady-state daemon need not carry it (bench/lifecycle_rss.py)

        shutil.rmtree(path, ignore_errors=True)
        fsync_dir(path.parent)


def symlink(link: Path, target: str | Path | None) -> None:
    """Point `link` at `target` atomically (a new link renamed over the old); None removes it."""
    link = Path(link)
    if target is None:
        remove(link)
        return
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_stale_temps(directory: Path) -> int:
    """Temporary files write_atomic left when the power went (named .<name>.<pid>.<thread>.tmp), of
    processes that no longer run; returns how many were removed."""
    n = 0
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return 0
    for p in entries:
        parts = p.name.split(".")
        stale = len(parts) >= 5 and p.name.startswith(".") and parts[-1] == "tmp" and parts[-3].isdigit()
        if stale and not os.path.exists(f"/proc/{parts[-3]}") and p.is_file() and not p.is_symlink():
            remove(p)
            n += 1
    return n
