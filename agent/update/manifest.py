"""The signed release manifest: what an update IS, bound by the vendor's signature.

A job document says where to fetch an artifact; anyone who can create jobs can write it. What must
not be theirs to decide (which target, which version, which bytes) is in a small manifest the vendor
signs with the code-signing key the device pins:

    {"format": "iot-agent-release/1", "target": "app", "version": "1.2.3",
     "name": "app-1.2.3.tar", "size": 12345, "sha256": "<64 hex>"}

The signature (ECDSA P-256 over SHA-256) covers the manifest's exact bytes, which travel base64 in
the job document (schema 2, see agent.otadoc) and in the request to the root helper. The device
verifies the signature BEFORE reading any field, then checks the artifact's size and SHA-256 against
it: an old signed release relabelled as 99.0.0 still says its own version, and a manifest of another
target names that target.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agent.base.digest import sha256
from agent.update.versions import VersionError, parse_version

FORMAT = "iot-agent-release/1"
MAX_MANIFEST_BYTES = 2048
MAX_ARTIFACT_BYTES = 2 * 1024**3
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
TARGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
SHA256_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
KEYS = {"format", "target", "version", "name", "size", "sha256"}


class ManifestError(ValueError):
    """Not a valid, verified manifest; str() is the reason for the job's statusDetails."""


@dataclass(frozen=True)
class Manifest:
    target: str
    version: str
    name: str
    size: int
    sha256: str  # lowercase hex


def make(target: str, version: str, name: str, size: int, sha256: str) -> bytes:
    """The manifest's bytes, as a vendor's signing tool writes them (the device reads any key order)."""
    return json.dumps(
        {"format": FORMAT, "target": target, "version": version, "name": name, "size": size, "sha256": sha256},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(raw: bytes) -> Manifest:
    """The fields of manifest bytes (whose signature the caller has verified); ManifestError otherwise."""
    if not isinstance(raw, (bytes, bytearray)) or not 0 < len(raw) <= MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest must be 1-{MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ManifestError("manifest is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != KEYS:
        raise ManifestError(f"manifest must be an object with exactly {', '.join(sorted(KEYS))}")
    if doc["format"] != FORMAT:
        raise ManifestError(f"manifest format must be {FORMAT}")
    target, version, name, size, sha = (doc[k] for k in ("target", "version", "name", "size", "sha256"))
    if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
        raise ManifestError("manifest target must be a plain name")
    try:
        parse_version(version)
    except VersionError as e:
        raise ManifestError(f"manifest {e}") from None
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ManifestError("manifest name must be a plain file name")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_ARTIFACT_BYTES:
        raise ManifestError(f"manifest size must be an integer in [1, {MAX_ARTIFACT_BYTES}]")
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise ManifestError("manifest sha256 must be 64 lowercase hex digits")
    return Manifest(target, version, name, size, sha)


def verify(pinned_key, raw: bytes, signature_der: bytes) -> Manifest:
    """Check the signature over the exact bytes with the pinned key, then read them."""
    from agent.update.signing import verify_digest

    if not isinstance(raw, (bytes, bytearray)) or not 0 < len(raw) <= MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest must be 1-{MAX_MANIFEST_BYTES} bytes")
    if not verify_digest(pinned_key, sha256(bytes(raw)).digest(), signature_der):
        raise ManifestError("manifest signature does not verify with the pinned code-signing certificate")
    return parse(bytes(raw))
