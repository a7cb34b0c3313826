"""The two things the daemon reads from certificates, by a minimal DER walk: no asn1crypto resident.

notAfter (for the days-to-expiry metric and rotation) and the SubjectPublicKeyInfo (to verify
update signatures with awscrt against the pinned code-signing certificate). Anything malformed
returns None; callers treat that as "cannot trust".
"""

from __future__ import annotations

import base64
import calendar
import re as _re
import time
from dataclasses import dataclass as _dataclass

from agent.base.digest import sha256 as _sha256


def der(pem_or_der: bytes) -> bytes:
    if b"-----BEGIN" in pem_or_der:
        body = b"".join(line for line in pem_or_der.splitlines() if line and not line.startswith(b"-----"))
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
        ln = int.from_bytes(buf[i : i + k], "big")
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


# -- strict parsing, for answers from the network -------------------------------------------------

_PEM_CERT = _re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+?)-----END CERTIFICATE-----")
_UTC = _re.compile(r"[0-9]{12}Z", _re.ASCII)
_GEN = _re.compile(r"[0-9]{14}Z", _re.ASCII)


@_dataclass(frozen=True)
class Certificate:
    der: bytes
    spki: bytes  # SubjectPublicKeyInfo, DER
    not_before: float
    not_after: float

    @property
    def id(self) -> str:
        """AWS IoT's certificate ID: the SHA-256 of the DER, lowercase hex."""
        return _sha256(self.der).hexdigest()


def _strict_time(data: bytes, i: int) -> tuple[float, int]:
    tag, a, b = _tlv(data, i)
    text = data[a:b].decode("ascii")
    if tag == 0x17 and _UTC.fullmatch(text):
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif not (tag == 0x18 and _GEN.fullmatch(text)):
        raise ValueError("validity time is not a UTCTime or GeneralizedTime in UTC")
    return float(calendar.timegm(time.strptime(text[:14], "%Y%m%d%H%M%S"))), b


def _sequence_items(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each element in data[start:end]."""
    out, i = [], start
    while i < end:
        tag, a, b = _tlv(data, i)
        if b > end:
            raise ValueError("DER element overruns its container")
        out.append((tag, i, a, b))
        i = b
    return out


def pem_certificates(text: bytes) -> list[bytes]:
    """The DER of every certificate in a PEM bundle (ValueError when a block does not decode)."""
    return [base64.b64decode(b"".join(m.group(1).split()), validate=True) for m in _PEM_CERT.finditer(text)]


def parse_certificate(pem_or_der: bytes) -> Certificate:
    """A single X.509 certificate, checked for structure (not for its signature); ValueError otherwise."""
    try:
        if pem_or_der.lstrip().startswith(b"-----BEGIN"):
            ders = pem_certificates(pem_or_der)
            if len(ders) != 1 or pem_or_der.count(b"-----BEGIN") != 1:
                raise ValueError("expected exactly one PEM CERTIFICATE block")
            data = ders[0]
        else:
            data = bytes(pem_or_der)
        tag, s, e = _tlv(data, 0)
        if tag != 0x30 or e != len(data):
            raise ValueError("not a DER SEQUENCE spanning the whole certificate")
        outer = _sequence_items(data, s, e)
        if [t for t, *_ in outer] != [0x30, 0x30, 0x03]:
            raise ValueError("certificate is not TBSCertificate, algorithm, signature")
        _, _, ts, te = outer[0]
        tbs = _sequence_items(data, ts, te)
        if tbs and tbs[0][0] == 0xA0:
            tbs = tbs[1:]
        if len(tbs) < 6 or [t for t, *_ in tbs[:6]] != [0x02, 0x30, 0x30, 0x30, 0x30, 0x30]:
            raise ValueError("TBSCertificate lacks serial, issuer, validity, subject or public key")
        _, _, vs, ve = tbs[3]
        before, i = _strict_time(data, vs)
        after, i = _strict_time(data, i)
        if i != ve:
            raise ValueError("validity has extra elements")
        _, spki_start, _, spki_end = tbs[5]
        return Certificate(data, data[spki_start:spki_end], before, after)
    except (IndexError, UnicodeDecodeError, OverflowError, TypeError) as e:
        raise ValueError(f"malformed certificate ({e.__class__.__name__})") from None


def csr_public_key_info(pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo inside a PKCS#10 request (our own CSR, to check what a CA issued)."""
    data = der(pem)
    _, s, e = _tlv(data, 0)
    _, cs, ce = _tlv(data, s)  # CertificationRequestInfo
    items = _sequence_items(data, cs, ce)
    if len(items) < 3 or items[2][0] != 0x30:
        raise ValueError("not a PKCS#10 request")
    return data[items[2][1] : items[2][3]]
