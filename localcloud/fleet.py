"""Fleet provisioning (CreateCertificateFromCsr, CreateKeysAndCertificate, RegisterThing).

Pure request handling: each handler takes the decoded request and the caller's identity and
returns (accepted?, response document). Transport (MQTT, json/cbor) lives in service.py. Input is
hostile: every field is type-checked and size-limited, and every failure is an AWS-shaped
rejection `{"statusCode", "errorCode", "errorMessage"}`, never an exception.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .pki import CertificateAuthority, pem
from .registry import Registry

MAX_CSR_BYTES = 8192
MAX_PARAMS = 50
MAX_PARAM_KEY, MAX_PARAM_VALUE = 2048, 4096

Result = tuple[bool, dict[str, Any]]


# The rejection document is AWS's, field for field: {"statusCode": int, "errorCode": str, "errorMessage": str}
# ("Device provisioning MQTT API", CreateCertificateFromCsr / CreateKeysAndCertificate / RegisterThing error
# payload, https://docs.aws.amazon.com/iot/latest/developerguide/fleet-provision-api.html). AWS lists no error
# codes there; the ones used here (400 InvalidPayload / InvalidCsr / InvalidParameters, 403 Forbidden,
# 404 ResourceNotFound) are the local cloud's own. AWS documents only that a pre-provisioning hook that
# refuses (or fails) fails the request "with ACCESS_DENIED"
# (https://docs.aws.amazon.com/iot/latest/developerguide/pre-provisioning-hook.html); that is 403 Forbidden
# here, which the agent's messages and tests name.
def reject(status: int, code: str, message: str) -> Result:
    return False, {"statusCode": status, "errorCode": code, "errorMessage": message}


def _unknown_fields(req: dict, allowed: set[str]) -> str | None:
    extra = sorted(set(req) - allowed)
    return f"unknown field(s): {', '.join(extra)}" if extra else None


@dataclass(eq=False)
class FleetProvisioning:
    registry: Registry
    ca: CertificateAuthority
    template_name: str
    template: dict
    on_change: Callable[[], None] = lambda: None  # regenerate CRL/ACL and reload the broker
    now: Callable[[], float] = time.time
    allow_list_enabled: bool = True
    # "claim" for fleet provisioning; "device" for certificate rotation, where the template may only
    # name the caller's own thing (what a pre-provisioning hook checks on AWS).
    caller_kind: str = "claim"
    cert_days: float = 365.0
    refused: bool = False  # the pre-provisioning hook refuses every request (tests of a refusing cloud)
    leave_inactive: bool = False  # registered but deactivated at once (an operator's veto): it cannot connect
    _issued: int = field(default=0)

    # -- identity checks ---------------------------------------------------------------------
    def _caller_is_claim(self, username: str) -> Result | None:
        cert = self.registry.certificate_by_cn(username)
        if cert is None or cert.kind != self.caller_kind or cert.status != "ACTIVE":
            return reject(403, "Forbidden", f"only an active {self.caller_kind} certificate may call this template")
        if self.caller_kind == "device" and not cert.thing:
            return reject(403, "Forbidden", "the calling certificate is not attached to a thing")
        return None

    # -- CreateCertificateFromCsr ---------------------------------------------------------
    def create_from_csr(self, req: Any, username: str) -> Result:
        denied = self._caller_is_claim(username)
        if denied:
            return denied
        if not isinstance(req, dict):
            return reject(400, "InvalidPayload", "request must be an object")
        bad = _unknown_fields(req, {"certificateSigningRequest"})
        if bad:
            return reject(400, "InvalidPayload", bad)
        csr_pem = req.get("certificateSigningRequest")
        if not isinstance(csr_pem, str) or not csr_pem:
            return reject(400, "InvalidPayload", "certificateSigningRequest must be a non-empty string")
        if len(csr_pem) > MAX_CSR_BYTES:
            return reject(400, "InvalidCsr", f"CSR larger than {MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            if not csr.is_signature_valid:
                return reject(400, "InvalidCsr", "CSR signature does not verify")
            key = csr.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1"):
                return reject(400, "InvalidCsr", "CSR key must be EC P-256 or P-384")
        except (ValueError, TypeError, UnicodeError) as e:
            return reject(400, "InvalidCsr", f"CSR could not be parsed ({e.__class__.__name__})")
        cn = "dev-" + secrets.token_hex(12)
        if self.refused:
            return reject(403, "Forbidden", "the pre-provisioning hook refused this request")
        cert = self.ca.sign_public_key(key, cn, days=self.cert_days)
        return self._pending(cert, cn)

    # -- CreateKeysAndCertificate ---------------------------------------------------------
    def create_keys(self, req: Any, username: str) -> Result:
        denied = self._caller_is_claim(username)
        if denied:
            return denied
        if not isinstance(req, dict):
            return reject(400, "InvalidPayload", "request must be an object")
        bad = _unknown_fields(req, set())
        if bad:
            return reject(400, "InvalidPayload", bad)
        key = ec.generate_private_key(ec.SECP256R1())
        cn = "dev-" + secrets.token_hex(12)
        cert = self.ca.sign_public_key(key.public_key(), cn, days=self.cert_days)
        ok, doc = self._pending(cert, cn)
        doc["privateKey"] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ).decode()
        return ok, doc

    def _pending(self, cert: x509.Certificate, cn: str) -> Result:
        der = cert.public_bytes(serialization.Encoding.DER)
        rec = self.registry.add_certificate(
            der, pem(cert).decode(), cn, cert.serial_number, "device", "PENDING_ACTIVATION", with_ownership_token=True
        )
        self.on_change()  # a pending certificate must not connect: it goes on the CRL
        return True, {
            "certificateId": rec.id,
            "certificatePem": rec.pem,
            "certificateOwnershipToken": rec.ownership_token,
        }

    # -- RegisterThing --------------------------------------------------------------------
    def register_thing(self, template_name: str, req: Any, username: str) -> Result:
        denied = self._caller_is_claim(username)
        if denied:
            return denied
        if template_name != self.template_name:
            return reject(404, "ResourceNotFound", f"provisioning template {template_name!r} not found")
        if not isinstance(req, dict):
            return reject(400, "InvalidPayload", "request must be an object")
        bad = _unknown_fields(req, {"certificateOwnershipToken", "parameters"})
        if bad:
            return reject(400, "InvalidPayload", bad)
        token = req.get("certificateOwnershipToken")
        params = req.get("parameters", {})
        if not isinstance(token, str) or not token or len(token) > 2048:
            return reject(400, "InvalidPayload", "certificateOwnershipToken must be a non-empty string")
        if (
            not isinstance(params, dict)
            or len(params) > MAX_PARAMS
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_PARAM_KEY and len(v) <= MAX_PARAM_VALUE
                for k, v in params.items()
            )
        ):
            return reject(400, "InvalidPayload", "parameters must map strings to strings")
        cert = self.registry.certificate_by_token(token)
        if cert is None:
            return reject(400, "InvalidPayload", "certificateOwnershipToken is not valid")
        if cert.token_expires is not None and self.now() > cert.token_expires:
            return reject(400, "InvalidPayload", "certificateOwnershipToken has expired")
        if cert.status == "ACTIVE" and cert.thing:
            # A repeat of a RegisterThing that already succeeded (the device lost the answer): same
            # result, nothing new created.
            return True, {
                "thingName": cert.thing,
                "deviceConfiguration": dict(self.template.get("DeviceConfiguration", {})),
            }
        try:
            thing, attributes = self._evaluate(params, cert.id)
        except ValueError as e:
            return reject(400, "InvalidParameters", str(e))
        if self.caller_kind == "device":
            caller = self.registry.certificate_by_cn(username)
            if thing != caller.thing:
                return reject(403, "Forbidden", f"a device may only rotate its own certificate (it is {caller.thing})")
        serial = params.get("SerialNumber")
        if self.allow_list_enabled and (serial is None or not self.registry.serial_allowed(serial)):
            return reject(403, "Forbidden", f"pre-provisioning hook refused serial number {serial!r}")
        self.registry.upsert_thing(thing, attributes)
        self.registry.activate_and_attach(cert.id, thing)
        if self.leave_inactive:
            self.registry.set_status(cert.id, "INACTIVE")
        self.on_change()
        return True, {"thingName": thing, "deviceConfiguration": dict(self.template.get("DeviceConfiguration", {}))}

    # -- the template subset ----------------------------------------------------------------
    def _evaluate(self, params: dict[str, str], cert_id: str) -> tuple[str, dict[str, str]]:
        declared = self.template.get("Parameters", {})
        values = {"AWS::IoT::Certificate::Id": cert_id}
        for name, spec in declared.items():
            if name.startswith("AWS::"):
                continue
            if name in params:
                values[name] = params[name]
            elif "Default" in spec:
                values[name] = str(spec["Default"])
            else:
                raise ValueError(f"missing template parameter {name}")
        for k in params:
            if k not in declared:
                raise ValueError(f"parameter {k} is not declared by the template")
        return thing_from_template(self.template, values)


def resources(template: dict, type_: str) -> list[dict]:
    """The template's resources of one type (AWS::IoT::Thing, AWS::IoT::Certificate, AWS::IoT::Policy)."""
    res = template.get("Resources")
    if not isinstance(res, dict):
        raise ValueError("template has no Resources")
    return [r for r in res.values() if isinstance(r, dict) and r.get("Type") == type_]


def thing_from_template(template: dict, values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The thing name and attributes the template's AWS::IoT::Thing resource makes from parameter values."""
    things = resources(template, "AWS::IoT::Thing")
    if not things:
        raise ValueError("template has no AWS::IoT::Thing resource")
    props = things[0].get("Properties", {})
    name = _resolve(props.get("ThingName"), values)
    if not name or len(name) > 128 or not all(c.isalnum() or c in ":_-" for c in name):
        raise ValueError(f"thing name {name!r} is not a valid AWS IoT thing name")
    attrs = {k: _resolve(v, values) for k, v in props.get("AttributePayload", {}).items()}
    return name, attrs


def certificate_status_from_template(template: dict, values: dict[str, str]) -> str:
    """The Status the template's AWS::IoT::Certificate resource gives the certificate being provisioned."""
    certs = resources(template, "AWS::IoT::Certificate")
    if len(certs) != 1:
        raise ValueError("template must have exactly one AWS::IoT::Certificate resource")
    props = certs[0].get("Properties", {})
    if _resolve(props.get("CertificateId"), values) != values.get("AWS::IoT::Certificate::Id"):
        raise ValueError("the certificate resource must refer to AWS::IoT::Certificate::Id")
    status = _resolve(props.get("Status", "ACTIVE"), values)
    if status not in ("ACTIVE", "INACTIVE"):
        raise ValueError(f"certificate Status {status!r} is not ACTIVE or INACTIVE")
    return status


def _resolve(expr: Any, values: dict[str, str]) -> str:
    if isinstance(expr, str):
        return expr
    if isinstance(expr, dict) and set(expr) == {"Ref"}:
        if expr["Ref"] not in values:
            raise ValueError(f"template refers to unknown parameter {expr['Ref']}")
        return values[expr["Ref"]]
    if isinstance(expr, dict) and set(expr) == {"Fn::Join"}:
        sep, parts = expr["Fn::Join"]
        return str(sep).join(_resolve(p, values) for p in parts)
    raise ValueError(f"unsupported template expression {expr!r}")
