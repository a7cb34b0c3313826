"""Fleet provisioning by claim: from the factory's bootstrap certificate to the device's own identity.

A write-ahead state machine. Each step is recorded in the state store before its side effect, so
a power cut anywhere resumes without losing the device: the key already on the token is reused, a
certificate whose response was lost is requested again, RegisterThing is retried with the same
ownership token (the cloud answers it idempotently) and never creates a second thing, and an
expired token starts the certificate request over. The key is generated on the token, before the
claim connection opens (a small TPM has room for one user at a time), in a short-lived process so
the daemon never carries python-pkcs11.

Steps: keygen -> csr -> requesting_certificate -> certificate -> registering -> registered -> done; the
PROVISIONING table below has every transition and what a restart does in each step.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.base import durable, killpoints
from agent.base.backoff import Backoff
from agent.base.config import Config
from agent.base.errors import AgentError
from agent.base.machine import Machine, State
from agent.base.state import StateStore
from agent.identity.answers import AnswerError, issued_certificate, thing_name
from agent.session.connection import Connection, ConnectionSettings

log = logging.getLogger("agent.provisioning")

TOKEN_LIFETIME_S = 3600.0
TOKEN_MARGIN_S = 300.0  # start over rather than race the token's expiry
REQUEST_TIMEOUT_S = 30.0


class ProvisioningError(AgentError):
    """The cloud or the broker refused a step; `code` is AWS's error code when there is one."""

    def __init__(self, code: str, message: str, retry_from: str | None = None):
        super().__init__(f"provisioning: {code}: {message}")
        self.code, self.message, self.retry_from = code, message, retry_from


@dataclass(eq=False)
class TokenKeys:
    """Key operations on the token, each in a short-lived `iot-agent keys` process."""

    config_path: Path

    def _run(self, *args: str) -> str:
        import subprocess  # key work is rare: the idle daemon need not carry subprocess

        r = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(self.config_path), "keys", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise AgentError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"keys {args[0]} failed")
        return r.stdout

    def ensure_key(self, label: str) -> None:
        self._run("generate", label, "--if-missing")

    def csr(self, label: str, common_name: str) -> str:
        return self._run("csr", label, "--cn", common_name)

    def delete(self, label: str) -> None:
        self._run("delete", label)

    @classmethod
    def of(cls, cfg: Config) -> TokenKeys:
        """The key processes for this config: they must read the same file, so it must have come from one."""
        if cfg.path is None:
            raise AgentError("key operations run `iot-agent --config PATH keys`: this config was not read from a file")
        return cls(cfg.path)


def serial_number(cfg: Config, state: dict) -> str:
    return cfg.provisioning.serial_number or state.get("factory", {}).get("serial", "")


def claim_certificate(cfg: Config, state: dict) -> Path:
    recorded = state.get("factory", {}).get("claim_certificate")
    if recorded:
        return Path(recorded)
    p = cfg.provisioning.claim_certificate
    return p if p.is_absolute() else cfg.resolve(cfg.device.state_dir) / p


PROVISIONING = Machine(
    "provisioning",
    State(
        "keygen",
        "the device key is made on the token (kept if a cut run made it)",
        ("csr",),
        "makes it again or keeps it",
    ),
    State("csr", "the CSR is signed on the token", ("requesting_certificate", "keygen"), "signs it again"),
    State(
        "requesting_certificate",
        "CreateCertificateFromCsr over the claim connection; the answer is checked, then the certificate file written",
        ("certificate", "csr"),
        "asks again (a lost answer leaves a certificate nobody registers)",
    ),
    State(
        "certificate",
        "the certificate, its id and ownership token recorded",
        ("registering", "csr"),
        "registers it, or asks for a new certificate once the ownership token has (nearly) expired",
    ),
    State(
        "registering",
        "RegisterThing with the fleet template and the ownership token",
        ("registered", "certificate", "csr"),
        "registers again with the same token (AWS answers it idempotently)",
    ),
    State("registered", "the thing's name recorded", ("done",), "commits"),
    State(
        "done",
        "ONE write makes the thing, the certificate and the key the device's identity",
        (),
        "nothing: the device connects as itself",
    ),
    start=("keygen",),
)


@dataclass(eq=False)
class Provisioner:
    cfg: Config
    store: StateStore
    pin: str
    keys: TokenKeys | None = None  # None: `iot-agent keys` processes with this config, made on first use
    connect: Callable[[ConnectionSettings], Connection] = Connection
    now: Callable[[], float] = time.time

    def _keys(self) -> TokenKeys:
        if self.keys is None:
            self.keys = TokenKeys.of(self.cfg)
        return self.keys

    # -- state helpers ----------------------------------------------------------------------
    def _flow(self) -> dict:
        return dict(self.store.load().get("provisioning", {}))

    def _save(self, **changes) -> dict:
        if "step" in changes:
            PROVISIONING.move(self._flow().get("step"), changes["step"])
        return self.store.update_section("provisioning", **changes)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> bool:
        """Provision, retrying refusals with bounded jittered backoff; False if stopped first."""
        pv = self.cfg.provisioning
        backoff = Backoff(pv.retry_min_s, pv.retry_max_s)
        while not stop.is_set():
            try:
                self.attempt(stop)
                return True
            except ProvisioningError as e:
                refusal = (e.code, e.message, e.retry_from)
            # Outside the except block: the traceback (and the MQTT client and PKCS#11 library its
            # frames hold) is released before the next attempt loads the library again.
            code, message, retry_from = refusal
            flow = self._flow()
            attempts = int(flow.get("attempts", 0)) + 1
            changes = {"attempts": attempts, "last_error": {"code": code, "message": message, "at": int(self.now())}}
            if retry_from:
                changes["step"] = retry_from
            self._save(**changes)
            delay = backoff.next_delay()
            log.error("provisioning refused: %s: %s (attempt %d); retrying in %.1f s", code, message, attempts, delay)
            from agent.session.clock import wait_beating

            if wait_beating(stop, delay):
                return False
        return False

    def attempt(self, stop: threading.Event) -> None:
        from agent.base import sdnotify

        # Key generation, the claim connection and three requests, each bounded by its own timeout.
        sdnotify.expect_busy(120 + self.cfg.broker.connect_timeout_s + 4 * (REQUEST_TIMEOUT_S + 5))
        state = self.store.load()
        if state.get("thing_name") and state.get("certificate_file"):
            return
        serial = serial_number(self.cfg, state)
        if not serial:
            raise AgentError(
                "provisioning: no serial number; run `iot-agent factory init --serial ...` or set "
                "provisioning.serial_number"
            )
        claim_cert = claim_certificate(self.cfg, state)
        if not claim_cert.is_file():
            raise AgentError(
                f"provisioning: claim certificate {claim_cert} not found; run `iot-agent factory claim-cert`"
            )
        flow = self._flow()
        key_label = self.cfg.pkcs11.key_label
        step = flow.get("step", "keygen")
        if step == "done":
            return

        # 1. The device key and its CSR, made on the token while nothing else holds it.
        if step in ("keygen", "csr") or not flow.get("csr_pem"):
            flow = self._save(step="keygen", key_label=key_label)
            self._keys().ensure_key(key_label)  # reuses the key a previous run left on the token
            flow = self._save(step="csr", csr_pem=self._keys().csr(key_label, serial))
            log.info("device key %r on the token; CSR signed there", key_label)

        # 2. The claim connection, for as short a time as possible.
        settings = self._claim_settings(claim_cert, serial)
        conn = self.connect(settings)
        conn.start()
        try:
            if not conn.wait_connected(self.cfg.broker.connect_timeout_s):
                last = conn.last_error(default="no answer")
                raise ProvisioningError(
                    "ClaimConnectionRefused", f"the broker did not accept the claim certificate ({last})"
                )
            log.info("connected with the claim certificate as %s", settings.client_id)
            flow = self._exchange(conn, flow, serial)
        finally:
            conn.stop()

        # 3. Commit: from now on the agent is this thing.
        PROVISIONING.move(self._flow().get("step"), "done")
        self.store.update(
            thing_name=flow["thing_name"],
            certificate_file=flow["certificate_file"],
            key_label=key_label,
            provisioning={**flow, "step": "done", "ownership_token": None, "last_error": None},
        )
        log.info("provisioned as %s (certificate %s)", flow["thing_name"], flow["certificate_id"][:12])
        if self.cfg.provisioning.delete_claim_key:
            try:
                self._keys().delete(self.cfg.provisioning.claim_key_label)
                log.info("claim key deleted from the token")
            except AgentError as e:
                log.warning("could not delete the claim key: %s", e)

    def _claim_settings(self, claim_cert: Path, serial: str) -> ConnectionSettings:
        return ConnectionSettings.from_config(
            self.cfg, f"claim-{serial}", claim_cert, self.cfg.provisioning.claim_key_label, self.pin
        )

    def _exchange(self, conn: Connection, flow: dict, serial: str) -> dict:
        from awsiot import iotidentity

        idc = conn.service_client(iotidentity.IotIdentityClientV2, 3, 1, REQUEST_TIMEOUT_S)
        pv = self.cfg.provisioning
        for _ in range(3):  # at most: request, expired token -> request again, register
            step = flow.get("step")
            token_at = flow.get("token_at") or 0
            if step in ("certificate", "registering") and self.now() - token_at > TOKEN_LIFETIME_S - TOKEN_MARGIN_S:
                log.warning(
                    "ownership token from %.0f min ago has (nearly) expired; requesting a new certificate",
                    (self.now() - token_at) / 60,
                )
                flow = self._save(step="csr", ownership_token=None)
                step = "csr"
            if step in ("csr", "requesting_certificate"):
                flow = self._save(step="requesting_certificate")
                resp = identity_request(
                    idc.create_certificate_from_csr(
                        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=flow["csr_pem"])
                    )
                )
                killpoints.op("cloud:create-certificate")
                try:  # checked completely before anything is written
                    issued = issued_certificate(
                        resp.certificate_pem,
                        resp.certificate_id,
                        resp.certificate_ownership_token,
                        flow["csr_pem"],
                        self.now(),
                    )
                except AnswerError as e:
                    raise ProvisioningError(
                        "InvalidAnswer", f"CreateCertificateFromCsr: {e}", retry_from="csr"
                    ) from None
                cert_file = self.store.directory / f"device-{issued.certificate_id}.pem"
                durable.write_atomic(cert_file, issued.pem, 0o644)
                flow = self._save(
                    step="certificate",
                    certificate_id=issued.certificate_id,
                    certificate_file=str(cert_file),
                    ownership_token=issued.ownership_token,
                    token_at=int(self.now()),
                )
                log.info("certificate %s issued (pending activation)", issued.certificate_id[:12])
                continue
            if step in ("certificate", "registering"):
                flow = self._save(step="registering")
                params = {**pv.parameters, "SerialNumber": serial}
                try:
                    reg = identity_request(
                        idc.register_thing(
                            iotidentity.RegisterThingRequest(
                                template_name=pv.template_name,
                                certificate_ownership_token=flow["ownership_token"],
                                parameters=params,
                            )
                        )
                    )
                except ProvisioningError as e:
                    if e.code == "InvalidPayload" and "ownership" in e.message.lower():
                        e.retry_from = "csr"  # the token is gone: start the certificate over
                    else:
                        e.retry_from = "certificate"
                    raise
                killpoints.op("cloud:register-thing")
                try:
                    name = thing_name(reg.thing_name)
                except AnswerError as e:
                    raise ProvisioningError("InvalidAnswer", f"RegisterThing: {e}", retry_from="certificate") from None
                flow = self._save(step="registered", thing_name=name)
                return flow
            if step == "registered":
                return flow
            raise AgentError(f"provisioning: unknown step {step!r} in the state file")
        raise AgentError("provisioning: no progress after three steps")


def identity_request(future):
    """Wait for an identity request; AWS's rejection becomes a ProvisioningError with its code."""
    import awsiot

    try:
        return future.result(REQUEST_TIMEOUT_S + 5)
    except awsiot.V2ServiceException as e:
        err = e.modeled_error
        if err is not None:
            raise ProvisioningError(
                str(err.error_code or "Rejected")[:64],
                f"{str(err.error_message)[:300]} (status {str(err.status_code)[:8]})",
            ) from None
        raise ProvisioningError("RequestFailed", str(e.message if hasattr(e, "message") else e)[:200]) from None
    except (ValueError, TypeError, KeyError) as e:  # an answer the SDK could not model
        raise ProvisioningError("InvalidAnswer", f"the answer could not be read ({e.__class__.__name__})") from None
    except TimeoutError:
        raise ProvisioningError("Timeout", "no answer from the provisioning service") from None
