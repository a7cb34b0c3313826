"""A small durable store for the agent's state (identity, certificate paths, flow states).

Power can fail at any instant, so a write never modifies the file in place: the new content goes to
a temporary file in the same folder, is fsync'd, renamed over the old one, and the folder is
fsync'd so the rename itself is durable. Readers therefore see the old state or the new one, never a
mix. A file that fails to parse or whose checksum does not match is reported, never reset: losing
the record of a half-finished provisioning or rotation is how devices get bricked.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.errors import StateError

SCHEMA_VERSION = 1
FILE_NAME = "state.json"
LOCK_NAME = "state.lock"
MAX_STATE_BYTES = 16 * 1024 * 1024
_FOLDER_LOCKS: dict[str, _FolderLock] = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


class _FolderLock:
    """A re-entrant lock per state folder that remembers how deep its owner is (for the flock)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.depth = 0

    def __enter__(self) -> _FolderLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def _folder_lock(directory: Path) -> _FolderLock:
    with _FOLDER_LOCKS_GUARD:
        return _FOLDER_LOCKS.setdefault(os.path.abspath(directory), _FolderLock())


def _digest(data: Any) -> str:
    from agent.base.digest import sha256

    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256(canon.encode()).hexdigest()


@dataclass(eq=False)
class StateStore:
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    def load(self) -> dict[str, Any]:
        """The stored state, or {} when none was ever written."""
        from agent.base.pemfile import read_regular_file  # never blocks on a FIFO where the file should be

        try:
            raw = read_regular_file(self.path, MAX_STATE_BYTES)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StateError(
                f"{self.path}: cannot read the state file ({e.strerror}); check its owner and mode"
            ) from None
        except ValueError as e:
            raise StateError(f"{self.path}: the state file {e}; move it aside and restore the real one") from None
        hint = (
            "it was left untouched; restore it from a backup or move it aside to start over (the device may "
            "need re-provisioning)"
        )
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StateError(f"{self.path}: state file is corrupt (not JSON: {e.__class__.__name__}); {hint}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
            raise StateError(f"{self.path}: state file is corrupt (no 'data' object); {hint}")
        version = doc.get("schema")
        if not isinstance(version, int) or isinstance(version, bool):
            raise StateError(f"{self.path}: state file is corrupt (no schema version); {hint}")
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: state schema {version} is newer than this agent understands ({SCHEMA_VERSION}); "
                "the agent was downgraded: install the newer version again"
            )
        if doc.get("sha256") != _digest(doc["data"]):
            raise StateError(f"{self.path}: state file is corrupt (checksum mismatch); {hint}")
        return doc["data"]

    def save(self, data: dict[str, Any]) -> None:
        """Atomically replace the stored state with `data` (JSON-serialisable)."""
        from agent.base.durable import write_atomic

        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"schema": SCHEMA_VERSION, "sha256": _digest(data), "data": data}
        write_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode(), 0o600)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: threads of this process (one lock per folder, whichever StateStore
        object they hold) and other processes (`iot-agent rotate` records a request while the agent
        runs) through an flock on state.lock. Without it a read-modify-write loses the other's change."""
        import fcntl

        lock = _folder_lock(self.directory)
        with lock:
            if getattr(lock, "depth", 0):  # nested in this thread: the flock is already ours
                lock.depth += 1
                try:
                    yield
                finally:
                    lock.depth -= 1
                return
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                lock.depth = 1
                yield
            finally:
                lock.depth = 0
                os.close(fd)  # releases the flock

    def modify(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Load, let `change` compute the new state from a copy, save it in one atomic write; returns it.

        A flow's decision and everything that follows from it (a rotation's commit and the identity it
        switches to) go through ONE call, so a power cut leaves both or neither."""
        with self._locked():
            data = change(json.loads(json.dumps(self.load())))
            self.save(data)
            return data

    def update(self, **changes: Any) -> dict[str, Any]:
        """Load, apply top-level changes (None deletes a key), save in one write; returns the new state."""

        def apply(data: dict[str, Any]) -> dict[str, Any]:
            for k, v in changes.items():
                if v is None:
                    data.pop(k, None)
                else:
                    data[k] = v
            return data

        return self.modify(apply)

    def update_section(self, name: str, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into one section (a flow's record) under the lock; returns the section."""
        out: dict[str, Any] = {}

        def apply(data: dict[str, Any]) -> dict[str, Any]:
            section = dict(data.get(name) or {})
            section.update(changes)
            data[name] = section
            out.update(section)
            return data

        self.modify(apply)
        return out

    def check_mode(self) -> str | None:
        """A problem line when the state file is readable by others, else None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if st.st_mode & 0o077:
            return f"{self.path}: state file mode {stat.S_IMODE(st.st_mode):04o} is readable by others; run chmod 600"
        return None
