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

# Limits and rejection codes as AWS documents them ("Using AWS IoT MQTT-based file delivery in devices",
# https://docs.aws.amazon.com/iot/latest/developerguide/mqtt-based-file-delivery-in-devices.html):
#   c  client token, at most 64 bytes, else InvalidRequest (and not echoed)
#   s  stream version, else VersionMismatch            f  file id 0-255; one not in the stream: ResourceNotFound
#   l  block size 256-131072, else BlockSizeOutOfBounds o  offset 0-98304, else OffsetOutOfBounds
#   n  block count 0-98304, else BlockCountLimitExceeded; absent (or 0): 131072 / l
#   b  bitmap under 12,288 bytes, else BlockBitmapLimitExceeded; "0x…" hex in JSON, a byte string in CBOR
#   blocks the file does not have: ResourceNotFound; undecodable request: InvalidJson / InvalidCbor (service.py);
#   anything else malformed: InvalidRequest; a failure of ours: InternalError.
# Asking for more than 128 KB is not an error: one request gets at most 128 KB of blocks, the device asks again.
MIN_BLOCK, MAX_BLOCK = 256, 128 * 1024
MAX_REQUEST_BYTES = 128 * 1024  # of blocks sent for one GetStream request
MAX_TOKEN = 64  # bytes (UTF-8)
MAX_FILE_ID = 255
MAX_OFFSET = 98304
MAX_BLOCK_COUNT = 98304
MAX_BITMAP_BYTES = 12288  # exclusive: "must be less than 12,288 bytes"

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
                self.db.execute(
                    "INSERT INTO stream_files VALUES (?,?,?,?)", (stream_id, fid, str(dst), dst.stat().st_size)
                )
        return stream_id

    def handle(self, stream_id: str, op: str, req: Any) -> list[tuple[str, dict]]:
        """[(reply kind 'description'|'data'|'rejected', document)] for one request."""
        token = req.get("c") if isinstance(req, dict) else None
        try:
            if not isinstance(req, dict):
                raise StreamError("InvalidRequest", "request must be an object")
            if token is not None and not _valid_token(token):
                raise StreamError("InvalidRequest", f"c (client token) must be a string of at most {MAX_TOKEN} bytes")
            with self.lock:
                row = self.db.execute(
                    "SELECT version, description FROM streams WHERE stream_id = ?", (stream_id,)
                ).fetchone()
                files = dict(
                    self.db.execute(
                        "SELECT file_id, path FROM stream_files WHERE stream_id = ?", (stream_id,)
                    ).fetchall()
                )
                sizes = dict(
                    self.db.execute(
                        "SELECT file_id, size FROM stream_files WHERE stream_id = ?", (stream_id,)
                    ).fetchall()
                )
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
        except FileNotFoundError:  # the stream's copy of the file is gone from disk
            return [("rejected", _with_token({"o": "ResourceNotFound", "m": "stream file data not found"}, token))]
        except Exception as e:  # a bug must still be answered, as AWS would, and never kill the service
            import logging

            logging.getLogger("localcloud.streams").exception("stream %s failed", op)
            return [("rejected", _with_token({"o": "InternalError", "m": e.__class__.__name__}, token))]

    def _get(self, req: dict, version: int, files: dict, sizes: dict) -> list[dict]:
        extra = set(req) - {"c", "s", "f", "l", "o", "n", "b"}
        if extra:
            raise StreamError("InvalidRequest", f"unknown field(s): {', '.join(sorted(map(str, extra)))}")
        s = req.get("s")
        if s is not None:
            if not _is_int(s):
                raise StreamError("InvalidRequest", "s (stream version) must be an integer")
            if s != version:
                raise StreamError("VersionMismatch", f"stream version is {version}, not {s}")
        f = req.get("f")
        if not _is_int(f) or not 0 <= f <= MAX_FILE_ID:
            raise StreamError("InvalidRequest", f"f (file id) must be an integer 0-{MAX_FILE_ID}")
        if f not in files:
            raise StreamError("ResourceNotFound", f"file id {f} not in stream")
        size = req.get("l")
        if not _is_int(size):
            raise StreamError("InvalidRequest", "l (block size) must be an integer")
        if not MIN_BLOCK <= size <= MAX_BLOCK:
            raise StreamError("BlockSizeOutOfBounds", f"l must be {MIN_BLOCK}-{MAX_BLOCK}")
        offset = req.get("o", 0)
        if not _is_int(offset):
            raise StreamError("InvalidRequest", "o (block offset) must be an integer")
        if not 0 <= offset <= MAX_OFFSET:
            raise StreamError("OffsetOutOfBounds", f"o must be 0-{MAX_OFFSET}")
        n = req.get("n")
        if n is not None:
            if not _is_int(n):
                raise StreamError("InvalidRequest", "n (block count) must be an integer")
            if not 0 <= n <= MAX_BLOCK_COUNT:
                raise StreamError("BlockCountLimitExceeded", f"n must be 0-{MAX_BLOCK_COUNT}")
        per_request = MAX_REQUEST_BYTES // size
        limit = min(n or per_request, per_request)
        if "b" in req:
            bitmap = _bitmap(req["b"])
            ids = [offset + i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
            if not ids:
                raise StreamError("InvalidRequest", "b (bitmap) asks for no block")
        else:
            ids = list(range(offset, offset + limit))
        nblocks = max(1, -(-sizes[f] // size))
        ids = [i for i in ids if i < nblocks][:limit]
        if not ids:
            raise StreamError(
                "ResourceNotFound", f"file {f} has {nblocks} block(s) of {size} bytes; none was asked for"
            )
        out = []
        with open(files[f], "rb") as fh:
            for i in ids:
                fh.seek(i * size)
                out.append({"f": f, "l": size, "i": i, "p": fh.read(size)})
        return out


def _bitmap(b: Any) -> bytes:
    """The GetStream bitmap: a CBOR byte string, or in JSON AWS's hex string ("0x130080": bytes 13 00 80,
    block offset+0 is the lowest bit of the first byte)."""
    if isinstance(b, str):
        text = b.strip()
        try:
            if text[:2] in ("0x", "0X"):
                digits = text[2:]
                b = bytes.fromhex(("0" if len(digits) % 2 else "") + digits)
            else:
                # Not AWS's format: base64, which agent/streamdl.py sends. Accepted here only until the
                # agent sends hex; AWS would not read it this way.
                b = base64.b64decode(text, validate=True)
        except ValueError:
            raise StreamError(
                "InvalidRequest", 'b must be a hex string ("0x…") in JSON or a byte string in CBOR'
            ) from None
    if not isinstance(b, (bytes, bytearray)):
        raise StreamError("InvalidRequest", 'b must be a hex string ("0x…") in JSON or a byte string in CBOR')
    if len(b) >= MAX_BITMAP_BYTES:
        raise StreamError("BlockBitmapLimitExceeded", f"b must be less than {MAX_BITMAP_BYTES} bytes")
    return bytes(b)


def _valid_token(token: Any) -> bool:
    return isinstance(token, str) and len(token.encode("utf-8", "surrogatepass")) <= MAX_TOKEN


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _with_token(doc: dict, token: Any) -> dict:
    """AWS echoes a valid client token; an invalid one is left out of the answer."""
    if _valid_token(token):
        doc["c"] = token
    return doc


def route(topic: str) -> tuple[str, str, str, str] | None:
    """(thing, stream id, 'describe'|'get', format) for a request topic, else None."""
    p = topic.split("/")
    if (
        len(p) == 7
        and p[:2] == ["$aws", "things"]
        and p[3] == "streams"
        and p[5] in ("describe", "get")
        and p[6] in ("json", "cbor")
    ):
        return p[2], p[4], p[5], p[6]
    return None


def encode_block_payload(doc: dict, fmt: str) -> dict:
    """JSON carries block bytes as base64; CBOR as a byte string."""
    if fmt == "json" and "p" in doc:
        return {**doc, "p": base64.b64encode(doc["p"]).decode()}
    return doc
