"""What the board accepts from the provisioning service (micropython/identity.py), under the real MicroPython
interpreter (its unix port): every field of a CreateCertificateFromCsr or RegisterThing answer is checked
against AWS's formats and the board's own key before anything is written, and a certificate is never saved over
a file the board's identity uses. The local cloud answers honestly, so the hostile answers are made here."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mpkit import run_unix

CERTIFICATE_CASES = """
import os, json, identity, store
from mqtt import Refused

class Board:
    def sync(self):
        pass

    def cut(self, name):
        pass

class Agent:
    def __init__(self, ident):
        self.board = Board()
        self.ident = ident

def files():
    try:
        return {n: store.read("id/" + n) for n in os.listdir("id")}
    except OSError:
        return {}

out = {}
pub = bytes.fromhex(PARAMS["pub"])
top = os.getcwd()  # the test's tmp_path: each case gets a folder of its own there, as its flash
for case in PARAMS["cases"]:
    d = top + "/w-" + case["name"]
    os.mkdir(d)
    os.chdir(d)
    for path, text in case.get("files", {}).items():
        store.write(Board(), path, text)
    try:
        got = identity._certificate(Agent(case.get("ident")), case["resp"], pub, "rot")
        out[case["name"]] = {"saved": got, "files": files()}
    except Refused as e:
        out[case["name"]] = {"refused": str(e), "files": files()}
print(json.dumps(out))
"""

THING_CASES = """
import json, identity
from mqtt import Refused
out = []
for resp, want in PARAMS["cases"]:
    try:
        out.append(identity._thing(resp, want))
    except Refused as e:
        out.append(None)
print(json.dumps(out))
"""


def certificate(key: ec.EllipticCurvePrivateKey, ca: ec.EllipticCurvePrivateKey) -> bytes:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AWS IoT Certificate")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(ca, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def pem_block(data: bytes) -> str:
    return "-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data).decode() + "-----END CERTIFICATE-----\n"


def test_certificate_answers_are_checked_before_anything_is_saved(tmp_path):
    ca = ec.generate_private_key(ec.SECP256R1())
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    der, der_other = certificate(key, ca), certificate(other, ca)
    cid, cid_other = hashlib.sha256(der).hexdigest(), hashlib.sha256(der_other).hexdigest()
    good = {"certificateId": cid, "certificatePem": pem(der), "certificateOwnershipToken": "tok-" + "x" * 600}
    # The identity in use, its certificate file named as the board names them now (the full id) and as it did
    # before (the id's first 16 hex digits), so that an overwrite shows whichever naming the code uses.
    cur = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    in_use = {
        "files": {
            f"id/cert-rot-{cur[:16]}.pem": "IN USE",
            f"id/cert-rot-{cur}.pem": "IN USE",
            "id/key-rot-1.pem": "IN USE KEY",
        },
        "ident": {"thing": "gw-1", "cert": f"id/cert-rot-{cur}.pem", "key": "id/key-rot-1.pem", "cert_id": cur},
    }
    cases = {
        "good": {"resp": good},
        "wrapped": {"resp": {**good, "certificatePem": "Bag Attributes\n" + pem(der) + "\n\n"}},
        "id-not-its-hash": {"resp": {**good, "certificateId": cid_other}},
        "id-uppercase": {"resp": {**good, "certificateId": cid.upper()}},
        "id-short": {"resp": {**good, "certificateId": cid[:16]}},
        # A forged id sharing the identity in use's first 16 digits: saved under the name of the file in use.
        "id-collides-with-the-one-in-use": {"resp": {**good, "certificateId": cur[:16] + cid[16:]}, **in_use},
        "names-the-one-in-use": {"resp": good, **in_use, "ident": {**in_use["ident"], "cert_id": cid}},
        "other-key": {"resp": {**good, "certificateId": cid_other, "certificatePem": pem(der_other)}},
        "two-certificates": {"resp": {**good, "certificatePem": pem(der) + pem(der_other)}},
        "bytes-after-the-certificate": {
            "resp": {
                **good,
                "certificateId": hashlib.sha256(der + b"\0\0").hexdigest(),
                "certificatePem": pem_block(der + b"\0\0"),
            }
        },
        "pem-too-long": {"resp": {**good, "certificatePem": "#" * 4000 + pem(der)}},
        "token-empty": {"resp": {**good, "certificateOwnershipToken": ""}},
        "token-too-long": {"resp": {**good, "certificateOwnershipToken": "t" * 4097}},
        "token-controls": {"resp": {**good, "certificateOwnershipToken": "tok\nen"}},
        "token-not-text": {"resp": {**good, "certificateOwnershipToken": 7}},
        "pem-missing": {"resp": {**good, "certificatePem": None}},
    }
    pub = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    r = run_unix(CERTIFICATE_CASES, tmp_path, {"pub": pub.hex(), "cases": [{"name": n, **c} for n, c in cases.items()]})
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    wrong = []
    for name, case in cases.items():
        if name in ("good", "wrapped"):
            # Saved under the full certificate id: the checked certificate and nothing around it.
            if got[name].get("saved") != {
                "cert": f"id/cert-rot-{cid}.pem",
                "cert_id": cid,
                "token": good["certificateOwnershipToken"],
            } or got[name]["files"] != {f"cert-rot-{cid}.pem": pem(der)}:
                wrong.append(
                    (
                        name,
                        "not saved as expected",
                        got[name].get("saved", got[name]).get("cert"),
                        sorted(got[name]["files"]),
                    )
                )
            continue
        before = {k[3:]: v for k, v in case.get("files", {}).items()}
        if any(got[name]["files"].get(f) != v for f, v in before.items()):
            wrong.append((name, "overwrote a file of the identity in use", got[name].get("saved", {}).get("cert")))
        elif "refused" not in got[name]:
            wrong.append((name, "accepted and saved", got[name]["saved"]["cert"]))
        elif got[name]["files"] != before:
            wrong.append((name, "refused but wrote", sorted(got[name]["files"])))
    assert not wrong, "\n".join(repr(w)[:200] for w in wrong)


def test_register_thing_answers_name_a_valid_thing_and_on_rotation_the_boards_own(tmp_path):
    ok = "gw-SN:00_1"
    cases = [
        ({"thingName": ok}, None, ok),
        ({"thingName": "a" * 128}, None, "a" * 128),
        ({"thingName": "a" * 129}, None, None),
        ({"thingName": ""}, None, None),
        ({"thingName": "gw mp"}, None, None),
        ({"thingName": "gw/mp"}, None, None),
        ({"thingName": "gw-\u00fc"}, None, None),
        ({"thingName": "gw-#"}, None, None),
        ({"thingName": 7}, None, None),
        ({}, None, None),  # provisioning: the thing comes from the answer
        ({}, ok, ok),  # rotation: the answer need not repeat it...
        ({"thingName": ok}, ok, ok),
        ({"thingName": "gw-other"}, ok, None),  # ...but must not name another thing
    ]
    r = run_unix(THING_CASES, tmp_path, {"cases": [[resp, want] for resp, want, _ in cases]})
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [want for _, _, want in cases]
