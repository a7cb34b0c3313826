"""Answers from the provisioning service, checked completely before anything is saved.

A CreateCertificateFromCsr or RegisterThing answer becomes the device's identity: a thing name that
ends up in every MQTT topic, a certificate the TLS handshake presents, a token that attaches it. An
answer that is wrong (a hostile network, a broken template, a cloud bug) and saved anyway can leave a
device unable ever to connect again. So every field is checked here, in pure functions, against
AWS's documented formats and against the device's own key; a failure raises AnswerError, nothing is
written, and the flow retries with backoff.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent.base.x509lite import Certificate, csr_public_key_info, parse_certificate

# AWS IoT's thing name pattern (CreateThing: [a-zA-Z0-9:_-]+, 1-128 characters).
THING_NAME_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}", re.ASCII)
CERTIFICATE_ID_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
MAX_CERTIFICATE_PEM = 16 * 1024
MAX_OWNERSHIP_TOKEN = 8 * 1024  # AWS's tokens are a few hundred bytes; a megabyte is an attack
TOKEN_RE = re.compile(r"[\x21-\x7e]+", re.ASCII)  # printable ASCII, no spaces or controls
CLOCK_MARGIN_S = 300.0  # a certificate issued "in the future" by this much is still accepted


class AnswerError(ValueError):
    """The answer is not acceptable; str() is the reason (safe to log: no secrets, bounded)."""


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_id: str
    pem: bytes
    certificate: Certificate
    ownership_token: str


def _shown(value: Any) -> str:
    """A short, escaped picture of a hostile value for the reason text."""
    if not isinstance(value, str):
        return type(value).__name__
    shown = value[:40].encode("ascii", "backslashreplace").decode()
    return repr(shown[:60]) + ("..." if len(value) > 40 or len(shown) > 60 else "")


def thing_name(value: Any) -> str:
    if not isinstance(value, str) or not THING_NAME_RE.fullmatch(value):
        raise AnswerError(f"thing name {_shown(value)} is not 1-128 characters of [a-zA-Z0-9:_-]")
    return value


def ownership_token(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise AnswerError("certificateOwnershipToken is missing or not a string")
    if len(value) > MAX_OWNERSHIP_TOKEN:
        raise AnswerError(f"certificateOwnershipToken is longer than {MAX_OWNERSHIP_TOKEN} characters")
    if not TOKEN_RE.fullmatch(value):
        raise AnswerError("certificateOwnershipToken holds spaces or control characters")
    return value


def certificate_id(value: Any) -> str:
    if not isinstance(value, str) or not CERTIFICATE_ID_RE.fullmatch(value):
        raise AnswerError(f"certificateId {_shown(value)} is not 64 lowercase hex digits")
    return value


def issued_certificate(pem: Any, cert_id: Any, token: Any, csr_pem: str | bytes, now: float) -> IssuedCertificate:
    """A CreateCertificateFromCsr answer: the certificate parses, is for the key that signed our CSR,
    is valid now, and its id is the SHA-256 of its DER (what AWS calls the certificate ID)."""
    cid = certificate_id(cert_id)
    tok = ownership_token(token)
    if not isinstance(pem, str) or not pem:
        raise AnswerError("certificatePem is missing or not a string")
    if len(pem) > MAX_CERTIFICATE_PEM:
        raise AnswerError(f"certificatePem is longer than {MAX_CERTIFICATE_PEM} characters")
    try:
        raw = pem.encode("ascii")
        cert = parse_certificate(raw)
    except (ValueError, UnicodeEncodeError) as e:
        raise AnswerError(f"certificatePem is not one X.509 certificate ({str(e)[:80]})") from None
    try:
        ours = csr_public_key_info(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
    except (ValueError, IndexError):
        raise AnswerError("the request's own CSR cannot be read (state file damaged?)") from None
    if cert.spki != ours:
        raise AnswerError("the certificate is not for this device's key (its public key differs from the CSR's)")
    if cert.id != cid:
        raise AnswerError(f"certificateId {cid[:12]}... is not the SHA-256 of the certificate ({cert.id[:12]}...)")
    if cert.not_before > now + CLOCK_MARGIN_S:
        raise AnswerError("the certificate is not valid yet")
    if cert.not_after <= now:
        raise AnswerError("the certificate has already expired")
    return IssuedCertificate(cid, raw if raw.endswith(b"\n") else raw + b"\n", cert, tok)
