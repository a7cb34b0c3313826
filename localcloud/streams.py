"""MQTT file streams (the delivery AWS IoT OTA uses): DescribeStream and GetStream.

Requests arrive on `$aws/things/T/streams/S/{describe,get}/{json,cbor}`; blocks go out one message
each on `.../data/<fmt>`, descriptions on `.../description/<fmt>`, errors on `.../rejected/<fmt>`.
Field names are AWS's single letters (c token, s version, f file id, l block size, o offset,
n count, b bitmap, i block id, p payload). Everything requested is range-checked before any I/O.
"""

from __future__ import annotations

import base64
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_BLOCK, MAX_BLOCK = 256, 128 * 1024
MAX_REQUEST_BYTES = 128 * 1024
MAX_TOKEN = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (stream_id TEXT PRIMARY KEY, version INTEGER NOT NULL, description TEXT NOT NULL,
                                    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS stream_files (stream_id TEXT NOT NULL, file_id INTEGER NOT NULL, path TEXT NOT NULL,
                                         size INTEGER NOT NULL, PRIMARY KEY (stream_id, file_id));
"""


class StreamError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(eq=False)
class Streams:
    db: sqlite3.Connection
    lock: threading.RLock
    directory: Path

    def __post_init__(self) -> None:
        with self.lock:
            self.db.executescript(SCHEMA)

    def create(self, files: list[Path], stream_id: str | None = None, description: str = "") -> str:
        stream_id = stream_id or f"stream-{int(time.time() * 1000)}"
        if not stream_id or len(stream_id) > 128 or not all(c.isalnum() or c in "-_" for c in stream_id):
            raise ValueError(f"stream id {stream_id!r}: 1-128 characters of [a-zA-Z0-9_-]")
        if not 1 <= len(files) <= 10:
            raise ValueError("a stream holds 1-10 files")
        d = self.directory / stream_id
        with self.lock:
            if self.db.execute("SELECT 1 FROM streams WHERE stream_id = ?", (stream_id,)).fetchone():
                raise ValueError(f"stream {stream_id!r} already exists")
            d.mkdir(parents=True, exist_ok=True)
            self.db.execute("INSERT INTO streams VALUES (?,?,?,?)", (stream_id, 1, description, time.time()))
            for fid, src in enumerate(files):
                dst = d / str(fid)
                shutil.copyfile(src, dst)
                self.db.execute("INSERT INTO stream_files VALUES (?,?,?,?)", (stream_id, fid, str(dst), dst.stat().st_size))
        return stream_id

    def handle(self, stream_id: str, op: str, req: Any) -> list[tuple[str, dict]]:
        """[(reply kind 'description'|'data'|'rejected', document)] for one request."""
        token = req.get("c") if isinstance(req, dict) else None
        try:
            if not isinstance(req, dict):
                raise StreamError("InvalidRequest", "request must be an object")
            if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN):
                raise StreamError("InvalidRequest", f"c (client token) must be a string of at most {MAX_TOKEN} characters")
            with self.lock:
                row = self.db.execute("SELECT version, description FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
                files = dict(self.db.execute("SELECT file_id, path FROM stream_files WHERE stream_id = ?", (stream_id,)).fetchall())
                sizes = dict(self.db.execute("SELECT file_id, size FROM stream_files WHERE stream_id = ?", (stream_id,)).fetchall())
            if row is None:
                raise StreamError("ResourceNotFound", f"stream {stream_id} not found")
            version, description = row
            if op == "describe":
                extra = set(req) - {"c"}
                if extra:
                    raise StreamError("InvalidRequest", f"unknown field(s): {', '.join(sorted(map(str, extra)))}")
                doc = {"s": version, "d": description, "r": [{"f": f, "z": sizes[f]} for f in sorted(sizes)]}
                return [("description", _with_token(doc, token))]
            return [("data", _with_token(b, token)) for b in self._get(req, version, files, sizes)]
        except StreamError as e:
            return [("rejected", _with_token({"o": e.code, "m": e.message}, token))]

    def _get(self, req: dict, version: int, files: dict, sizes: dict) -> list[dict]:
        extra = set(req) - {"c", "s", "f", "l", "o", "n", "b"}
        if extra:
            raise StreamError("InvalidRequest", f"unknown field(s): {', '.join(sorted(map(str, extra)))}")
        s = req.get("s")
        if s is not None and (not _is_int(s) or s != version):
            raise StreamError("VersionMismatch", f"stream version is {version}")
        f = req.get("f")
        if not _is_int(f) or f not in files:
            raise StreamError("ResourceNotFound", f"file id {f!r} not in stream")
        size = req.get("l")
        if not _is_int(size) or not MIN_BLOCK <= size <= MAX_BLOCK:
            raise StreamError("BlockSizeOutOfBounds", f"l must be {MIN_BLOCK}-{MAX_BLOCK}")
        nblocks = max(1, -(-sizes[f] // size))
        offset = req.get("o", 0)
        if not _is_int(offset) or not 0 <= offset < nblocks:
            raise StreamError("OffsetOutOfBounds", f"o must be 0-{nblocks - 1}")
        if "b" in req:
            bitmap = req["b"]
            if isinstance(bitmap, str):
                try:
                    bitmap = base64.b64decode(bitmap, validate=True)
                except ValueError:
                    raise StreamError("InvalidRequest", "b must be base64 (JSON) or a byte string (CBOR)")
            if not isinstance(bitmap, (bytes, bytearray)) or len(bitmap) > MAX_REQUEST_BYTES // MIN_BLOCK // 8 + 1:
                raise StreamError("InvalidRequest", "b must be a bitmap of at most 65 bytes")
            ids = [offset + i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
            requested = len(ids)
            ids = [i for i in ids if i < nblocks]
        else:
            n = req.get("n", 1)
            if not _is_int(n) or n < 1:
                raise StreamError("InvalidRequest", "n must be a positive integer")
            requested = n
            ids = list(range(offset, min(nblocks, offset + n)))
        if requested * size > MAX_REQUEST_BYTES:
            raise StreamError("BlockCountLimitExceeded", f"at most {MAX_REQUEST_BYTES} bytes per request")
        out = []
        with open(files[f], "rb") as fh:
            for i in ids:
                fh.seek(i * size)
                out.append({"f": f, "l": size, "i": i, "p": fh.read(size)})
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _with_token(doc: dict, token: Any) -> dict:
    if isinstance(token, str) and len(token) <= MAX_TOKEN:
        doc["c"] = token
    return doc


def route(topic: str) -> tuple[str, str, str, str] | None:
    """(thing, stream id, 'describe'|'get', format) for a request topic, else None."""
    p = topic.split("/")
    if len(p) == 7 and p[:2] == ["$aws", "things"] and p[3] == "streams" and p[5] in ("describe", "get") \
            and p[6] in ("json", "cbor"):
        return p[2], p[4], p[5], p[6]
    return None


def encode_block_payload(doc: dict, fmt: str) -> dict:
    """JSON carries block bytes as base64; CBOR as a byte string."""
    if fmt == "json" and "p" in doc:
        return {**doc, "p": base64.b64encode(doc["p"]).decode()}
    return doc
