"""Keys generated on the token (SoftHSM and swtpm via tpm2-pkcs11): one code path for both."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.base.errors import KeystoreError
from agent.identity.keystore import open_token
from localcloud.bench import run_agent_cli, write_config


@pytest.fixture
def in_process(token, monkeypatch):
    for k, v in token.env.items():
        monkeypatch.setenv(k, v)
    return token


def test_generate_sign_csr_list_delete(in_process):
    tok = in_process
    with open_token(tok.library, tok.label, tok.pin) as ks:
        info = ks.generate_ec_key("device")
        assert info.key_type == "EC" and len(info.key_id) == 32
        pub = serialization.load_der_public_key(info.public_key_der)
        assert isinstance(pub.curve, ec.SECP256R1)

        # The private key is sensitive, not extractable, stored on the token.
        from pkcs11 import Attribute, ObjectClass

        (priv,) = ks.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: "device"})
        assert priv[Attribute.SENSITIVE] is True
        assert priv[Attribute.EXTRACTABLE] is False
        assert priv[Attribute.TOKEN] is True
        assert priv[Attribute.NEVER_EXTRACTABLE] is True

        # A signature made on the token verifies with the public key.
        sig = ks.sign_sha256("device", b"hello")
        pub.verify(sig, b"hello", ec.ECDSA(hashes.SHA256()))

        csr = x509.load_pem_x509_csr(ks.make_csr("device", "gw-7"))
        assert csr.is_signature_valid
        assert csr.subject.rfc4514_string() == "CN=gw-7"
        assert csr.public_key().public_numbers() == pub.public_numbers()

        with pytest.raises(KeystoreError, match="already exists"):
            ks.generate_ec_key("device")
    # A new login per step: swtpm has no resource manager and only three object slots.
    with open_token(tok.library, tok.label, tok.pin) as ks:
        ks.generate_ec_key("device-next")
    with open_token(tok.library, tok.label, tok.pin) as ks:
        assert [k.label for k in ks.list_keys()] == ["device", "device-next"]
        assert ks.delete("device") == 2
        assert [k.label for k in ks.list_keys()] == ["device-next"]
        with pytest.raises(KeystoreError, match="no private key labelled 'device'"):
            ks.sign_sha256("device", b"x")


def test_wrong_pin_and_unknown_token_give_clear_errors(in_process):
    tok = in_process
    with pytest.raises(KeystoreError, match="refused the PIN"), open_token(tok.library, tok.label, "0000"):
        pass
    if tok.tpm:  # a wrong PIN counts against the TPM's dictionary-attack lockout; clear it for later tests
        tok.tpm.tools("tpm2_dictionarylockout", "-c")
    with (
        pytest.raises(KeystoreError, match="no PKCS#11 token labelled 'nope'"),
        open_token(tok.library, "nope", tok.pin),
    ):
        pass


def test_keys_cli_end_to_end(bench, token, tmp_path):
    cfg = write_config(
        tmp_path / "c.toml",
        thing_name="gw-1",
        broker=bench.broker,
        token=token,
        cert_path=None,
        ntp_servers=["127.0.0.1:1"],
        state_dir=tmp_path / "st",
    )
    r = run_agent_cli(cfg, token, "keys", "generate", "device")
    assert r.returncode == 0, r.stderr
    assert "generated EC P-256 key 'device'" in r.stdout
    r = run_agent_cli(cfg, token, "keys", "csr", "device", "--cn", "gw-1")
    assert r.returncode == 0 and "BEGIN CERTIFICATE REQUEST" in r.stdout
    cert = bench.ca.sign_csr(r.stdout.encode(), "gw-1")
    assert cert.subject.rfc4514_string() == "CN=gw-1"
    r = run_agent_cli(cfg, token, "keys", "list")
    assert r.stdout.startswith("device\tEC\tid=")
    r = run_agent_cli(cfg, token, "keys", "delete", "device")
    assert r.returncode == 0
    r = run_agent_cli(cfg, token, "keys", "delete", "device")
    assert r.returncode == 1 and r.stderr.strip() == "iot-agent: no key labelled 'device' on the token"
    assert token.pin not in r.stderr + r.stdout
    # One step for a pre-provisioned device: the key and its CSR (--cn is the thing name).
    r = run_agent_cli(cfg, token, "keys", "generate", "device", "--csr-out", str(tmp_path / "d.csr"))
    assert r.returncode == 1 and r.stderr.strip() == "iot-agent: keys generate --csr-out needs --cn (the thing name)"
    r = run_agent_cli(cfg, token, "keys", "generate", "device", "--csr-out", str(tmp_path / "d.csr"), "--cn", "gw-2")
    assert r.returncode == 0, r.stderr
    assert bench.ca.sign_csr((tmp_path / "d.csr").read_bytes(), "gw-2").subject.rfc4514_string() == "CN=gw-2"
