"""PKCS#10 certificate signing requests whose signature is made by a callback (the token).

Pure: takes the public key and a signer, returns PEM. Fleet provisioning
(CreateCertificateFromCsr) and rotation send this to the cloud; AWS ignores the subject and
takes the public key, but a CN equal to the thing name keeps logs readable.
"""

from __future__ import annotations

from collections.abc import Callable

from asn1crypto import csr, keys, pem


def build_csr(public_key_der: bytes, common_name: str, sign: Callable[[bytes], bytes]) -> bytes:
    """`sign(tbs)` must return a DER ECDSA-with-SHA256 signature over `tbs`."""
    info = csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": csr.Name.build({"common_name": common_name}),
            "subject_pk_info": keys.PublicKeyInfo.load(public_key_der),
            "attributes": [],
        }
    )
    signature = sign(info.dump())
    req = csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": signature,
        }
    )
    return pem.armor("CERTIFICATE REQUEST", req.dump())
