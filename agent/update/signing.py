"""Update signatures: ECDSA P-256 over SHA-256 of the whole artifact, DER, checked against the
code-signing certificate pinned on the device. The job document never supplies its own trust.
"""

from __future__ import annotations

from pathlib import Path

from agent.base.digest import stream_sha256
from agent.base.errors import AgentError
from agent.base.x509lite import subject_public_key_info


class SignatureError(AgentError):
    pass


def load_pinned_key(cert_path: Path):
    """The awscrt EC key of the pinned code-signing certificate; refuses anything unusable."""
    import awscrt.crypto

    from agent.base.pemfile import read_regular_file  # never blocks on a FIFO

    try:
        spki = subject_public_key_info(read_regular_file(cert_path, 64 * 1024))
    except OSError as e:
        raise SignatureError(f"{cert_path}: cannot read the pinned code-signing certificate ({e.strerror})") from None
    except ValueError as e:
        raise SignatureError(f"{cert_path}: the pinned code-signing certificate {e}") from None
    if spki is None:
        raise SignatureError(f"{cert_path}: not a valid code-signing certificate")
    try:
        return awscrt.crypto.EC.new_key_from_der_data(spki)
    except Exception:
        raise SignatureError(
            f"{cert_path}: the code-signing certificate's key is not an EC key awscrt can use"
        ) from None


def verify_digest(pinned_key, sha256_digest: bytes, signature_der: bytes) -> bool:
    if len(sha256_digest) != 32 or not signature_der or len(signature_der) > 80:
        return False
    try:
        return bool(pinned_key.verify(sha256_digest, signature_der))
    except Exception:  # malformed DER from the network: not a valid signature
        return False


def sha256_file(path: Path, chunk: int = 1 << 20) -> bytes:
    h = stream_sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.digest()
            h.update(b)
