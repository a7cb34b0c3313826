"""micropython/p256.py (P-256 ECDSA, CSRs, SEC1 keys, SPKI/certificate parsing) under the real MicroPython
interpreter (its unix port) and under CPython, cross-checked with `cryptography` and OpenSSL; the key and a
certificate for its CSR then authenticate a TLS session made by the shipped board.tls() (Mbed TLS) to OpenSSL.

One interpreter run per implementation does every case; the tests below read its results.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from mpkit import REPO, LoopbackTLSServer, run_unix

from localcloud.pki import CertificateAuthority

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
SHA256 = hashes.SHA256()
CN = "mp-thing-0042"

# RFC 6979 appendix A.2.5: P-256, SHA-256
RFC_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
RFC_UY = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
RFC_RS = {
    "sample": (
        0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
        0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8,
    ),
    "test": (
        0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
        0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083,
    ),
}

# The same script runs in both interpreters; each prelude supplies rnd(n) and ms() (mpkit's supplies PARAMS).
PRELUDE_MP = """
import os, time
rnd = os.urandom
def ms():
    return time.ticks_ms()
"""
PRELUDE_CPY = f"""
import json, os, sys, time
sys.path.insert(0, {str(REPO / "micropython")!r})
PARAMS = json.loads(sys.argv[1])
rnd = os.urandom
def ms():
    return int(time.monotonic() * 1000)
"""
BATCH = """
import hashlib, json
import p256

H = bytes.fromhex
out = {}

# rejection sampling: 2^256-1 and 0 are not private keys, the third draw is
draws = [b"\\xff" * 32, bytes(32), H(PARAMS["known_d"])]
d, pub = p256.keygen(lambda n: draws.pop(0))
out["rejection"] = ["%064x" % d, pub.hex(), len(draws)]

# a key of its own
t0 = ms()
d, pub = p256.keygen(rnd)
t1 = ms()
dg = hashlib.sha256(b"timing").digest()
sig = p256.sign(d, dg)
t2 = ms()
ok = p256.verify(pub, dg, sig)
t3 = ms()
out["times"] = [t1 - t0, t2 - t1, t3 - t2, ok]
out["own"] = {"d": "%064x" % d, "pub": pub.hex(), "key_pem": p256.pem("EC PRIVATE KEY", p256.key_der(d, pub)),
              "csr_pem": p256.pem("CERTIFICATE REQUEST", p256.csr_der(d, pub, PARAMS["cn"])),
              "sigs": [p256.sign(d, H(x)).hex() for x in PARAMS["digests"]]}

# RFC 6979 A.2.5
x = int(PARAMS["rfc_x"], 16)
out["rfc_pub"] = p256.keygen(lambda n: x.to_bytes(32, "big"))[1].hex()
out["rfc"] = {m: p256.sign(x, hashlib.sha256(m.encode()).digest()).hex() for m in ("sample", "test")}

# the square-and-multiply inverse, for builds without 3-argument pow()
p256._pow = p256._sqm
t0 = ms()
sig = p256.sign(x, hashlib.sha256(b"sample").digest())
out["sqm"] = [sig.hex(), p256.verify(H(out["rfc_pub"]), hashlib.sha256(b"sample").digest(), sig), ms() - t0]
p256._pow = pow

def attempt(f, *args):
    try:
        return f(*args)
    except Exception as e:
        return "%s: %s" % (type(e).__name__, e)

def hexed(r):
    return r.hex() if isinstance(r, bytes) else r

out["verify"] = [attempt(p256.verify, H(p), H(g), H(s)) for p, g, s in PARAMS["verify"]]
out["verify_types"] = [attempt(p256.verify, a, b, c) for a, b, c in [
    (None, bytes(32), b"0\\x00"), (H(PARAMS["verify"][0][0]), None, H(PARAMS["verify"][0][2])),
    (H(PARAMS["verify"][0][0]), H(PARAMS["verify"][0][1]), None),
    (H(PARAMS["verify"][0][0]), H(PARAMS["verify"][0][1]), "0D\\x02 "), (b"", b"", b""),
    (H(PARAMS["verify"][0][0]), "x" * 32, H(PARAMS["verify"][0][2]))]]
out["pems"] = [hexed(attempt(getattr(p256, f), text)) for f, text in PARAMS["pems"]]
print("RESULT " + json.dumps(out))
"""


def _load_p256():
    # by file, under its own name: micropython/ also holds board.py, store.py, ... that must not shadow anything
    spec = importlib.util.spec_from_file_location("mp_p256", REPO / "micropython" / "p256.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


p256 = _load_p256()


def _pub_bytes(key) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _spki_pem(key) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _cert_pem(subject_key, issuer_key, hash_alg=SHA256) -> str:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p256 test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer_key, hash_alg)
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _crypto_verifies(pub: bytes, digest: bytes, sig: bytes) -> bool:
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
        key.verify(sig, digest, PREHASHED)
        return True
    except Exception:
        return False


def _der_int(x: int) -> bytes:
    b = x.to_bytes(33, "big").lstrip(b"\0") or b"\0"
    if b[0] & 0x80:
        b = b"\0" + b
    return bytes([2, len(b)]) + b


def _seq(body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([0x30, len(body)]) + body


def _der_sig(r: int, s: int) -> bytes:
    return _seq(_der_int(r) + _der_int(s))


def _hostile(good: bytes) -> dict[str, bytes]:
    """Malformed or out-of-range signatures, built around a valid one (r, s each 32 bytes or 33 with a pad)."""
    r, s = utils.decode_dss_signature(good)
    ri, si = _der_int(r), _der_int(s)
    cases = {
        "empty": b"",
        "one byte": good[:1],
        "header only": good[:2],
        "truncated by one": good[:-1],
        "truncated mid r": good[:10],
        "trailing byte": good + b"\0",
        "trailing sequence": good + _der_sig(r, s),
        "SET instead of SEQUENCE": b"\x31" + good[1:],
        "BIT STRING instead of INTEGER": good[:2] + b"\x03" + good[3:],
        "outer length one short": bytes([0x30, good[1] - 1]) + good[2:],
        "outer length one long": bytes([0x30, good[1] + 1]) + good[2:],
        "r length overruns": bytes([0x30, len(ri + si), 2, 0x7F]) + ri[2:] + si,
        "r length zero": bytes([0x30, 2 + len(si), 2, 0]) + si,
        "indefinite length": bytes([0x30, 0x80]) + ri + si + b"\0\0",
        "huge length 0x84": b"\x30\x84\xff\xff\xff\xff" + ri + si,
        "huge length 0x83": b"\x30\x83\xff\xff\xff" + ri + si,
        "huge length 0x82": b"\x30\x82\xff\xff" + ri + si,
        "huge length 0xff": b"\x30\xff" + ri + si,
        "huge r length": _seq(b"\x02\x82\xff\xff" + ri[2:] + si),
        "r = 0": _der_sig(0, s),
        "s = 0": _der_sig(r, 0),
        "r = n": _der_sig(N, s),
        "s = n": _der_sig(r, N),
        "r + n (same residue)": _der_sig(r + N, s),
        "s + n (same residue)": _der_sig(r, s + N),
        "negative r": _seq(b"\x02\x01\xff" + si),
        "negative s": _seq(ri + b"\x02\x01\x80"),
        "n - 1 without its sign pad (negative)": _seq(b"\x02\x20" + (N - 1).to_bytes(32, "big") + si),
        "only r": _seq(ri),
        "three integers": _seq(ri + si + ri),
        "nested sequence": _seq(good),
        "r and s swapped": _seq(si + ri),
        "raw r||s": r.to_bytes(32, "big") + s.to_bytes(32, "big"),
    }
    rng = random.Random(6979)
    for i in range(len(good)):
        bit = 1 << rng.randrange(8)
        cases[f"bit flip at byte {i}"] = good[:i] + bytes([good[i] ^ bit]) + good[i + 1 :]
    for n in (1, 8, 70, 72, 300):
        cases[f"random {n} bytes"] = bytes([0x30]) + rng.randbytes(n - 1)
    return cases


def _flip(b: bytes, rng: random.Random, lo: int = 0) -> bytes:
    i = rng.randrange(lo, len(b))
    return b[:i] + bytes([b[i] ^ (1 << rng.randrange(8))]) + b[i + 1 :]


def _params_and_expectations():
    rng = random.Random()
    known = ec.generate_private_key(ec.SECP256R1())
    cases: list[tuple[str, bytes, bytes, bytes, bool]] = []
    # d = 1 makes Q = G (the G+Q table entry is a doubling), d = n-1 makes Q = -G (G+Q is the point at infinity)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(6)]
    keys += [ec.derive_private_key(d, ec.SECP256R1()) for d in (1, 2, N - 1)]
    for i, key in enumerate(keys):
        pub = _pub_bytes(key.public_key())
        digest = os.urandom(32)
        sig = key.sign(digest, PREHASHED)
        r, s = utils.decode_dss_signature(sig)
        cases += [
            (f"key {i}: cryptography's signature", pub, digest, sig, True),
            (f"key {i}: high-S twin (ECDSA accepts both)", pub, digest, _der_sig(r, N - s), True),
            (f"key {i}: digest bit flipped", pub, _flip(digest, rng), sig, False),
            (f"key {i}: r bit flipped", pub, digest, _der_sig(r ^ (1 << rng.randrange(256)), s), False),
            (f"key {i}: s bit flipped", pub, digest, _der_sig(r, s ^ (1 << rng.randrange(256))), False),
            (f"key {i}: public key bit flipped", _flip(pub, rng, 1), digest, sig, False),
            (f"key {i}: another key", _pub_bytes(keys[i - 1].public_key()), digest, sig, False),
        ]
    pub0, digest0, good = cases[0][1], cases[0][2], cases[0][3]
    key0 = keys[0]
    while True:  # a signature whose r has its top bit set: DER needs a 00 pad to keep it positive
        high = key0.sign(digest0, PREHASHED)
        r, s = utils.decode_dss_signature(high)
        if r >> 255:
            break
    unpadded = _seq(b"\x02\x20" + r.to_bytes(32, "big") + _der_int(s))
    cases += [
        ("key 0: r >= 2^255, padded", pub0, digest0, high, True),
        ("hostile: the same r without its pad (a negative INTEGER)", pub0, digest0, unpadded, False),
    ]
    cases += [(f"hostile: {name}", pub0, digest0, sig, False) for name, sig in _hostile(good).items()]
    p = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
    # A point whose x is small enough that x + p still fits in 32 bytes (a non-canonical encoding of it), with a
    # signature nobody holds the key for: R = aG + bQ, r = R.x, s = r/b, e = a*s verifies as u1 = a, u2 = b.
    x0 = 0
    while True:
        rhs = (x0**3 - 3 * x0 + 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B) % p
        y0 = pow(rhs, (p + 1) // 4, p)
        if y0 * y0 % p == rhs:
            break
        x0 += 1
    small = b"\x04" + x0.to_bytes(32, "big") + y0.to_bytes(32, "big")
    a, b = rng.randrange(1, N), rng.randrange(1, N)
    fr = p256._mul2(a, b, (x0, y0))[0] % N
    fs = fr * pow(b, -1, N) % N
    forged, forged_digest = _der_sig(fr, fs), (a * fs % N).to_bytes(32, "big")
    cases += [
        (
            "bad pub: compressed (only uncompressed points are taken)",
            bytes([2 | pub0[-1] & 1]) + pub0[1:33],
            digest0,
            good,
            False,
        ),
        ("bad pub: no prefix", pub0[1:], digest0, good, False),
        ("bad pub: prefix 05", b"\x05" + pub0[1:], digest0, good, False),
        ("bad pub: x = p", b"\x04" + p.to_bytes(32, "big") + pub0[33:], digest0, good, False),
        ("point with a small x, forged signature", small, forged_digest, forged, True),
        (
            "bad pub: the same point with x + p",
            b"\x04" + (x0 + p).to_bytes(32, "big") + small[33:],
            forged_digest,
            forged,
            False,
        ),
        ("bad pub: all zero", b"\x04" + bytes(64), digest0, good, False),
        ("bad pub: empty", b"", digest0, good, False),
        ("digest too short", pub0, digest0[:31], good, False),
    ]
    for name, pub, digest, sig, want in cases:  # the test data itself agrees with OpenSSL
        assert _crypto_verifies(pub, digest, sig) == (want or "compressed" in name), name

    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    subject, issuer = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    alg = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")

    def spki(point: bytes) -> str:
        bits = b"\x03" + bytes([len(point) + 1]) + b"\0" + point
        der = b"\x30" + bytes([len(alg + bits)]) + alg + bits
        return "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + "\n-----END PUBLIC KEY-----\n"

    sub_pub = _pub_bytes(subject.public_key())
    known_spki, known_pub = _spki_pem(known.public_key()), _pub_bytes(known.public_key()).hex()
    k1 = ec.generate_private_key(ec.SECP256K1())
    pems = [  # (function, text, expected point or the start of the error)
        ("pub_from_spki_pem", known_spki, known_pub),
        ("pub_from_spki_pem", known_spki.replace("\n", "\r\n"), known_pub),
        ("pub_from_spki_pem", "junk before\n" + known_spki + "junk after", known_pub),
        ("pub_from_cert_pem", _cert_pem(subject, issuer), sub_pub.hex()),
        ("pub_from_cert_pem", _cert_pem(subject, rsa_key), sub_pub.hex()),
        ("pub_from_cert_pem", _cert_pem(subject, p384, hashes.SHA384()), sub_pub.hex()),
        ("pub_from_spki_pem", _spki_pem(p384.public_key()), "ValueError: not a P-256"),
        ("pub_from_spki_pem", _spki_pem(rsa_key.public_key()), "ValueError: not a P-256"),
        ("pub_from_spki_pem", _spki_pem(ed25519.Ed25519PrivateKey.generate().public_key()), "ValueError: not a P-256"),
        ("pub_from_spki_pem", _spki_pem(k1.public_key()), "ValueError: not a P-256"),
        (
            "pub_from_spki_pem",
            _spki_pem(ec.generate_private_key(ec.BrainpoolP256R1()).public_key()),
            "ValueError: not a P-256",
        ),
        ("pub_from_cert_pem", _cert_pem(p384, issuer), "ValueError: not a P-256"),
        ("pub_from_cert_pem", _cert_pem(rsa_key, issuer), "ValueError: not a P-256"),
        ("pub_from_spki_pem", spki(b"\x02" + sub_pub[1:33]), "ValueError: not an uncompressed P-256 point"),
        ("pub_from_spki_pem", spki(sub_pub[:-1] + bytes([sub_pub[-1] ^ 1])), "ValueError: point not on P-256"),
        ("pub_from_spki_pem", _cert_pem(subject, issuer), "ValueError: no PEM PUBLIC KEY"),
        ("pub_from_cert_pem", _spki_pem(known.public_key()), "ValueError: no PEM CERTIFICATE"),
    ]
    digests = [os.urandom(32) for _ in range(8)] + [b"\0" * 32, b"\xff" * 32]
    params = {
        "known_d": f"{known.private_numbers().private_value:064x}",
        "cn": CN,
        "rfc_x": f"{RFC_X:064x}",
        "digests": [g.hex() for g in digests],
        "verify": [[p.hex(), g.hex(), s.hex()] for _, p, g, s, _ in cases],
        "pems": [[f, text] for f, text, _ in pems],
    }
    expect = {
        "known_d": params["known_d"],
        "known_pub": _pub_bytes(known.public_key()).hex(),
        "verify": [(n, w) for n, _, _, _, w in cases],
        "pems": [want for _, _, want in pems],
        "digests": digests,
    }
    return params, expect


@pytest.fixture(scope="module", params=["micropython", "cpython"])
def batch(request, tmp_path_factory):
    params, expect = _params_and_expectations()
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "micropython":
        r = run_unix(PRELUDE_MP + BATCH, tmp, params, timeout=120)
    else:
        (tmp / "batch.py").write_text(PRELUDE_CPY + BATCH)
        r = subprocess.run(
            [sys.executable, str(tmp / "batch.py"), json.dumps(params)], capture_output=True, text=True, timeout=120
        )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, r.stdout + r.stderr
    out = json.loads(lines[0][len("RESULT ") :])
    return request.param, out, expect, tmp


def test_keygen_rejects_out_of_range_draws_and_derives_the_public_key(batch):
    _, out, expect, _ = batch
    d, pub, left = out["rejection"]
    assert (d, pub, left) == (expect["known_d"], expect["known_pub"], 0)
    assert out["rfc_pub"] == f"04{RFC_UX:064x}{RFC_UY:064x}"


def test_keygen_sign_verify_are_fast(batch):
    impl, out, _, _ = batch
    keygen_ms, sign_ms, verify_ms, ok = out["times"]
    print(f"{impl}: keygen {keygen_ms} ms, sign {sign_ms} ms, verify {verify_ms} ms")
    assert ok is True
    assert max(keygen_ms, sign_ms, verify_ms) < 2000, out["times"]


def test_the_private_key_loads_in_cryptography_and_openssl(batch):
    _, out, _, tmp = batch
    own = out["own"]
    key = serialization.load_pem_private_key(own["key_pem"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.private_numbers().private_value == int(own["d"], 16)
    assert _pub_bytes(key.public_key()).hex() == own["pub"]
    path = tmp / "own.key"
    path.write_text(own["key_pem"])
    r = subprocess.run(["openssl", "ec", "-in", str(path), "-check", "-noout"], capture_output=True, text=True)
    assert r.returncode == 0 and "EC Key valid" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"], capture_output=True)
    assert r.returncode == 0 and r.stdout.endswith(bytes.fromhex(own["pub"])), r.stderr


def test_the_csr_verifies_in_cryptography_and_openssl(batch):
    _, out, _, tmp = batch
    own = out["own"]
    lines = own["csr_pem"].splitlines()
    assert lines[0] == "-----BEGIN CERTIFICATE REQUEST-----" and lines[-1] == "-----END CERTIFICATE REQUEST-----"
    csr = x509.load_der_x509_csr(base64.b64decode("".join(lines[1:-1]), validate=True))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CN
    assert _pub_bytes(csr.public_key()).hex() == own["pub"]
    assert csr.signature_hash_algorithm.name == "sha256"
    assert len(csr.attributes) == 0 and len(csr.extensions) == 0
    path = tmp / "own.csr"
    path.write_text(own["csr_pem"])
    r = subprocess.run(["openssl", "req", "-in", str(path), "-noout", "-verify"], capture_output=True, text=True)
    assert r.returncode == 0 and "verify OK" in r.stdout + r.stderr, r.stdout + r.stderr
    # the same request with its subject altered no longer verifies: the signature covers the request info
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    at = bytes(der).index(CN.encode())
    der[at] ^= 1
    (tmp / "tampered.csr").write_bytes(bytes(der))
    assert not x509.load_der_x509_csr(bytes(der)).is_signature_valid
    r = subprocess.run(
        ["openssl", "req", "-inform", "DER", "-in", str(tmp / "tampered.csr"), "-noout", "-verify"],
        capture_output=True,
        text=True,
    )
    # OpenSSL 3.0 exits 0 here too, so only its message tells the two apart
    assert "verify failure" in r.stderr and "verify OK" not in r.stdout + r.stderr, r.stdout + r.stderr


TLS_CLIENT = """
import board

async def main():
    p = PARAMS
    s = await board.tls("localhost", p["port"], p["ca"], p["cert"], p["key"])
    print("handshake done")
    s.write(b"HELLO FROM " + p["cn"].encode())
    print("reply", await s.read(10000))
    s.close()

asyncio.run(main())
"""


# MicroPython's Mbed TLS (its unix port, as on the boards) speaks TLS 1.2 only: no TLS 1.3 case.
@pytest.mark.parametrize("version", ["TLSv1.2"])
def test_board_tls_authenticates_with_the_key_and_a_certificate_for_its_csr(batch, version, tmp_path):
    """The key p256.py made (SEC1 PEM) and a certificate a CA issued for its CSR are what the shipped
    board.tls() presents on MicroPython's unix port; an OpenSSL server that requires a client certificate of
    that CA accepts them, sees the CSR's public key in the client certificate, and gets the client's bytes."""
    _, out, _, _ = batch
    own = out["own"]
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue_server("server", ["localhost"])
    cert_pem = ca.sign_csr(own["csr_pem"].encode(), CN).public_bytes(serialization.Encoding.PEM).decode()
    greeting = b"HELLO FROM " + CN.encode()
    srv = LoopbackTLSServer(server.cert_path, server.key_path, client_ca=ca.cert_path, version=version, expect=greeting)
    try:
        r = run_unix(
            TLS_CLIENT,
            tmp_path,
            {"port": srv.port, "ca": ca.cert_path.read_text(), "cert": cert_pem, "key": own["key_pem"], "cn": CN},
            timeout=60,
        )
    finally:
        srv.close()
    seen = (srv.handshakes, srv.version, srv.cipher, srv.received, r.stdout, r.stderr)
    assert r.returncode == 0, seen
    assert srv.handshakes == ["completed"] and srv.version == version, seen
    peer = x509.load_der_x509_certificate(srv.peer_der)
    csr = x509.load_pem_x509_csr(own["csr_pem"].encode())
    assert _pub_bytes(peer.public_key()) == _pub_bytes(csr.public_key()) == bytes.fromhex(own["pub"])
    assert peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CN
    assert srv.received == greeting, seen
    assert f"reply {b'WELCOME ' + greeting!r}" in r.stdout, seen
    print(f"{version} {srv.cipher[0]}: the server saw {CN}")


def test_its_signatures_verify_in_cryptography(batch):
    _, out, expect, _ = batch
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(out["own"]["pub"]))
    sigs = [bytes.fromhex(s) for s in out["own"]["sigs"]]
    assert len(sigs) == len(expect["digests"])
    for digest, sig in zip(expect["digests"], sigs, strict=True):
        pub.verify(sig, digest, PREHASHED)  # raises InvalidSignature if not
        assert not _crypto_verifies(bytes.fromhex(out["own"]["pub"]), bytes([digest[0] ^ 1]) + digest[1:], sig)
    assert len(set(sigs)) == len(sigs)


def test_rfc6979_vectors(batch):
    _, out, _, _ = batch
    for msg, (r, s) in RFC_RS.items():
        assert utils.decode_dss_signature(bytes.fromhex(out["rfc"][msg])) == (r, s), msg
    sig, ok, took_ms = out["sqm"]
    assert (sig, ok) == (out["rfc"]["sample"], True) and took_ms < 2000


def test_verify_agrees_with_cryptography_and_rejects_hostile_input_without_raising(batch):
    _, out, expect, _ = batch
    got = out["verify"]
    assert len(got) == len(expect["verify"])
    wrong = [(name, want, have) for (name, want), have in zip(expect["verify"], got, strict=True) if have is not want]
    assert not wrong, wrong
    assert sum(1 for _, w in expect["verify"] if w) == 9 * 2 + 2  # each key twice, r with its pad, the forgery
    assert sum(1 for n, _ in expect["verify"] if "hostile" in n) > 100
    assert out["verify_types"] == [False] * 6, out["verify_types"]


def test_public_keys_from_pem_and_certificates(batch):
    _, out, expect, _ = batch
    for have, want in zip(out["pems"], expect["pems"], strict=True):
        if want.startswith("ValueError"):
            assert have.startswith(want), (have, want)
        else:
            assert have == want


def test_pem_has_64_character_lines_and_round_trips():
    der = bytes(range(256)) * 2
    text = p256.pem("THING", der)
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN THING-----" and lines[-1] == "-----END THING-----"
    assert all(len(ln) == 64 for ln in lines[1:-2]) and 0 < len(lines[-2]) <= 64
    assert p256.unpem(text, "THING") == der


@settings(max_examples=400, deadline=None)
@given(pub=st.binary(max_size=70), digest=st.binary(min_size=31, max_size=33), sig=st.binary(max_size=80))
def test_verify_never_raises_on_arbitrary_bytes(pub, digest, sig):
    assert p256.verify(pub, digest, sig) is _crypto_verifies(pub, digest, sig)


FUZZ_KEY = ec.derive_private_key(0x1234567, ec.SECP256R1())
FUZZ_DIGEST = hashlib.sha256(b"m").digest()
FUZZ_SIG = FUZZ_KEY.sign(FUZZ_DIGEST, PREHASHED)  # one signature for the whole run: hypothesis replays its draws


@settings(max_examples=300, deadline=None)
@given(sig=st.binary(min_size=8, max_size=72), data=st.data())
def test_verify_never_raises_on_mutated_signatures(sig, data):
    key, digest, good = FUZZ_KEY, FUZZ_DIGEST, FUZZ_SIG
    i = data.draw(st.integers(0, len(good)))
    j = data.draw(st.integers(i, len(good)))
    mutated = good[:i] + sig[: data.draw(st.integers(0, 8))] + good[j:]
    pub = _pub_bytes(key.public_key())
    ours = p256.verify(pub, digest, mutated)
    assert isinstance(ours, bool)
    if _crypto_verifies(pub, digest, mutated):
        assert ours is True
    elif ours:  # OpenSSL insists on minimal DER integers; this module need not, but the values must be the same
        assert utils.decode_dss_signature(good) == tuple(p256._sig(mutated)), mutated.hex()
