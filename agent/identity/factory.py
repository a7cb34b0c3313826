"""The production-line steps: keys on the token and the certificates for them.

Provisioning by claim: a claim key on the token and the claim certificate for it (`init`,
`claim_cert`). Just-in-time provisioning: the device key itself, with a CSR whose CN is the thing
name, and the certificate the manufacturer's CA issued for it (`device_key`, `device_cert`); AWS
IoT registers that certificate on its first connection. Either way keys are generated on the token
and only certificates, which are public, are stored. The manufacturer's CA (or AWS IoT's
CreateCertificateFromCsr, see provisioning/aws_setup.py) signs the CSRs.
"""

from __future__ import annotations

from pathlib import Path

from agent.base.config import Config
from agent.base.durable import write_atomic
from agent.base.errors import AgentError
from agent.base.state import StateStore


def _store(cfg: Config) -> StateStore:
    return StateStore(cfg.resolve(cfg.device.state_dir))


def init(cfg: Config, serial: str, csr_out: Path) -> str:
    from agent.base.pin import read_pin
    from agent.identity.keystore import open_token

    if not serial or len(serial) > 64 or not all(c.isalnum() or c in "-_:" for c in serial):
        raise AgentError(f"serial number {serial!r}: 1-64 characters of [A-Za-z0-9_:-]")
    store = _store(cfg)
    state = store.load()
    if state.get("thing_name"):
        raise AgentError(
            f"this device is already provisioned as {state['thing_name']}; factory init is for fresh devices"
        )
    label = cfg.provisioning.claim_key_label
    with open_token(cfg.resolve(cfg.pkcs11.library), cfg.pkcs11.token_label, read_pin(cfg)) as ks:
        if ks.find(label) is None:
            ks.generate_ec_key(label)
        csr = ks.make_csr(label, f"claim-{serial}")
    try:
        write_atomic(csr_out, csr, 0o644)
    except OSError as e:
        raise AgentError(
            f"{csr_out}: cannot write the CSR ({e.strerror}); choose a folder this user can write"
        ) from None
    store.update(factory={**state.get("factory", {}), "serial": serial})
    return (
        f"claim key {label!r} on token {cfg.pkcs11.token_label!r}; CSR written to {csr_out}; serial {serial} recorded"
    )


def _installable_cert(cfg: Config, cert_path: Path, label: str, what: str):
    """(DER, asn1crypto certificate) of a certificate that belongs to the key `label` on the token."""
    from asn1crypto import pem as apem
    from asn1crypto import x509 as ax509

    from agent.base.pin import read_pin
    from agent.identity.keystore import open_token

    try:
        raw = cert_path.read_bytes()
        der = apem.unarmor(raw)[2] if apem.detect(raw) else raw
        cert = ax509.Certificate.load(der)
        spki = cert.public_key.dump()
    except (OSError, ValueError) as e:
        raise AgentError(f"{cert_path}: not a readable X.509 certificate ({e.__class__.__name__})") from None
    with open_token(cfg.resolve(cfg.pkcs11.library), cfg.pkcs11.token_label, read_pin(cfg), rw=False) as ks:
        key = ks.find(label)
    if key is None or key.public_key_der != spki:
        raise AgentError(f"{cert_path}: this certificate is not for the {what} key {label!r} on the token")
    return der, cert


def claim_cert(cfg: Config, cert_path: Path) -> str:
    """Install the claim certificate after checking it belongs to the claim key on the token."""
    from asn1crypto import pem as apem

    der, _ = _installable_cert(cfg, cert_path, cfg.provisioning.claim_key_label, "claim")
    store = _store(cfg)
    store.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    dst = store.directory / "claim.pem"
    write_atomic(dst, apem.armor("CERTIFICATE", der), 0o644)
    state = store.load()
    store.update(factory={**state.get("factory", {}), "claim_certificate": str(dst)})
    return f"claim certificate installed at {dst}"


def device_key(cfg: Config, thing: str, csr_out: Path) -> str:
    """JITP: the device key on the token and a CSR with the thing name as CN, for the manufacturer's CA."""
    from agent.base.pin import read_pin
    from agent.identity.keystore import open_token

    if not thing or len(thing) > 128 or not all(c.isalnum() or c in "-_:" for c in thing):
        raise AgentError(f"thing name {thing!r}: 1-128 characters of [A-Za-z0-9_:-]")
    store = _store(cfg)
    if store.load().get("thing_name"):
        raise AgentError(
            f"this device already has an identity ({store.load()['thing_name']}); the factory step is for fresh devices"
        )
    label = cfg.pkcs11.key_label
    with open_token(cfg.resolve(cfg.pkcs11.library), cfg.pkcs11.token_label, read_pin(cfg)) as ks:
        if ks.find(label) is None:
            ks.generate_ec_key(label)
        csr = ks.make_csr(label, thing)
    try:
        write_atomic(csr_out, csr, 0o644)
    except OSError as e:
        raise AgentError(
            f"{csr_out}: cannot write the CSR ({e.strerror}); choose a folder this user can write"
        ) from None
    return f"device key {label!r} on token {cfg.pkcs11.token_label!r}; CSR for {thing} written to {csr_out}"


def device_cert(cfg: Config, cert_path: Path) -> str:
    """JITP: install the device certificate the manufacturer's CA issued; its CN is the thing name."""
    from asn1crypto import pem as apem

    label = cfg.pkcs11.key_label
    der, cert = _installable_cert(cfg, cert_path, label, "device")
    thing = cert.subject.native.get("common_name")
    if not thing:
        raise AgentError(f"{cert_path}: the certificate has no CN; JITP names the thing after it")
    store = _store(cfg)
    store.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    dst = store.directory / "device.pem"
    write_atomic(dst, apem.armor("CERTIFICATE", der), 0o644)
    store.update(thing_name=thing, certificate_file=str(dst), key_label=label, jitp={"registered": False})
    return f"device certificate for {thing} installed at {dst}; AWS IoT registers it on the first connection"
