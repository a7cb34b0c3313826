"""OTA job documents (ours and afr_ota) and update signatures: strict parsing, pinned-key checks."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.update.otadoc import MAX_DOCUMENT_BYTES, DocumentError, parse, version_key
from agent.update.signing import load_pinned_key, sha256_file, verify_digest

KEY = ec.generate_private_key(ec.SECP256R1())
DATA = b"new firmware" * 1000
SIG = base64.b64encode(KEY.sign(DATA, ec.ECDSA(hashes.SHA256()))).decode()

OURS = {
    "operation": "ota-update",
    "schema": 1,
    "target": "app",
    "version": "1.2.3",
    "artifact": {
        "name": "app-1.2.3.tar",
        "size": len(DATA),
        "sha256": hashlib.sha256(DATA).hexdigest(),
        "url": "https://localhost:8443/ota/app-1.2.3.tar?X-Expires=1&X-Signature=ab",
    },
    "signature": {"algorithm": "ECDSA-P256-SHA256", "value": SIG},
}
AFR = {
    "afr_ota": {
        "protocols": ["MQTT"],
        "streamname": "AFR_OTA-1234",
        "files": [
            {
                "filepath": "/opt/app/app.bin",
                "filesize": len(DATA),
                "fileid": 0,
                "certfile": "codesign.crt",
                "fileType": 0,
                "sig-sha256-ecdsa": SIG,
            }
        ],
    }
}


def test_valid_documents_parse():
    s = parse(OURS)
    assert (s.source, s.target, s.version, s.name, s.size) == ("our", "app", "1.2.3", "app-1.2.3.tar", len(DATA))
    assert s.url.startswith("https://") and s.stream_id is None
    a = parse(json.dumps(AFR))
    assert (a.source, a.name, a.stream_id, a.file_id, a.sha256) == ("afr_ota", "app.bin", "AFR_OTA-1234", 0, None)
    http = copy.deepcopy(AFR)
    http["afr_ota"]["protocols"] = ["HTTP"]
    http["afr_ota"]["files"][0]["update_data_url"] = "https://s3.example/app.bin"
    assert parse(http).url == "https://s3.example/app.bin"
    assert version_key("1.10.0") > version_key("1.9.9")
    with pytest.raises(ValueError):
        version_key("2")  # one spelling per version: 2.0.0


def test_signed_documents_carry_the_manifest_bytes():
    from localcloud.vendor import CodeSigner, signed_doc

    signer = CodeSigner.__new__(CodeSigner)
    signer.key = KEY
    doc = signed_doc(signer, "app", "1.2.3", "app.tar", DATA, url="https://localhost/x")
    s = parse(doc)
    assert s.source == "signed" and s.manifest and s.target is None and s.version is None and not s.bound
    with pytest.raises(DocumentError, match="unknown field"):
        parse({**doc, "version": "99.0.0"})  # labels have no place next to a signed manifest
    with pytest.raises(DocumentError, match="manifest is not base64"):
        parse({**doc, "manifest": "***"})


def mutate(doc, path, value):
    d = copy.deepcopy(doc)
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    if value is KeyError:
        if isinstance(cur, list):
            del cur[path[-1]]
        else:
            cur.pop(path[-1], None)
    else:
        cur[path[-1]] = value
    return d


@pytest.mark.parametrize(
    "path,value,why",
    [
        (("artifact", "name"), "../../etc/passwd", "plain file name"),
        (("artifact", "name"), "a/b.tar", "plain file name"),
        (("artifact", "url"), "http://insecure/x", "https://"),
        (("artifact", "size"), -1, "artifact.size"),
        (("artifact", "size"), True, "artifact.size"),
        (("artifact", "sha256"), "xyz", "64 hex"),
        (("signature", "value"), "not base64!", "base64"),
        (("signature", "value"), base64.b64encode(b"\x01" * 40).decode(), "DER ECDSA"),
        (("signature", "algorithm"), "RSA", "ECDSA-P256-SHA256"),
        (("version",), "1.2.3-beta", "MAJOR.MINOR.PATCH"),
        (("version",), "1.2", "MAJOR.MINOR.PATCH"),
        (("target",), "../app", "plain name"),
        (("schema",), 3, "schema must be 1"),
        (("artifact", "extra"), 1, "unknown field"),
        (("artifact", "url"), KeyError, "exactly one of url and stream"),
    ],
)
def test_bad_documents_are_refused_with_the_reason(path, value, why):
    with pytest.raises(DocumentError, match=why):
        parse(mutate(OURS, path, value))


def test_afr_path_traversal_and_oversized_documents():
    bad = copy.deepcopy(AFR)
    bad["afr_ota"]["files"][0]["filepath"] = "../../../etc/shadow"
    with pytest.raises(DocumentError, match="no '..'"):
        parse(bad)
    with pytest.raises(DocumentError, match="larger than"):
        parse(json.dumps({**OURS, "pad": "x" * MAX_DOCUMENT_BYTES}))
    with pytest.raises(DocumentError, match="not an OTA document"):
        parse({"operation": "reboot"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=15,
)
paths = st.sampled_from(
    [
        ("artifact", "name"),
        ("artifact", "size"),
        ("artifact", "sha256"),
        ("artifact", "url"),
        ("artifact", "stream"),
        ("signature", "value"),
        ("signature", "algorithm"),
        ("version",),
        ("target",),
        ("schema",),
        ("operation",),
        ("artifact",),
        ("signature",),
    ]
)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(paths, st.one_of(json_values, st.just(KeyError)))
def test_mutated_documents_never_crash_the_parser(path, value):
    try:
        spec = parse(mutate(OURS, path, value))
    except DocumentError:
        return
    assert spec.name and spec.size > 0 and spec.signature[0] == 0x30


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(
    st.one_of(
        json_values,
        st.binary(max_size=200),
        st.dictionaries(st.sampled_from(["afr_ota", "operation", "x"]), json_values, max_size=3),
    )
)
def test_arbitrary_input_never_crashes_the_parser(doc):
    with contextlib.suppress(DocumentError):
        parse(doc)


def test_signatures_are_checked_against_the_pinned_key_only(tmp_path):
    from localcloud.pki import CertificateAuthority, pem

    ca = CertificateAuthority(tmp_path / "ca")
    signer = ca.sign_public_key(KEY.public_key(), "code-signer")
    (tmp_path / "codesign.pem").write_bytes(pem(signer))
    pinned = load_pinned_key(tmp_path / "codesign.pem")
    (tmp_path / "art").write_bytes(DATA)
    digest = sha256_file(tmp_path / "art")
    sig = base64.b64decode(SIG)
    assert verify_digest(pinned, digest, sig)
    assert not verify_digest(pinned, hashlib.sha256(DATA + b"x").digest(), sig)  # tampered artifact
    other = ec.generate_private_key(ec.SECP256R1()).sign(DATA, ec.ECDSA(hashes.SHA256()))
    assert not verify_digest(pinned, digest, other)  # signed by a different key
    assert not verify_digest(pinned, digest, b"\x30\x00garbage")
    assert not verify_digest(pinned, digest[:16], sig)


afr_paths = st.sampled_from(
    [
        ("afr_ota",),
        ("afr_ota", "protocols"),
        ("afr_ota", "streamname"),
        ("afr_ota", "files"),
        ("afr_ota", "files", 0),
        ("afr_ota", "files", 0, "filepath"),
        ("afr_ota", "files", 0, "filesize"),
        ("afr_ota", "files", 0, "fileid"),
        ("afr_ota", "files", 0, "sig-sha256-ecdsa"),
        ("afr_ota", "files", 0, "update_data_url"),
    ]
)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(afr_paths, st.one_of(json_values, st.just(KeyError)))
def test_mutated_afr_documents_never_crash_the_parser(path, value):
    try:
        spec = parse(mutate(AFR, path, value))
    except DocumentError:
        return
    assert spec.name and ".." not in spec.name and spec.size > 0 and spec.signature[0] == 0x30
