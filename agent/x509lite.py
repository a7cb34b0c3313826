"""The two things the daemon reads from certificates, by a minimal DER walk: no asn1crypto resident.

notAfter (for the days-to-expiry metric and rotation) and the SubjectPublicKeyInfo (to verify
update signatures with awscrt against the pinned code-signing certificate). Anything malformed
returns None; callers treat that as "cannot trust".
"""

from __future__ import annotations

import base64
import calendar
import time


def der(pem_or_der: bytes) -> bytes:
    if b"-----BEGIN" in pem_or_der:
        body = b"".join(l for l in pem_or_der.splitlines() if l and not l.startswith(b"-----"))
        return base64.b64decode(body)
    return pem_or_der


def _tlv(buf: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at i."""
    if i + 2 > len(buf):
        raise ValueError("truncated DER")
    tag, ln = buf[i], buf[i + 1]
    i += 2
    if ln & 0x80:
        k = ln & 0x7F
        if k == 0 or k > 4 or i + k > len(buf):
            raise ValueError("bad DER length")
        ln = int.from_bytes(buf[i:i + k], "big")
        i += k
    if i + ln > len(buf):
        raise ValueError("DER element overruns the buffer")
    return tag, i, i + ln


def _tbs_fields(data: bytes) -> list[tuple[int, int, int]]:
    """The TBSCertificate's elements, version dropped: serial, sigalg, issuer, validity, subject, spki, ..."""
    _, s, e = _tlv(data, 0)  # Certificate
    _, s, e = _tlv(data, s)  # TBSCertificate
    out, i = [], s
    while i < e:
        tag, a, b = _tlv(data, i)
        out.append((tag, i, b))
        i = b
    if out and out[0][0] == 0xA0:
        out = out[1:]
    return out


def _time(data: bytes, i: int) -> tuple[float, int]:
    tag, a, b = _tlv(data, i)
    text = data[a:b].decode()
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    return float(calendar.timegm(time.strptime(text[:14], "%Y%m%d%H%M%S"))), b


def validity(pem_or_der: bytes) -> tuple[float, float] | None:
    """(notBefore, notAfter) as Unix times, or None for something that is not a certificate."""
    try:
        data = der(pem_or_der)
        _, vs, _ = _tlv(data, _tbs_fields(data)[3][1])  # Validity
        before, i = _time(data, vs)
        after, _ = _time(data, i)
        return before, after
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def not_after(pem_or_der: bytes) -> float | None:
    v = validity(pem_or_der)
    return v[1] if v else None


def subject_public_key_info(pem_or_der: bytes) -> bytes | None:
    try:
        data = der(pem_or_der)
        _, start, end = _tbs_fields(data)[5]
        return data[start:end]
    except (IndexError, ValueError):
        return None
