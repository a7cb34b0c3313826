"""Certificate rotation: a new key on the token, proven on a real connection before the old is dropped.

A write-ahead state machine (`rotation` in the state file), like provisioning; ROTATION below lists every
step, where its work runs and what follows it (ROTATION below). In short:

    prepare   keygen (on the token, between sessions) -> requesting -> registering (over the connection)
    switch    the daemon restarts its session with the new certificate and key; it must connect
              within prove_timeout_s
    commit    proven: ONE state write records the commit and makes the new certificate and key the
              identity; then, connected with the new identity only, the cloud is told to deactivate
              the old certificate (dt/<thing>/certificate-rotation/commit)
    cleanup   the old key is deleted from the token (never the key in use) and its certificate file
    abandon   not proven: the daemon is back on the old identity, tells the cloud to deactivate the
              new certificate, deletes the new key, and retries later with backoff

Whatever step a power cut interrupts, the device comes back on the old identity (before commit)
or the new one (from commit on), never neither, and ends with one active certificate and one key.
The CreateCertificateFromCsr and RegisterThing answers are checked (agent.answers) before anything
is saved: a certificate for another key, a wrong id or thing is refused and the attempt fails.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base import durable, killpoints
from agent.base.backoff import Backoff
from agent.base.config import Config
from agent.base.digest import sha256, token_hex
from agent.base.errors import AgentError
from agent.base.machine import Machine, State
from agent.base.state import StateStore
from agent.base.x509lite import der, validity
from agent.identity.answers import AnswerError, issued_certificate, thing_name
from agent.identity.provisioning import ProvisioningError, TokenKeys, identity_request

log = logging.getLogger("agent.rotation")


# The whole state machine: the record (`rotation` in the state file) is written before each effect, and
# `where` says where a step's work runs: "token" between sessions, while no connection holds the token (a
# TPM without a resource manager has room for one user); "connection" over the session's live connection;
# "prove" is the next session's connection itself.
ROTATION = Machine(
    "rotation",
    State(
        "idle",
        "nothing under way; due (expiry window, age) or requested (job, `iot-agent rotate`): a new key "
        "label is recorded",
        ("keygen",),
        "checks again at start",
        "connection",
    ),
    State(
        "keygen",
        "the new key is made on the token (kept if it exists) and the CSR signed there",
        ("requesting", "abandon_cleanup"),
        "makes the key again or keeps it",
        "token",
    ),
    State(
        "requesting",
        "CreateCertificateFromCsr; the answer is checked, then the certificate saved",
        ("registering", "abandon_cleanup"),
        "asks again (a lost answer leaves an unused certificate, never attached)",
        "connection",
    ),
    State(
        "registering",
        "RegisterThing with the rotation template; the answer is checked",
        ("switch", "abandon_cleanup"),
        "registers again with the same ownership token",
        "connection",
    ),
    State(
        "switch",
        "the next session connects with the new certificate and key; connected within "
        "prove_timeout_s: ONE write records the commit and makes it the identity",
        ("commit", "abandon"),
        "proves it again",
        "prove",
    ),
    State(
        "commit",
        "connected with the NEW identity: the cloud deactivates the old certificate",
        ("cleanup",),
        "connects with the new identity and tells the cloud again (idempotent)",
        "connection",
    ),
    State(
        "cleanup", "the old key and the old certificate file are deleted", ("idle",), "deletes what is left", "token"
    ),
    State(
        "abandon",
        "connected with the OLD identity: the cloud deactivates the new certificate",
        ("abandon_cleanup",),
        "tells the cloud again",
        "connection",
    ),
    State(
        "abandon_cleanup",
        "the new key and certificate file are deleted; the job FAILED; retried after a backoff",
        ("idle",),
        "deletes what is left",
        "token",
    ),
    start=("idle", "keygen"),
)

ANSWER_TIMEOUT_S = 30.0


def certificate_id(cert_file: Path) -> str:
    """AWS's certificate ID: the SHA-256 of the DER certificate, in hex."""
    return sha256(der(cert_file.read_bytes())).hexdigest()


def due(cert_file: Path, cfg: Config, now: float | None = None) -> str | None:
    """Why the certificate should be rotated now (expiry window or age), or None."""
    r = cfg.rotation
    try:
        v = validity(cert_file.read_bytes())
    except OSError:
        return None
    if v is None:
        return None
    now = time.time() if now is None else now
    before, after = v
    if after - now < r.expiry_window_days * 86400:
        return f"certificate expires in {(after - now) / 86400:.1f} days (window {r.expiry_window_days:g})"
    if now - before > r.max_age_days * 86400:
        return f"certificate is {(now - before) / 86400:.1f} days old (maximum {r.max_age_days:g})"
    return None


@dataclass(eq=False)
class Rotator:
    cfg: Config
    store: StateStore
    thing: str
    keys: TokenKeys | None = None  # None: `iot-agent keys` processes with this config, made on first use
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def _keys(self) -> TokenKeys:
        if self.keys is None:
            self.keys = TokenKeys.of(self.cfg)
        return self.keys

    # -- state ----------------------------------------------------------------------------
    def flow(self) -> dict:
        return dict(self.store.load().get("rotation", {}))

    def _save(self, **changes: Any) -> dict:
        """Merge into the rotation record under the state store's lock (the jobs thread, the rotation
        worker, the session and `iot-agent rotate` all write it)."""
        if "step" in changes:
            with self._lock:
                ROTATION.move(self.flow().get("step"), changes["step"])
                return self.store.update_section("rotation", **changes)
        return self.store.update_section("rotation", **changes)

    def attach_job(self, job_id: str) -> None:
        """A rotate-certificate job arrived while a rotation is under way: it reports that one."""
        self._save(job_id=job_id)

    @property
    def step(self) -> str:
        return self.flow().get("step", "idle")

    def pending_identity(self) -> tuple[str, str] | None:
        """(certificate file, key label) to prove, while a switch is under way."""
        f = self.flow()
        if f.get("step") == "switch":
            return f["certificate_file"], f["label"]
        return None

    def needs_token_work(self) -> bool:
        return self.step in ROTATION and ROTATION[self.step].where == "token"

    def token_work_failed(self, why: str) -> None:
        """The token refused the key work: a rotation still preparing gives up (and retries later); a
        cleanup is simply tried again at the next session."""
        if self.step == "keygen":
            self.fail_prepare(why)

    def take_job(self, job_id: str) -> None:
        """A rotate-certificate job: starts a rotation, or reports the one under way."""
        if self.step == "idle":
            self.request(job_id, f"job {job_id}")
        elif not self.flow().get("job_id"):
            self.attach_job(job_id)

    def advance(self, conn, certificate_file: Path, key_label: str) -> bool:
        """The connection step's work, over a live connection made with (certificate_file, key_label). True
        when it recorded a step whose work belongs to another session (the caller ends this one)."""
        step = self.step
        if step in ("commit", "abandon"):
            self.finish(conn, certificate_file, key_label)
            return True
        if step in ("requesting", "registering"):
            try:
                self.prepare(conn)
            except AgentError as e:
                self.fail_prepare(str(e))
                log.error("certificate rotation refused: %s", e)
            return True
        reason = self.wanted(certificate_file) if step == "idle" else None
        if reason:
            self.start(certificate_file, key_label, reason)
            return True
        return False

    def next_check_in(self, connected: bool) -> float:
        """Seconds until advance() is worth calling again (a wake-up comes sooner on a request)."""
        wait = self.cfg.rotation.check_interval_s if connected else 1.0
        if self.step != "idle":
            wait = min(wait, 30.0)
        retry_at = float(self.flow().get("next_attempt_at", 0))
        if retry_at > time.time():  # a failed rotation is tried again when its backoff ends, not a day later
            wait = min(wait, max(1.0, retry_at - time.time() + 0.1))
        return wait

    def request(self, job_id: str | None = None, reason: str = "requested") -> None:
        self._save(requested={"job_id": job_id, "reason": reason, "at": int(time.time())})

    def wanted(self, cert_file: Path) -> str | None:
        """The reason to start a rotation now, if any (a request beats the backoff; a due one waits for it)."""
        f = self.flow()
        if f.get("step", "idle") != "idle":
            return None
        if f.get("requested"):
            return f["requested"].get("reason", "requested")
        if not self.cfg.rotation.enabled or time.time() < float(f.get("next_attempt_at", 0)):
            return None
        last = f.get("last") or {}
        if (
            last.get("status") == "SUCCEEDED"
            and time.time() - float(last.get("at", 0)) < self.cfg.rotation.check_interval_s
        ):
            return None  # a fresh certificate that is "due" at once (issued shorter than the window) waits a check
        return due(cert_file, self.cfg)

    # -- prepare: over the current connection ---------------------------------------------------
    def start(self, current_cert: Path, current_label: str, reason: str) -> None:
        """Record a new rotation; its key is made by token_work() before the next session connects."""
        with self._lock:
            f = self.flow()
            n = int(f.get("generation", 0)) + 1
            self._save(
                step="keygen",
                generation=n,
                label=f"{self.cfg.pkcs11.key_label}-r{n}-{token_hex(2)}",
                reason=reason,
                old={
                    "certificate_file": str(current_cert),
                    "key_label": current_label,
                    "certificate_id": certificate_id(current_cert),
                },
                job_id=(f.get("requested") or {}).get("job_id"),
                requested=None,
                certificate_id=None,
            )
            log.info("certificate rotation started: %s", reason)

    def token_work(self) -> None:
        """Key generation, CSR and key deletion, run between sessions while nothing else holds the token
        (a TPM without a resource manager, like swtpm, has room for one user at a time)."""
        f = self.flow()
        step = f.get("step")
        if step == "keygen":
            self._keys().ensure_key(f["label"])
            self._save(step="requesting", csr_pem=self._keys().csr(f["label"], self.thing))
            log.info("new key %r on the token; CSR signed there", f["label"])
        elif step == "cleanup":
            in_use = self.store.load().get("key_label")
            old = f["old"]
            if old["key_label"] == in_use or old["certificate_file"] == self.store.load().get("certificate_file"):
                # Never reached by the flow (commit switches the identity in the same write); a record
                # that says otherwise is not trusted to delete the key the device connects with.
                log.error("certificate rotation: the old identity is still the one in use; nothing deleted")
                self._done(f, "FAILED", "rotation record inconsistent with the identity in use; old key kept")
                return
            self._delete_key(old["key_label"])
            if Path(old["certificate_file"]).parent == self.store.directory:  # never a file the config names
                durable.remove(Path(old["certificate_file"]))
            self._done(f, "SUCCEEDED", f"rotated to certificate {f['certificate_id'][:12]}")
            log.info("certificate rotation done: now certificate %s, key %r", f["certificate_id"][:12], f["label"])
        elif step == "abandon_cleanup":
            self._finish_failed(f, (f.get("last_error") or {}).get("message", "not proven"))

    # -- prepare: over the current connection ---------------------------------------------------
    def prepare(self, conn) -> None:
        """Create and register the new certificate; ends in step "switch" (raises on refusal)."""
        from awsiot import iotidentity

        with self._lock:
            f = self.flow()
            idc = conn.service_client(iotidentity.IotIdentityClientV2, 3, 1, ANSWER_TIMEOUT_S)
            if f["step"] == "requesting":
                resp = identity_request(
                    idc.create_certificate_from_csr(
                        iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=f["csr_pem"])
                    )
                )
                killpoints.op("cloud:create-certificate")
                try:
                    issued = issued_certificate(
                        resp.certificate_pem,
                        resp.certificate_id,
                        resp.certificate_ownership_token,
                        f["csr_pem"],
                        time.time(),
                    )
                except AnswerError as e:
                    raise ProvisioningError("InvalidAnswer", f"CreateCertificateFromCsr: {e}") from None
                cert_file = self.store.directory / f"device-{issued.certificate_id}.pem"
                in_use = {f["old"]["certificate_file"], self.store.load().get("certificate_file")}
                if str(cert_file) in in_use:
                    raise ProvisioningError(
                        "InvalidAnswer", "CreateCertificateFromCsr answered with the certificate in use"
                    )
                durable.write_atomic(cert_file, issued.pem, 0o644)
                f = self._save(
                    step="registering",
                    certificate_id=issued.certificate_id,
                    certificate_file=str(cert_file),
                    ownership_token=issued.ownership_token,
                )
            if f["step"] in ("certificate", "registering"):
                reg = identity_request(
                    idc.register_thing(
                        iotidentity.RegisterThingRequest(
                            template_name=self.cfg.rotation.template_name,
                            certificate_ownership_token=f["ownership_token"],
                            parameters={"ThingName": self.thing},
                        )
                    )
                )
                killpoints.op("cloud:register-thing")
                if reg.thing_name is not None:
                    try:
                        if thing_name(reg.thing_name) != self.thing:
                            raise AnswerError(
                                f"RegisterThing attached the new certificate to {reg.thing_name!r}, not to this thing"
                            )
                    except AnswerError as e:
                        raise ProvisioningError("InvalidAnswer", f"RegisterThing: {e}") from None
                f = self._save(step="switch", ownership_token=None, switch_at=int(time.time()))
                log.info("new certificate %s registered; switching to it", f["certificate_id"][:12])

    def fail_prepare(self, why: str) -> None:
        """A refusal before the switch: the new key is deleted between sessions, the next try waits."""
        self._save(step="abandon_cleanup", last_error={"message": why, "at": int(time.time())})

    # -- after the switch: proven or not --------------------------------------------------------
    def proven(self) -> dict:
        """The new identity connected: from here on it is the device's identity.

        ONE state write records the commit and switches the identity to the new certificate and key:
        after a power cut the agent connects with the new identity and finishes the commit from it.
        (Two writes once let a cut between them bring the agent back on the old certificate, retire
        that very certificate in the cloud and delete its key.)"""
        out: dict = {}

        def commit(data: dict) -> dict:
            ROTATION.move((data.get("rotation") or {}).get("step"), "commit")
            f = {**(data.get("rotation") or {}), "step": "commit"}
            out.update(f)
            return {**data, "rotation": f, "certificate_file": f["certificate_file"], "key_label": f["label"]}

        self.store.modify(commit)
        return out

    def not_proven(self, why: str) -> None:
        self._save(step="abandon", last_error={"message": why, "at": int(time.time())})
        log.error("the new certificate did not connect (%s); back to the old one", why)

    def finish(self, conn, certificate_file: Path | str, key_label: str) -> None:
        """On a live connection: tell the cloud (commit or abandon); the key work follows between sessions.

        The cloud is told to retire a certificate only over a connection made with the OTHER one:
        commit (deactivate the old) while connected with the new, abandon (deactivate the new) while
        connected with the old. The caller names the identity its connection uses."""
        f = self.flow()
        step = f.get("step")
        using = (str(certificate_file), key_label)
        if step == "commit":
            if using != (f["certificate_file"], f["label"]):
                log.error("certificate rotation: not connected with the new certificate; the old one is not retired")
                return
            self._tell_cloud(
                conn,
                "commit",
                {"newCertificateId": f["certificate_id"], "oldCertificateId": f["old"]["certificate_id"]},
            )
            self._save(step="cleanup")
        elif step == "abandon":
            if using != (f["old"]["certificate_file"], f["old"]["key_label"]):
                log.error("certificate rotation: not connected with the old certificate; the new one is not retired")
                return
            if f.get("certificate_id"):
                self._tell_cloud(conn, "abandon", {"certificateId": f["certificate_id"]})
            self._save(step="abandon_cleanup")

    def _tell_cloud(self, conn, action: str, body: dict) -> None:
        import queue

        token = token_hex(8)
        answers: queue.Queue[tuple[str, bytes]] = queue.Queue()
        prefix = f"cmd/{self.thing}/certificate-rotation/{action}/"
        self.inbox = (prefix, answers)
        conn.subscribe(prefix + "+")
        rc = conn.publish(f"dt/{self.thing}/certificate-rotation/{action}", json.dumps({**body, "clientToken": token}))
        if rc >= 128:
            raise AgentError(f"rotation {action}: the broker refused the message (reason {rc})")
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                topic, payload = answers.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                doc = json.loads(payload)
            except ValueError:
                continue
            if doc.get("clientToken") != token:
                continue
            if topic.endswith("/accepted"):
                killpoints.op(f"cloud:rotation-{action}")
                return
            raise AgentError(
                f"rotation {action} refused by the cloud: {str(doc.get('code'))[:64]}: {str(doc.get('message'))[:200]}"
            )
        raise AgentError(f"rotation {action}: no answer from the cloud within {ANSWER_TIMEOUT_S:g} s")

    def on_message(self, topic: str, payload: bytes) -> None:
        inbox = getattr(self, "inbox", None)
        if inbox and topic.startswith(inbox[0]):
            inbox[1].put((topic, payload))

    def _delete_key(self, label: str) -> None:
        try:
            self._keys().delete(label)
        except AgentError as e:
            if "no key" not in str(e).lower() and "not found" not in str(e).lower():
                raise

    def _finish_failed(self, f: dict, why: str) -> None:
        in_use = self.store.load().get("key_label") or self.cfg.pkcs11.key_label
        if (
            f.get("label")
            and f.get("step") not in ("idle", None)
            and f.get("label") not in (f.get("old", {}).get("key_label"), in_use)
        ):
            try:
                self._delete_key(f["label"])
            except AgentError as e:
                log.warning("could not delete the unused key %r: %s", f["label"], e)
        new_file = f.get("certificate_file")
        if (
            new_file
            and new_file != self.store.load().get("certificate_file")
            and Path(new_file).parent == self.store.directory
        ):
            durable.remove(Path(new_file))
        attempts = int(f.get("attempts", 0)) + 1
        b = Backoff(self.cfg.rotation.retry_min_s, self.cfg.rotation.retry_max_s)
        delay = 0.0
        for _ in range(min(attempts, 30)):
            delay = b.next_delay()
        self._done(f, "FAILED", why, attempts=attempts, next_attempt_at=time.time() + delay)
        log.error("certificate rotation failed: %s; the old certificate stays; next try in %.0f s", why, delay)

    def _done(self, f: dict, status: str, why: str, **extra: Any) -> None:
        results = dict(f.get("results", {}))
        if f.get("job_id"):
            results[f["job_id"]] = [status, why, time.time_ns()]  # when: the state file sorts keys, not by age
        newest = sorted(results, key=lambda k: results[k][2] if len(results[k]) > 2 else 0)[-20:]
        keep = {k: f[k] for k in ("generation",) if k in f}
        record = {
            **keep,
            "step": "idle",
            "results": {k: results[k] for k in newest},
            "last": {"status": status, "reason": why, "at": int(time.time())},
            "attempts": 0 if status == "SUCCEEDED" else extra.get("attempts", 0),
            **{k: v for k, v in extra.items() if k != "attempts"},
        }

        def done(data: dict) -> dict:
            ROTATION.move((data.get("rotation") or {}).get("step"), "idle")
            return {**data, "rotation": record}

        self.store.modify(done)


def job_outcome(rotator: Rotator, job_id: str):
    """The recorded result of a rotate-certificate job, or None while it is still under way."""
    res = rotator.flow().get("results", {}).get(job_id)
    return tuple(res) if res else None


class ExpiredCertificate(AgentError):
    exit_code = 2


def check_not_expired(cert_file: Path, now: float | None = None) -> None:
    """An expired device certificate cannot connect, and so cannot rotate: say so once and stop
    (exit 2: the service manager does not restart on it), instead of a reconnect loop."""
    try:
        v = validity(cert_file.read_bytes())
    except OSError:
        return
    if v and (time.time() if now is None else now) > v[1]:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(v[1]))
        raise ExpiredCertificate(
            f"{cert_file}: the device certificate expired on {when}; it cannot connect or rotate itself. "
            "Enable rotation (it renews 30 days ahead) and re-provision this device (factory claim certificate)"
        )


__all__ = ["Rotator", "due", "certificate_id", "job_outcome", "check_not_expired", "ProvisioningError"]
