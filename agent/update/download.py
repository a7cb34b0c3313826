"""Artifact downloads over HTTPS: streamed to disk in bounded memory, resumable, size-checked.

The partial file is the resume record: after a restart the download continues with
`Range: bytes=<size of the partial file>-`, and the SHA-256 is rebuilt from what is on disk
before new bytes are appended. The size stated by the signed job document bounds everything:
a server that sends more is cut off, one that sends less leaves a partial file to resume.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.base.digest import stream_sha256

if TYPE_CHECKING:
    import ssl

CHUNK = 256 * 1024


class DownloadError(Exception):
    """str() is the reason reported in the job's statusDetails."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: bytes
    resumed_from: int


def _context(ca_file: Path | None) -> ssl.SSLContext:
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def https_download(
    url: str,
    partial: Path,
    expected_size: int,
    *,
    ca_file: Path | None = None,
    timeout: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> Downloaded:
    # Imported here: a device whose updates come over MQTT streams never pays for http.client and ssl
    # (about 2 MiB resident; bench/lifecycle_rss.py).
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise DownloadError("only https:// URLs are downloaded")
    have = partial.stat().st_size if partial.exists() else 0
    if have > expected_size:
        from agent.base.durable import remove

        remove(partial)
        have = 0
    h = stream_sha256()
    if have:
        with open(partial, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    if have == expected_size:
        return Downloaded(partial, h.digest(), have)
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout, context=_context(ca_file))
    path = u.path + (f"?{u.query}" if u.query else "")
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"download failed: {e.__class__.__name__}: {str(e)[:120]}") from None
        resumed = have
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DownloadError("server answered the range request with a different range")
            if m.group(3) != "*" and int(m.group(3)) != expected_size:
                raise DownloadError(f"size mismatch: server has {m.group(3)} bytes, the job says {expected_size}")
        elif resp.status == 200:
            if have:  # the server ignored the range: start over
                h, have, resumed = stream_sha256(), 0, 0
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) != expected_size:
                raise DownloadError(f"size mismatch: server sends {length} bytes, the job says {expected_size}")
        elif resp.status in (403, 404):
            raise DownloadError(f"server refused the download (HTTP {resp.status}); the URL may have expired")
        else:
            raise DownloadError(f"unexpected HTTP status {resp.status}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if have else os.O_TRUNC), 0o600)
        with os.fdopen(fd, "ab" if have else "wb") as out:
            done = have
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while done < expected_size:
                try:
                    n = resp.readinto(view[: min(CHUNK, expected_size - done)])
                except (OSError, http.client.HTTPException) as e:
                    out.flush()
                    os.fsync(out.fileno())
                    raise DownloadError(
                        f"connection lost after {done} of {expected_size} bytes ({e.__class__.__name__})"
                    ) from None
                if not n:
                    break
                out.write(view[:n])
                h.update(view[:n])
                done += n
                if progress:
                    progress(done, expected_size)
            out.flush()
            os.fsync(out.fileno())
        if done < expected_size:
            raise DownloadError(f"truncated: {done} of {expected_size} bytes (the rest is fetched on the next attempt)")
        if resp.read(1):
            raise DownloadError(f"size mismatch: the server sent more than the {expected_size} bytes the job states")
        return Downloaded(partial, h.digest(), resumed)
    finally:
        conn.close()
