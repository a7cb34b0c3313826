"""The vendor's side of updates, for the demo and the tests: a code-signing key with its certificate
(the device pins the certificate), release tarballs, and update job documents in our schema."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .pki import CertificateAuthority, pem


@dataclass
class CodeSigner:
    directory: Path
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority(self.directory / "ca")
        self.cert_path = self.directory / "codesign.pem"
        self.cert_path.write_bytes(pem(ca.sign_public_key(self.key.public_key(), "code-signer")))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()

    def manifest(
        self, target: str, version: str, name: str, data: bytes, *, size: int | None = None, sha256: str | None = None
    ) -> tuple[bytes, str]:
        """A release manifest for `data` (agent.manifest) and its signature: what a vendor's signing step
        produces once per release, for every device target kind."""
        from agent.update.manifest import make

        raw = make(
            target, version, name, len(data) if size is None else size, sha256 or hashlib.sha256(data).hexdigest()
        )
        return raw, self.sign(raw)


def make_tar(files: dict[str, bytes], version: str | None = None, target: str | None = None) -> bytes:
    """A release tarball; VERSION (and TARGET) at the top when given: signed with the artifact, they bind
    what a legacy document (schema 1, afr_ota) installs as."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        items = dict(files)
        if target is not None:
            items = {"TARGET": target.encode() + b"\n", **items}
        if version is not None:
            items = {"VERSION": version.encode() + b"\n", **items}
        for name, data in items.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def signed_doc(
    signer: CodeSigner,
    target: str,
    version: str,
    name: str,
    data: bytes,
    *,
    url: str | None = None,
    stream: tuple[str, int] | None = None,
    size: int | None = None,
    sha256: str | None = None,
    manifest: tuple[bytes, str] | None = None,
) -> dict:
    """A schema 2 update document: the signed manifest binds target, version, name, size and SHA-256."""
    raw, signature = manifest or signer.manifest(target, version, name, data, size=size, sha256=sha256)
    art: dict = {"url": url} if url else {"stream": {"id": stream[0], "file_id": stream[1]}}
    return {
        "operation": "ota-update",
        "schema": 2,
        "manifest": base64.b64encode(raw).decode(),
        "artifact": art,
        "signature": {"algorithm": "ECDSA-P256-SHA256", "value": signature},
    }


def our_doc(
    target: str,
    version: str,
    name: str,
    data: bytes,
    signature: str,
    *,
    url: str | None = None,
    stream: tuple[str, int] | None = None,
    size: int | None = None,
    sha256: str | None = None,
) -> dict:
    art: dict = {
        "name": name,
        "size": len(data) if size is None else size,
        "sha256": sha256 or hashlib.sha256(data).hexdigest(),
    }
    if url:
        art["url"] = url
    else:
        art["stream"] = {"id": stream[0], "file_id": stream[1]}
    return {
        "operation": "ota-update",
        "schema": 1,
        "target": target,
        "version": version,
        "artifact": art,
        "signature": {"algorithm": "ECDSA-P256-SHA256", "value": signature},
    }
