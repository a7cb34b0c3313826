"""Device keys on a PKCS#11 token (TPM 2.0 via tpm2-pkcs11, an HSM, or SoftHSM in tests).

Keys are generated ON the token, stored, sensitive and not extractable: the private half never
exists outside it. Signing (the CSR, and the TLS handshake through awscrt) happens on the token.
One code path serves SoftHSM and tpm2-pkcs11; the templates below avoid the attributes
tpm2-pkcs11 rejects (see shared/reference/pkcs11-softhsm-tpm.md).

python-pkcs11 costs about 11 MB resident, so the daemon does not import this module on its normal
path; key generation and CSRs run in a short-lived process (the `iot-agent keys` commands).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.errors import KeystoreError


@dataclass(frozen=True)
class KeyInfo:
    label: str
    key_id: str  # hex of CKA_ID
    key_type: str
    public_key_der: bytes | None  # SubjectPublicKeyInfo, when the public half is on the token


@dataclass
class Keystore:
    """An open, logged-in session on one token."""

    # A pkcs11.Session. Any, not that class: python-pkcs11 ships no type information, and it is imported
    # only inside the methods (11 MB resident), never at module level.
    session: Any

    # -- keys -------------------------------------------------------------------------------
    def generate_ec_key(self, label: str, curve: str = "secp256r1") -> KeyInfo:
        """Create a P-256 key pair on the token under `label`; refuses to shadow an existing label."""
        import pkcs11
        from pkcs11 import Attribute, KeyType
        from pkcs11.constants import DEFAULT
        from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

        if self.find(label):
            raise KeystoreError(
                f"a key labelled {label!r} already exists on the token; delete it first or use another label"
            )
        key_id = os.urandom(16)
        try:
            params = self.session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            pub, _priv = params.generate_keypair(
                store=True,
                label=label,
                id=key_id,
                # python-pkcs11's defaults ask for capabilities tpm2-pkcs11 refuses ("attr mismatch").
                public_template={Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT, Attribute.VERIFY: True},
                private_template={
                    Attribute.DECRYPT: DEFAULT,
                    Attribute.UNWRAP: DEFAULT,
                    Attribute.DERIVE: DEFAULT,
                    Attribute.SIGN: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.TOKEN: True,
                },
            )
        except pkcs11.PKCS11Error as e:
            raise KeystoreError(f"key generation on the token failed: {e.__class__.__name__}") from None
        return KeyInfo(label=label, key_id=key_id.hex(), key_type="EC", public_key_der=encode_ec_public_key(pub))

    def find(self, label: str) -> KeyInfo | None:
        for k in self.list_keys():
            if k.label == label:
                return k
        return None

    def list_keys(self) -> list[KeyInfo]:
        """Private keys on the token, with their public halves where present."""
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        pubs = {}
        for obj in self.session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
            pubs[(obj.label, bytes(obj[Attribute.ID] or b""))] = obj
        out = []
        for obj in self.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            kid = bytes(obj[Attribute.ID] or b"")
            pub = pubs.get((obj.label, kid))
            der = None
            if pub is not None and obj.key_type == KeyType.EC:
                der = encode_ec_public_key(pub)
            out.append(KeyInfo(label=obj.label, key_id=kid.hex(), key_type=obj.key_type.name, public_key_der=der))
        return sorted(out, key=lambda k: k.label)

    def delete(self, label: str) -> int:
        """Delete every key object (private, public) with this label; returns how many."""
        from pkcs11 import Attribute, ObjectClass

        n = 0
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in list(self.session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})):
                obj.destroy()
                n += 1
        return n

    # -- signing ----------------------------------------------------------------------------
    def sign_sha256(self, label: str, data: bytes) -> bytes:
        """ECDSA over SHA-256 of `data` with the token key, DER-encoded.

        SoftHSM 2.6 lacks CKM_ECDSA_SHA256, so the hash is computed here and the token signs the
        digest with CKM_ECDSA; the result is the same signature.
        """
        from pkcs11 import Attribute, Mechanism, ObjectClass
        from pkcs11.util.ec import encode_ecdsa_signature

        keys = list(self.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
        if not keys:
            raise KeystoreError(f"no private key labelled {label!r} on the token")
        if len(keys) > 1:
            raise KeystoreError(f"{len(keys)} private keys are labelled {label!r}; labels must be unique")
        raw = keys[0].sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
        return encode_ecdsa_signature(raw)

    def make_csr(self, label: str, common_name: str) -> bytes:
        """A PEM PKCS#10 request for the token key `label`, signed on the token."""
        from agent.identity.csr import build_csr

        info = self.find(label)
        if info is None or info.public_key_der is None:
            raise KeystoreError(f"no EC key pair labelled {label!r} on the token; generate it first")
        return build_csr(info.public_key_der, common_name, lambda tbs: self.sign_sha256(label, tbs))


@contextmanager
def open_token(library: Path, token_label: str, pin: str, rw: bool = True) -> Iterator[Keystore]:
    """Log in to the token; the library is finalised on exit so another process (or awscrt) can use it."""
    import pkcs11

    try:
        lib = pkcs11.lib(str(library))
    except Exception as e:
        raise KeystoreError(f"{library}: cannot load the PKCS#11 module ({e.__class__.__name__})") from None
    try:
        try:
            token = lib.get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            raise KeystoreError(
                f"no PKCS#11 token labelled {token_label!r} in {library}; initialise it or fix pkcs11.token_label"
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise KeystoreError(f"several tokens are labelled {token_label!r}; labels must be unique") from None
        try:
            session = token.open(user_pin=pin, rw=rw)
        except pkcs11.PinIncorrect:
            raise KeystoreError(
                f"token {token_label!r} refused the PIN (wrong PIN; a TPM locks out after repeated failures)"
            ) from None
        except pkcs11.PinLocked:
            raise KeystoreError(f"token {token_label!r}: the user PIN is locked; unlock it with the SO PIN") from None
        except pkcs11.PKCS11Error as e:
            raise KeystoreError(f"token {token_label!r}: login failed ({e.__class__.__name__})") from None
        try:
            yield Keystore(session)
        finally:
            session.close()
    finally:
        # C_Finalize: a TPM otherwise keeps this process's objects and sessions until it exits.
        with contextlib.suppress(Exception):  # finalize() of a module that failed to load
            lib.finalize()
