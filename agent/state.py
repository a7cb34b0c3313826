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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StateError

SCHEMA_VERSION = 1
FILE_NAME = "state.json"


def _digest(data: Any) -> str:
    import hashlib  # not needed by a daemon whose state never changes after start

    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


@dataclass(eq=False)
class StateStore:
    directory: Path
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    def load(self) -> dict[str, Any]:
        """The stored state, or {} when none was ever written."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StateError(f"{self.path}: cannot read the state file ({e.strerror}); check its owner and mode")
        hint = "it was left untouched; restore it from a backup or move it aside to start over (the device may need re-provisioning)"
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StateError(f"{self.path}: state file is corrupt (not JSON: {e.__class__.__name__}); {hint}")
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
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"schema": SCHEMA_VERSION, "sha256": _digest(data), "data": data}
        body = (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
        tmp = self.directory / f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case a stale temp file existed with another mode
            view = memoryview(body)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def update(self, **changes: Any) -> dict[str, Any]:
        """Load, apply top-level changes (None deletes a key), save; returns the new state."""
        with self._lock:  # the reporter thread and the main loop both update it
            data = self.load()
            for k, v in changes.items():
                if v is None:
                    data.pop(k, None)
                else:
                    data[k] = v
            self.save(data)
            return data

    def check_mode(self) -> str | None:
        """A problem line when the state file is readable by others, else None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if st.st_mode & 0o077:
            return f"{self.path}: state file mode {stat.S_IMODE(st.st_mode):04o} is readable by others; run chmod 600"
        return None
