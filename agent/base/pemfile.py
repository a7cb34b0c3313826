"""PEM certificate files: read without blocking, each block checked to be an X.509 certificate.

Shared by the config checks (CA files, the code-signing certificate), `iot-agent status` and the
update verifier, which must never hang on a FIFO or accept a key where a certificate belongs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import errno
import os
import re
import stat
from pathlib import Path

MAX_CERTIFICATE_FILE_BYTES = 4 * 1024 * 1024  # a whole system CA bundle is about 200 KB
MISSING_FILE = "does not exist"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----(.*?)-----END ([A-Z0-9 ]{1,40})-----", re.S)
_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
}


def read_regular_file(path: Path, limit: int) -> bytes:
    """A small file's bytes, read without ever blocking: opened O_NONBLOCK and checked with fstat before any
    read, so a FIFO, device or socket where a file is expected is refused instead of hanging the reader.
    Raises FileNotFoundError, or ValueError whose text follows the path: "is a FIFO, not a regular file"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a FIFO opened for writing elsewhere)
            raise ValueError("is not a regular file") from None
        raise ValueError(f"cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is {_FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"is larger than {limit} bytes")
        chunks, size = [], 0
        while size <= limit:
            # Never ask for `limit` bytes at once: os.read allocates what it is asked for, and one 16 MiB
            # buffer freed at the end of the file keeps glibc from returning memory (bench/lifecycle_rss.py).
            chunk = os.read(fd, min(limit + 1 - size, 64 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"is larger than {limit} bytes")
    return b"".join(chunks)


def certificate_ders(data: bytes) -> list[bytes]:
    """The DER of each certificate in a PEM bundle that passes certificate_problem (first one first)."""
    return [
        base64.b64decode(b"".join(body.split()))
        for label, body, _ in _PEM_BLOCK.findall(data)
        if label == b"CERTIFICATE"
    ]


def certificate_problem(data: bytes) -> str | None:
    """Why `data` is not a PEM bundle of one or more X.509 certificates (each must parse), or None; the
    reason follows the file's path in a message: "is not a PEM certificate (...)".

    Text between the blocks (a bundle's comments) is allowed; any other PEM block (a key) is not."""
    from agent.base.x509lite import subject_public_key_info, validity

    blocks = _PEM_BLOCK.findall(data)
    if data.count(b"-----BEGIN") != len(blocks):
        return "has a PEM block that is not closed (-----END CERTIFICATE----- missing)"
    if not blocks:
        return "is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)"
    for i, (label, body, end) in enumerate(blocks, 1):
        which = f"PEM block {i} of {len(blocks)}" if len(blocks) > 1 else "a PEM block"
        if label != b"CERTIFICATE" or end != label:
            return f"has {which} labelled {label.decode()!r}, not CERTIFICATE (the file must hold certificates only)"
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            return f"has {which} that is not valid base64"
        if not _one_der_element(der) or validity(der) is None or subject_public_key_info(der) is None:
            return f"has {which} that is not an X.509 certificate"
    return None


def _one_der_element(der: bytes) -> bool:
    """A DER SEQUENCE that spans exactly these bytes (nothing missing, nothing after it)."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    n, i = der[1], 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4 or len(der) < 2 + k:
            return False
        n, i = int.from_bytes(der[2 : 2 + k], "big"), 2 + k
    return i + n == len(der)


def certificate_file_problem(path: Path) -> str | None:
    """None for a readable PEM bundle of certificates, else what follows the path in a message: MISSING_FILE
    ("does not exist"), "is a FIFO, not a regular file", "is not a PEM certificate (...)", ..."""
    try:
        data = read_regular_file(path, MAX_CERTIFICATE_FILE_BYTES)
    except FileNotFoundError:
        return MISSING_FILE
    except ValueError as e:
        return str(e)
    return certificate_problem(data)


def certificate_status(path: str | None) -> tuple[float | None, str | None]:
    """(notAfter as a Unix time, None), or (None, why the certificate cannot be used); (None, None) without one.

    Read without blocking and parsed with the daemon's own minimal DER walk: never raises."""
    if not path:
        return None, None
    from agent.base.x509lite import validity

    try:
        data = read_regular_file(Path(path), MAX_CERTIFICATE_FILE_BYTES)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except ValueError as e:
        return None, f"{path} {e}"
    problem = certificate_problem(data)
    v = validity(certificate_ders(data)[0]) if problem is None else None
    if v is None:
        return None, f"{path} {problem or 'is not an X.509 certificate'}"
    return v[1], None


def certificate_expiry(path: str | None) -> str | None:
    """notAfter in ISO 8601 (UTC), or None when there is no readable certificate."""
    after, _ = certificate_status(path)
    return None if after is None else dt.datetime.fromtimestamp(after, dt.UTC).isoformat()
