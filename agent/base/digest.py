"""SHA-256 without mapping a second crypto library into the daemon.

`hashlib` loads OpenSSL's libcrypto (+3.4 MiB resident, for the rest of the agent's life:
bench/lifecycle_rss.py) although the daemon already carries a full crypto library, aws-lc inside
awscrt. Small inputs (certificate ids, job keys, state checksums, manifests) use CPython's built-in
SHA-256; large streams (downloads, artifacts) use awscrt's when awscrt is loaded (the daemon), else
hashlib (short-lived commands and the root helper, where its speed matters more than its size).
"""

from __future__ import annotations

import sys
from typing import Any


def _builtin() -> Any:
    try:
        import _sha256 as mod  # CPython <= 3.11
    except ImportError:
        try:
            import _sha2 as mod  # CPython >= 3.12
        except ImportError:
            import hashlib as mod
    return mod.sha256


def sha256(data: bytes = b"") -> Any:
    """A hashlib-style SHA-256 object for small inputs (about 370 MiB/s: not for artifacts)."""
    return _builtin()(data)


class _CrtSha256:
    """awscrt's SHA-256 (aws-lc, about 2 GiB/s) with the hashlib methods the agent uses."""

    def __init__(self) -> None:
        from awscrt.crypto import Hash

        self._h = Hash.sha256_new()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data if isinstance(data, bytes) else bytes(data))  # it takes bytes only

    def digest(self) -> bytes:
        return self._h.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()


def stream_sha256() -> Any:
    """A SHA-256 object for large streams: awscrt's when it is loaded already, else hashlib's."""
    if "awscrt" in sys.modules:
        return _CrtSha256()
    import hashlib

    return hashlib.sha256()


def token_hex(n: int) -> str:
    """Like secrets.token_hex, without `secrets` (which loads hmac, and hmac libcrypto)."""
    import os

    return os.urandom(n).hex()
