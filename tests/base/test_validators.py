"""Property tests of what decides trust from network bytes: the provisioning answer validators
(agent.answers), the version parser (agent.versions) and the release manifest (agent.manifest).

Each runs at least 1,000 generated cases and checks that only the documented error type comes out
(AnswerError, VersionError, ManifestError), and that whatever is accepted satisfies the documented
format. Hand-picked cases pin the review's findings.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base.x509lite import parse_certificate
from agent.identity import answers
from agent.identity.answers import AnswerError
from agent.update import manifest
from agent.update.manifest import ManifestError
from agent.update.versions import VersionError, installed_key, parse_version

MANY = settings(max_examples=1000, deadline=None, derandomize=True, database=None)
NOW = 1_800_000_000.0


def _cert_for(key, cn="gw-1", days=365, not_before=None) -> bytes:
    ca = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.fromtimestamp(NOW - 60, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(ca, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _csr(key, cn="SN-1") -> str:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


KEY = ec.generate_private_key(ec.SECP256R1())
CSR = _csr(KEY)
PEM = _cert_for(KEY)
CID = hashlib.sha256(x509.load_pem_x509_certificate(PEM).public_bytes(serialization.Encoding.DER)).hexdigest()


# -- versions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "6.0",
        "06.0.0",
        "\u0666.0.0",
        "9.0.0\n",
        " 1.0.0",
        "1.0.0 ",
        "1.2.3.4",
        "1..0",
        "1.0.0-rc1",
        "+1.0.0",
        "1.0.00",
        "1234567890.0.0",
        "",
        "1_0.0.0",
        "\uff11.0.0",
    ],
)
def test_versions_have_one_spelling(text):
    with pytest.raises(VersionError):
        parse_version(text)


def test_versions_compare_numerically():
    assert parse_version("1.10.0") > parse_version("1.9.9") > parse_version("0.0.0")
    assert parse_version("999999999.0.0") == (999999999, 0, 0)
    assert installed_key("1.0") == installed_key("1.0.0")  # what older agents installed stays comparable


@MANY
@given(
    st.one_of(
        st.text(max_size=40),
        st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}\n?", fullmatch=True),
        st.integers(),
        st.none(),
        st.binary(max_size=10),
        st.lists(st.integers(), max_size=3),
    )
)
def test_version_parser_only_raises_version_error(text):
    try:
        key = parse_version(text)
    except VersionError:
        return
    assert re.fullmatch(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", text, re.ASCII)
    assert ".".join(map(str, key)) == text  # the canonical spelling IS the text


# -- provisioning answers ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["#", "+", "gw/../x", "x" * 129, "", 12345, None, "gw 1", "gw\n1", "gw-\u00e9"])
def test_thing_names_follow_aws_pattern(name):
    with pytest.raises(AnswerError):
        answers.thing_name(name)


def test_an_honest_answer_passes_and_each_lie_is_named():
    issued = answers.issued_certificate(PEM.decode(), CID, "tok-" + "a" * 300, CSR, NOW)
    assert issued.certificate_id == CID and issued.pem.endswith(b"\n")
    other = _cert_for(ec.generate_private_key(ec.SECP256R1()))
    other_id = hashlib.sha256(
        x509.load_pem_x509_certificate(other).public_bytes(serialization.Encoding.DER)
    ).hexdigest()
    lies = [
        ((other.decode(), other_id, "t", CSR, NOW), "not for this device's key"),
        ((PEM.decode(), "0" * 64, "t", CSR, NOW), "is not the SHA-256"),
        ((PEM.decode(), CID[:16], "t", CSR, NOW), "64 lowercase hex"),
        ((PEM.decode(), CID, "A" * (1 << 20), CSR, NOW), "longer than"),
        ((PEM.decode(), CID, "a b", CSR, NOW), "spaces or control"),
        (("garbage", CID, "t", CSR, NOW), "not one X.509 certificate"),
        ((PEM.decode() + PEM.decode(), CID, "t", CSR, NOW), "not one X.509 certificate"),
        ((PEM.decode(), CID, "t", CSR, NOW + 400 * 86400), "expired"),
        ((PEM.decode(), CID, "t", CSR, NOW - 86400), "not valid yet"),
    ]
    for args, why in lies:
        with pytest.raises(AnswerError, match=why):
            answers.issued_certificate(*args)


def _mutations():
    pem_text = PEM.decode()
    body = "".join(pem_text.splitlines()[1:-1])
    der = base64.b64decode(body)
    mutated_der = st.builds(
        lambda i, b: der[:i] + bytes([b]) + der[i + 1 :], st.integers(0, len(der) - 1), st.integers(0, 255)
    )
    truncated = st.builds(lambda i: der[:i], st.integers(0, len(der)))

    def as_pem(d):
        return "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(d).decode() + "\n-----END CERTIFICATE-----\n"

    return st.one_of(
        st.text(max_size=200),
        mutated_der.map(as_pem),
        truncated.map(as_pem),
        st.just(pem_text),
        st.integers(),
        st.none(),
        st.binary(max_size=50),
    )


@MANY
@given(
    _mutations(),
    st.one_of(st.just(CID), st.text(max_size=70), st.none()),
    st.one_of(st.just("token"), st.text(max_size=20), st.integers()),
)
def test_certificate_answers_only_raise_answer_error(pem, cid, token):
    try:
        issued = answers.issued_certificate(pem, cid, token, CSR, NOW)
    except AnswerError as e:
        assert str(e) and len(str(e)) < 400 and "\n" not in str(e)
        return
    # Accepted: it is exactly a certificate for our key, with its own id.
    assert issued.certificate.spki == parse_certificate(PEM).spki and issued.certificate_id == issued.certificate.id


@MANY
@given(st.one_of(st.text(max_size=200), st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3))))
def test_thing_name_validator_only_raises_answer_error(value):
    try:
        name = answers.thing_name(value)
    except AnswerError:
        return
    assert re.fullmatch(r"[a-zA-Z0-9:_-]{1,128}", name, re.ASCII)


@MANY
@given(st.binary(max_size=600))
def test_certificate_parser_only_raises_value_error(data):
    with contextlib.suppress(ValueError):
        parse_certificate(data)


# -- release manifests ---------------------------------------------------------------------------------
SIGNER = ec.generate_private_key(ec.SECP256R1())


def _pinned():
    import awscrt.crypto

    spki = SIGNER.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return awscrt.crypto.EC.new_key_from_der_data(spki)


PINNED = _pinned()
GOOD = manifest.make("app", "1.2.3", "app.tar", 10, "a" * 64)


def _sign(raw: bytes) -> bytes:
    return SIGNER.sign(raw, ec.ECDSA(hashes.SHA256()))


def test_a_manifest_verifies_and_a_relabelled_one_does_not():
    m = manifest.verify(PINNED, GOOD, _sign(GOOD))
    assert (m.target, m.version, m.name, m.size) == ("app", "1.2.3", "app.tar", 10)
    relabelled = GOOD.replace(b"1.2.3", b"99.0.0")
    with pytest.raises(ManifestError, match="signature does not verify"):
        manifest.verify(PINNED, relabelled, _sign(GOOD))


manifest_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**40),
    st.text(max_size=70),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
)


@MANY
@given(st.sampled_from(sorted(manifest.KEYS) + ["extra"]), manifest_values)
def test_mutated_manifests_only_raise_manifest_error(key, value):
    import json

    doc = json.loads(GOOD)
    doc[key] = value
    raw = json.dumps(doc).encode()
    try:
        m = manifest.verify(PINNED, raw, _sign(raw))
    except ManifestError:
        return
    parse_version(m.version)
    assert manifest.NAME_RE.fullmatch(m.name) and m.size >= 1 and re.fullmatch(r"[0-9a-f]{64}", m.sha256)


@MANY
@given(st.binary(max_size=300), st.binary(max_size=80))
def test_arbitrary_manifest_bytes_and_signatures_only_raise_manifest_error(raw, sig):
    try:
        manifest.verify(PINNED, raw, sig)
    except ManifestError:
        return
    raise AssertionError("a random signature verified")
