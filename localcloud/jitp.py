"""Just-in-time provisioning (JITP), as AWS IoT does it for a registered CA certificate.

A manufacturer registers its CA with a provisioning template (`provisioning/jitp-template.json`, AWS's
format: `{"templateBody": "<JSON string>", "roleArn": ...}`). When a device whose certificate that CA
issued connects for the first time, AWS registers the certificate (PENDING_ACTIVATION), runs the
template (thing named from the certificate, certificate ACTIVE, device policy attached) and drops
that first connection; the device connects again as the thing.

Here the broker plugin sees the unknown certificate at CONNECT, refuses the connection and hands the
certificate to the service on `$localcloud/jitp`; `JustInTimeProvisioning.register` does the rest
and the reconcile that follows lets the next connection in. The template is interpreted with the
fleet-provisioning engine (`localcloud/fleet.py`). Only `AWS::IoT::Certificate::*` parameters come
from the certificate; other parameters need a `Default` (a device sends none).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from . import fleet
from .registry import Registry, certificate_id

TOPIC = "$localcloud/jitp"  # the plugin → service control topic
DEVICE_POLICY = "iot-agent-device"  # the only policy a template may attach: provisioning/device-policy.json

# The parameters AWS fills in from the device certificate for a JITP template.
_NAME_PARAMS = {
    "AWS::IoT::Certificate::CommonName": NameOID.COMMON_NAME,
    "AWS::IoT::Certificate::Country": NameOID.COUNTRY_NAME,
    "AWS::IoT::Certificate::Organization": NameOID.ORGANIZATION_NAME,
    "AWS::IoT::Certificate::OrganizationalUnit": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "AWS::IoT::Certificate::DistinguishedNameQualifier": NameOID.DN_QUALIFIER,
    "AWS::IoT::Certificate::StateName": NameOID.STATE_OR_PROVINCE_NAME,
}


def template_body(registration_config: dict | str) -> dict:
    """The template inside a JITP registration config; ValueError when the local cloud cannot run it."""
    doc = json.loads(registration_config) if isinstance(registration_config, str) else registration_config
    if not isinstance(doc, dict) or "templateBody" not in doc:
        raise ValueError('a JITP template is {"templateBody": "<template JSON>", "roleArn": "..."}')
    body = doc["templateBody"]
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise ValueError(f"templateBody is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise ValueError("templateBody must be a JSON object")
    if not fleet.resources(body, "AWS::IoT::Thing"):
        raise ValueError("templateBody has no AWS::IoT::Thing resource")
    params = body.get("Parameters", {})
    if not isinstance(params, dict):
        raise ValueError("Parameters must be an object")
    for name, spec in params.items():
        if not name.startswith("AWS::IoT::Certificate::") and not (isinstance(spec, dict) and "Default" in spec):
            raise ValueError(f"parameter {name} needs a Default: a device sends no parameters with JITP")
        if (
            name.startswith("AWS::IoT::Certificate::")
            and name not in _NAME_PARAMS
            and name not in ("AWS::IoT::Certificate::Id", "AWS::IoT::Certificate::SerialNumber")
        ):
            raise ValueError(f"unknown certificate parameter {name}")
    certs = fleet.resources(body, "AWS::IoT::Certificate")
    if len(certs) != 1:
        raise ValueError("templateBody must have exactly one AWS::IoT::Certificate resource")
    for pol in fleet.resources(body, "AWS::IoT::Policy"):
        props = pol.get("Properties", {})
        if props.get("PolicyName") != DEVICE_POLICY:
            raise ValueError(f'the local cloud attaches only the device policy: use "PolicyName": "{DEVICE_POLICY}"')
    if not fleet.resources(body, "AWS::IoT::Policy"):
        raise ValueError(f'templateBody attaches no policy (expected "PolicyName": "{DEVICE_POLICY}")')
    return body


def certificate_parameters(cert: x509.Certificate, cert_id: str) -> dict[str, str]:
    """AWS::IoT::Certificate::* values of one device certificate (those its subject has)."""
    values = {
        "AWS::IoT::Certificate::Id": cert_id,
        "AWS::IoT::Certificate::SerialNumber": format(cert.serial_number, "x"),
    }
    for param, oid in _NAME_PARAMS.items():
        attrs = cert.subject.get_attributes_for_oid(oid)
        if attrs:
            values[param] = str(attrs[0].value)
    return values


def _template_values(body: dict, cert_values: dict[str, str]) -> dict[str, str]:
    values = dict(cert_values)
    for name, spec in body.get("Parameters", {}).items():
        if name not in values and isinstance(spec, dict) and "Default" in spec:
            values[name] = str(spec["Default"])
    return values


def parse_ca_certificate(pem: bytes) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ValueError("not a CA certificate (basicConstraints CA:TRUE missing)")
    return cert


def username_for(cert_id: str) -> str:
    """The broker identity (ACL section, connect rule) of a JITP certificate: from its id, never its CN."""
    return "jitp-" + cert_id[:32]


@dataclass(eq=False)
class JustInTimeProvisioning:
    registry: Registry
    on_change: Any = lambda: None  # reconcile: ACL, connect rules, identities, broker reload

    def issuer(self, cert: x509.Certificate):
        """The registered, ACTIVE CA that signed this certificate, or None."""
        for ca in self.registry.ca_certificates():
            if ca.status != "ACTIVE":
                continue
            ca_cert = x509.load_pem_x509_certificate(ca.pem.encode())
            if ca_cert.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca_cert)
            except (InvalidSignature, ValueError, TypeError):  # not its signature, or an unsupported key type
                continue
            return ca
        return None

    def register(self, cert_pem: bytes) -> str:
        """Register a device certificate from its CA's template; returns what happened (for the log).

        Never raises for bad input. A certificate is registered once: repeats (a device retrying, two
        connections racing) find it and change nothing."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return "not a PEM certificate"
        der = cert.public_bytes(serialization.Encoding.DER)
        cid = certificate_id(der)
        known = self.registry.certificate(cid)
        if known is not None:
            return f"certificate {cid[:16]} already registered ({known.status})"
        ca = self.issuer(cert)
        if ca is None:
            return f"certificate {cid[:16]}: its issuer is not a registered CA; not registered"
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return f"certificate {cid[:16]} is not valid now; not registered"
        try:
            self.registry.add_certificate(
                der,
                cert.public_bytes(serialization.Encoding.PEM).decode(),
                username_for(cid),
                cert.serial_number,
                "device",
                "PENDING_ACTIVATION",
            )
        except sqlite3.IntegrityError:
            return f"certificate {cid[:16]} already registered"
        try:
            body = template_body(ca.registration_config)
            values = _template_values(body, certificate_parameters(cert, cid))
            thing, attributes = fleet.thing_from_template(body, values)
            status = fleet.certificate_status_from_template(body, values)
        except ValueError as e:
            # As on AWS: the certificate stays registered, PENDING_ACTIVATION, and cannot connect.
            self.on_change()
            return f"certificate {cid[:16]}: template of CA {ca.id[:16]} failed ({e}); left PENDING_ACTIVATION"
        self.registry.upsert_thing(thing, attributes)
        self.registry.attach(cid, thing, status)
        self.on_change()
        return f"certificate {cid[:16]} registered by CA {ca.id[:16]}'s template: thing {thing}, {status}"
