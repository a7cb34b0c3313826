"""OTA job documents: our own schema and AWS's FreeRTOS `afr_ota`, parsed strictly into one shape.

Pure and hostile-input safe: `parse()` returns an UpdateSpec or raises DocumentError with the reason
that goes into the job's REJECTED statusDetails. Nothing here trusts the document with anything
but what to fetch: the signature is checked against the device's pinned certificate elsewhere.

What each format binds (what the signature makes the vendor's word rather than the job creator's):

Schema 2 (recommended): the signature covers a release manifest (agent.manifest) naming the
target, version, artifact name, size and SHA-256, so all of them are bound; only the location
(URL or stream) is unsigned.
    {"operation": "ota-update", "schema": 2, "manifest": "<base64 manifest bytes>",
     "artifact": {"url": "https://…"  |  "stream": {"id": "fw-1", "file_id": 0}},
     "signature": {"algorithm": "ECDSA-P256-SHA256", "value": "<base64 DER over the manifest>"}}

Schema 1 and AWS's afr_ota (legacy): the signature covers the artifact's bytes only; target and
version are unsigned labels. They install only a tar whose signed content carries VERSION and TARGET
files (agent.update.ota checks them); anything else is refused unless ota.insecure_trust_version_labels.
    {"operation": "ota-update", "schema": 1, "target": "app", "version": "1.2.3",
     "artifact": {"name": "app-1.2.3.tar", "size": 12345, "sha256": "<64 hex>",
                  "url": "https://…"  |  "stream": {"id": "fw-1", "file_id": 0}},
     "signature": {"algorithm": "ECDSA-P256-SHA256", "value": "<base64 DER>"}}
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from agent.update.versions import VersionError, parse_version

MAX_DOCUMENT_BYTES = 32 * 1024  # AWS IoT job documents are at most 32 kB
MAX_ARTIFACT_BYTES = 2 * 1024**3
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)  # always fullmatch
STREAM_RE = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)
MAX_MANIFEST_B64 = 4096


class DocumentError(ValueError):
    """The document cannot be accepted; str() is the reason for statusDetails."""


@dataclass(frozen=True, eq=False)
class UpdateSpec:
    source: str  # "our" or "afr_ota"
    target: str | None
    version: str | None
    name: str
    size: int
    sha256: str | None  # hex, when the document states it (ours); afr_ota relies on the signature alone
    url: str | None
    stream_id: str | None
    file_id: int | None
    signature: bytes  # DER
    filepath: str | None = None  # afr_ota: the file's path as the OTA job names it (maps to a target)
    manifest: bytes | None = None  # schema 2: the signed manifest's bytes (fields above filled once verified)
    bound: bool = False  # target, version, name, size and sha256 come from a verified manifest


def version_key(v: str) -> tuple[int, ...]:
    return parse_version(v)


def _version(v: Any, what: str) -> str:
    try:
        parse_version(v)
    except VersionError as e:
        raise DocumentError(f"{what}: {e}") from None
    return v


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DocumentError(f"{what} must be an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str, max_len: int = 2048) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise DocumentError(f"{what} must be a non-empty string of at most {max_len} characters")
    return v


def _signature(v: Any, what: str) -> bytes:
    s = _str(v, what, 256)
    try:
        der = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError(f"{what} is not base64") from None
    if not 8 <= len(der) <= 72 or der[0] != 0x30:
        raise DocumentError(f"{what} is not a DER ECDSA signature")
    return der


def _https(url: Any, what: str) -> str:
    u = _str(url, what, 4096)
    if not u.startswith("https://") or not u.isascii() or any(ord(c) < 0x21 or c == "\x7f" for c in u):
        raise DocumentError(f"{what} must be an https:// URL")
    return u


def _only(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(str(k) for k in set(d) - allowed)
    if extra:
        raise DocumentError(f"{where}: unknown field(s) {', '.join(extra)}")


def parse(document: Any) -> UpdateSpec:
    """An UpdateSpec from a job document (dict, or JSON text/bytes)."""
    if isinstance(document, (bytes, str)):
        if len(document) > MAX_DOCUMENT_BYTES:
            raise DocumentError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError):
            raise DocumentError("document is not valid JSON") from None
    if not isinstance(document, dict):
        raise DocumentError("document must be a JSON object")
    try:
        encoded = len(json.dumps(document, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        raise DocumentError("document is not plain JSON") from None
    if encoded > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
    if "afr_ota" in document:
        return _afr(document)
    if document.get("operation") == "ota-update":
        return _signed(document) if document.get("schema") == 2 else _ours(document)
    raise DocumentError('not an OTA document (no operation "ota-update" and no afr_ota)')


def _ours(d: dict) -> UpdateSpec:
    _only(d, {"operation", "schema", "target", "version", "artifact", "signature"}, "document")
    if d.get("schema") != 1:
        raise DocumentError("schema must be 1")
    target = _str(d.get("target"), "target", 64)
    if not NAME_RE.fullmatch(target):
        raise DocumentError("target must be a plain name")
    version = _version(d.get("version"), "version")
    a = d.get("artifact")
    if not isinstance(a, dict):
        raise DocumentError("artifact must be an object")
    _only(a, {"name", "size", "sha256", "url", "stream"}, "artifact")
    name = _str(a.get("name"), "artifact.name", 128)
    if not NAME_RE.fullmatch(name):
        raise DocumentError("artifact.name must be a plain file name (no paths)")
    size = _int(a.get("size"), "artifact.size", 1, MAX_ARTIFACT_BYTES)
    sha = _str(a.get("sha256"), "artifact.sha256", 64).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DocumentError("artifact.sha256 must be 64 hex digits")
    url, stream_id, file_id = _location(a)
    return UpdateSpec("our", target, version, name, size, sha, url, stream_id, file_id, _signature_field(d))


def _location(a: dict) -> tuple[str | None, str | None, int | None]:
    url = stream_id = file_id = None
    if ("url" in a) == ("stream" in a):
        raise DocumentError("artifact needs exactly one of url and stream")
    if "url" in a:
        url = _https(a["url"], "artifact.url")
    else:
        s = a["stream"]
        if not isinstance(s, dict):
            raise DocumentError("artifact.stream must be an object")
        _only(s, {"id", "file_id"}, "artifact.stream")
        stream_id = _str(s.get("id"), "artifact.stream.id", 128)
        if not STREAM_RE.fullmatch(stream_id):
            raise DocumentError("artifact.stream.id has invalid characters")
        file_id = _int(s.get("file_id", 0), "artifact.stream.file_id", 0, 255)
    return url, stream_id, file_id


def _signature_field(d: dict) -> bytes:
    sig = d.get("signature")
    if not isinstance(sig, dict):
        raise DocumentError("signature must be an object")
    _only(sig, {"algorithm", "value"}, "signature")
    if sig.get("algorithm") != "ECDSA-P256-SHA256":
        raise DocumentError("signature.algorithm must be ECDSA-P256-SHA256")
    return _signature(sig.get("value"), "signature.value")


def _signed(d: dict) -> UpdateSpec:
    """Schema 2: the manifest's bytes and where to fetch; its fields are read once its signature verifies."""
    _only(d, {"operation", "schema", "manifest", "artifact", "signature"}, "document")
    raw = _str(d.get("manifest"), "manifest", MAX_MANIFEST_B64)
    try:
        manifest = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise DocumentError("manifest is not base64") from None
    a = d.get("artifact")
    if not isinstance(a, dict):
        raise DocumentError("artifact must be an object")
    _only(a, {"url", "stream"}, "artifact")
    url, stream_id, file_id = _location(a)
    return UpdateSpec(
        "signed", None, None, "", 0, None, url, stream_id, file_id, _signature_field(d), manifest=manifest
    )


def _afr(d: dict) -> UpdateSpec:
    a = d["afr_ota"]
    if not isinstance(a, dict):
        raise DocumentError("afr_ota must be an object")
    protocols = a.get("protocols")
    if not isinstance(protocols, list) or not protocols or not all(p in ("MQTT", "HTTP") for p in protocols):
        raise DocumentError("afr_ota.protocols must list MQTT and/or HTTP")
    files = a.get("files")
    if not isinstance(files, list) or len(files) != 1 or not isinstance(files[0], dict):
        raise DocumentError("afr_ota.files must hold exactly one file")
    f = files[0]
    path = _str(f.get("filepath"), "afr_ota.files[0].filepath", 255)
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    if ".." in path.replace("\\", "/").split("/") or not NAME_RE.fullmatch(name):
        raise DocumentError("afr_ota.files[0].filepath must name a plain file (no '..')")
    size = _int(f.get("filesize"), "afr_ota.files[0].filesize", 1, MAX_ARTIFACT_BYTES)
    sig = _signature(f.get("sig-sha256-ecdsa"), "afr_ota.files[0].sig-sha256-ecdsa")
    url = stream_id = file_id = None
    if "HTTP" in protocols and f.get("update_data_url"):
        url = _https(f["update_data_url"], "afr_ota.files[0].update_data_url")
    elif "MQTT" in protocols:
        stream_id = _str(a.get("streamname"), "afr_ota.streamname", 128)
        if not STREAM_RE.fullmatch(stream_id):
            raise DocumentError("afr_ota.streamname has invalid characters")
        file_id = _int(f.get("fileid", 0), "afr_ota.files[0].fileid", 0, 255)
    else:
        raise DocumentError("afr_ota: HTTP without update_data_url")
    return UpdateSpec("afr_ota", None, None, name, size, None, url, stream_id, file_id, sig, path)
