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


def make_tar(files: dict[str, bytes], version: str | None = None) -> bytes:
    """A release tarball; VERSION at the top when a version is given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        items = dict(files)
        if version is not None:
            items = {"VERSION": version.encode() + b"\n", **items}
        for name, data in items.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def our_doc(target: str, version: str, name: str, data: bytes, signature: str, *, url: str | None = None,
            stream: tuple[str, int] | None = None, size: int | None = None, sha256: str | None = None) -> dict:
    art: dict = {"name": name, "size": len(data) if size is None else size,
                 "sha256": sha256 or hashlib.sha256(data).hexdigest()}
    if url:
        art["url"] = url
    else:
        art["stream"] = {"id": stream[0], "file_id": stream[1]}
    return {"operation": "ota-update", "schema": 1, "target": target, "version": version, "artifact": art,
            "signature": {"algorithm": "ECDSA-P256-SHA256", "value": signature}}
