"""LocalCloud: the folder, its PKI and registry, and `up` / `down` of the broker and services.

Layout of DIR (created once, mode 0700, kept across restarts):
  pki/            0700: the CA, server, service and claim keys (0600) and certificates, url-secret (0600)
  registry.sqlite 0600 (and its -wal/-shm): certificates with live ownership tokens, things, allow list,
                  manufacturer CAs (JITP), thing groups, jobs, shadows, Defender reports
  broker/         mosquitto.conf, acl, crl.pem, connect-rules, identities, cas/ (registered manufacturer
                  CAs, by subject hash), mosquitto.log, mosquitto.pid
  service.log     the services process
  endpoint.json   what agents and tests read: endpoint, port, CA path, jitp_port, artifacts_port, tunnels_port
  pids.json       what `down` stops
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from . import jitp, pace, plugin, policy, procs
from .broker import Broker
from .pki import CertificateAuthority, pem
from .registry import Registry

SERVICE_CN = "localcloud-service"
OBSERVER_CN = "observer"
# An application in the cloud (what an IoT rule or a backend does): commands to devices, their telemetry.
OPERATOR_CN = "operator"
TEMPLATE_NAME = "iot-agent-fleet"
ROTATION_TEMPLATE = "iot-agent-rotation"  # a device renews its own certificate (provisioning/rotation-template.json)
QUARANTINE_GROUP = "quarantine"  # its things get provisioning/quarantine-policy.json instead of the device policy


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # threads reconcile too
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(eq=False)
class LocalCloud:
    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        # 0700 when created here (an existing folder is left as it is: every secret in it is 0600 or
        # in pki/, which is 0700 either way).
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ca = CertificateAuthority(self.directory / "pki", "localcloud root CA")
        if not (self.directory / "pki" / "server.pem").exists():
            self.ca.issue_server("server", ["localhost", "127.0.0.1"], days=825)
            self.ca.issue_client("service", SERVICE_CN, days=825)
        self.registry = Registry(self.directory / "registry.sqlite")

    # -- paths ------------------------------------------------------------------------------
    @property
    def broker_dir(self) -> Path:
        return self.directory / "broker"

    @property
    def endpoint_file(self) -> Path:
        return self.directory / "endpoint.json"

    def endpoint(self) -> dict:
        return json.loads(self.endpoint_file.read_text())

    def broker(self, port: int = 0, jitp_port: int = 0) -> Broker:
        """mosquitto with two listeners: `port` for everything the local CA issued (CRL checked), and
        `jitp_port` for devices of registered manufacturer CAs (just-in-time provisioning).

        Two because mosquitto's `crlfile` turns on OpenSSL's CRL check for every client certificate,
        which fails for an issuer without a CRL, and only a CA's own key can sign its CRL: the local
        cloud does not have a manufacturer's. On the JITP listener the plugin checks each certificate
        against the registry at CONNECT instead (see localcloud/plugin/localcloud_route.c)."""
        from cryptography import x509

        from .pki import Issued

        pki = self.directory / "pki"
        issued = Issued(
            pki / "server.pem", pki / "server.key", x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
        )
        so = plugin.build()
        (self.broker_dir / "cas").mkdir(parents=True, exist_ok=True)
        return Broker(
            self.broker_dir,
            self.ca,
            issued,
            port=port,
            acl=self.acl_text(),
            extra_conf=[
                f"crlfile {self.broker_dir / 'crl.pem'}",
                f"pid_file {self.broker_dir / 'mosquitto.pid'}",
                f"plugin {so}",
                f"plugin_opt_service_user {SERVICE_CN}",
                f"plugin_opt_service_client {SERVICE_CN}",
                f"plugin_opt_connect_rules {self.broker_dir / 'connect-rules'}",
                f"plugin_opt_identities {self.broker_dir / 'identities'}",
                # The JITP listener: trusts only the registered CAs (a hashed directory, so a CA registered
                # while the broker runs is trusted at once), no CRL, identities from the plugin.
                f"listener {jitp_port or procs.free_port()} 127.0.0.1",
                f"capath {self.broker_dir / 'cas'}",
                f"certfile {issued.cert_path}",
                f"keyfile {issued.key_path}",
                "require_certificate true",
                "tls_version tlsv1.2",
                *self._persistence_conf(),
            ],
        )

    def _persistence_conf(self) -> list[str]:
        # A high cap on what waits for a slow subscriber (mosquitto drops past 1,000 by default; AWS IoT Core
        # does not). Not 0: mosquitto 2.0.11 then queues nothing beyond the in-flight window (checked: requests
        # to the local cloud's service were lost).
        unbounded = ["max_queued_messages 1000000"]
        if not self.settings().get("broker_persistence"):
            return unbounded
        store = self.broker_dir / "persist"
        store.mkdir(parents=True, exist_ok=True)
        # The last "persistence" line wins over the base config's "persistence false".
        return ["persistence true", f"persistence_location {store}/", *unbounded]

    def restart_broker(self, down_for: float = 0.0, timeout: float = 20.0) -> None:
        """Stop mosquitto (SIGTERM: it saves its persistence file) and start it again on the same ports."""
        pids = json.loads((self.directory / "pids.json").read_text())
        info = self.endpoint()
        pid, since = pids["mosquitto"], pids.get("started", {}).get("mosquitto")
        if _alive(pid, since):
            os.kill(pid, signal.SIGTERM)
            deadline = pace.deadline(timeout)
            while _alive(pid, since) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid, since):
                os.kill(pid, signal.SIGKILL)
        time.sleep(down_for)
        b = self.broker(info["port"], info["jitp_port"])
        deadline = pace.deadline(timeout)
        while not _port_free(info["port"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        b.start(timeout)
        pids["mosquitto"] = b.child.pid
        pids.setdefault("started", {})["mosquitto"] = _start_time(b.child.pid)
        _atomic_write(self.directory / "pids.json", json.dumps(pids).encode())

    # -- settings -----------------------------------------------------------------------------
    # device_cert_days: validity of certificates from CreateCertificateFromCsr (fleet and rotation);
    # rotation_refused: the rotation template answers 403, as a pre-provisioning hook that says no would.
    # rotation_new_inactive: the rotation template attaches the new certificate but leaves it INACTIVE.
    # tamper_answers (tests only): {"create-from-csr" | "provision": {field: value}} replaces fields of
    #   accepted provisioning answers, as a hostile network would.
    DEFAULT_SETTINGS = {
        "defender_min_interval_s": 300.0,
        "device_cert_days": 365.0,
        "rotation_refused": False,
        "rotation_new_inactive": False,
        "tamper_answers": {},
        # The broker keeps sessions and queued messages across its restarts (mosquitto's persistence,
        # saved when it stops): a test that restarts the broker while counting what arrived needs it,
        # as AWS IoT Core never forgets a message it acknowledged.
        "broker_persistence": False,
    }

    def settings(self) -> dict:
        try:
            saved = json.loads((self.directory / "settings.json").read_text())
        except FileNotFoundError:
            saved = {}
        return {**self.DEFAULT_SETTINGS, **saved}

    def configure(self, **changes) -> dict:
        unknown = set(changes) - set(self.DEFAULT_SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        merged = {**self.settings(), **changes}
        _atomic_write(self.directory / "settings.json", json.dumps(merged, indent=1).encode())
        return merged

    # -- policy → broker ----------------------------------------------------------------------
    def acl_text(self) -> str:
        claim_rules = policy.rules(policy.load_policy("claim-policy.json"))
        device_rules = policy.rules(policy.load_policy("device-policy.json"))
        quarantine_rules = policy.rules(policy.load_policy("quarantine-policy.json"))
        quarantined = set(self.registry.group_things(QUARANTINE_GROUP))
        lines = [
            "# Generated by localcloud from provisioning/*.json and the registry; do not edit.",
            f"user {SERVICE_CN}",
            "topic readwrite #",
            "topic readwrite $aws/#",
            "topic readwrite $localcloud/#",
            f"user {OBSERVER_CN}",
            "topic read #",
            f"user {OPERATOR_CN}",
            "topic readwrite cmd/#",
            "topic read dt/#",
        ]
        for c in self.registry.certificates():
            if c.status != "ACTIVE":
                continue
            if c.kind == "claim":
                lines += policy.acl_lines(c.cn, claim_rules, None)
            elif c.thing:
                lines += policy.acl_lines(c.cn, quarantine_rules if c.thing in quarantined else device_rules, c.thing)
        return "\n".join(lines) + "\n"

    def connect_rules(self) -> str:
        """'<CN> <allowed client id>' per identity: the device policy's client/${ThingName}; claims any."""
        lines = []
        for c in self.registry.certificates():
            if c.status == "ACTIVE" and c.kind == "claim":
                lines.append(f"{c.cn} *")
            elif c.status == "ACTIVE" and c.thing:
                lines.append(f"{c.cn} {c.thing}")
        return "\n".join(lines) + "\n"

    def identities(self) -> str:
        """'<certificate id> <status> <broker username>' per certificate: what the plugin checks on the JITP
        listener."""
        return "".join(f"{c.id} {c.status} {c.cn}\n" for c in self.registry.certificates())

    def _write_ca_directory(self) -> None:
        """The registered CAs as OpenSSL's hashed directory (<subject hash>.<n>), for the JITP listener's capath."""
        cas = self.broker_dir / "cas"
        cas.mkdir(parents=True, exist_ok=True)
        wanted: dict[str, bytes] = {}
        for ca in self.registry.ca_certificates():
            if ca.status != "ACTIVE":
                continue
            h = _subject_hash(ca.pem.encode())
            n = 0
            while f"{h}.{n}" in wanted:
                n += 1
            wanted[f"{h}.{n}"] = ca.pem.encode()
        for name, data in wanted.items():
            path = cas / name
            if not path.exists() or path.read_bytes() != data:
                _atomic_write(path, data)
        for old in cas.iterdir():
            if old.name not in wanted and not old.name.startswith("."):
                old.unlink()  # mosquitto keeps a CA it already loaded until it restarts

    def reconcile(self) -> None:
        """Write the ACL, CRL, connect rules, identities and CA directory from the registry and have a
        running mosquitto reload them.

        The services process and a test (or `localcloud` command) both change the registry, so the
        read-then-write runs under a lock file: without it a reconcile that read the registry before
        another process's change could land after that process's own reconcile and drop the change."""
        import fcntl

        self.broker_dir.mkdir(parents=True, exist_ok=True)
        with open(self.broker_dir / ".reconcile.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _atomic_write(self.broker_dir / "acl", self.acl_text().encode())
            _atomic_write(self.broker_dir / "connect-rules", self.connect_rules().encode())
            _atomic_write(self.broker_dir / "identities", self.identities().encode())
            self._write_ca_directory()
            held = [(int(c.serial, 16), c.status) for c in self.registry.certificates() if c.status != "ACTIVE"]
            _atomic_write(self.broker_dir / "crl.pem", self.ca.crl(held, self.registry.next_crl_number()))
        pid = self._mosquitto_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _mosquitto_pid(self) -> int | None:
        try:
            return int((self.broker_dir / "mosquitto.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    # -- identities the operator hands out ------------------------------------------------------
    def issue_claim(self, name: str) -> tuple[Path, Path]:
        """A claim (bootstrap) certificate with a software key, registered ACTIVE.

        The factory step (issue 4) puts claim keys on the device's token instead; this one is for
        tests and the sandbox.
        """
        issued = self.ca.issue_client(f"claim-{name}", f"claim-{name}")
        der = issued.cert.public_bytes(serialization.Encoding.DER)
        self.registry.add_certificate(
            der, pem(issued.cert).decode(), f"claim-{name}", issued.cert.serial_number, "claim", "ACTIVE"
        )
        self.reconcile()
        return issued.cert_path, issued.key_path

    def sign_claim_csr(self, csr_pem: bytes, out: Path) -> str:
        """Sign a claim CSR (key on the device's token) and register the result as an ACTIVE claim."""
        rec = self._sign_csr(csr_pem, "claim", "claim-", 8)
        Path(out).write_bytes(rec.pem.encode())
        self.reconcile()
        return rec.id

    def _sign_csr(self, csr_pem: bytes, kind: str, prefix: str, nbytes: int):
        """A CSR whose key stays on a token, signed by the cloud's CA and registered ACTIVE (not reconciled)."""
        import secrets

        from cryptography import x509

        req = x509.load_pem_x509_csr(csr_pem)
        if not req.is_signature_valid:
            raise ValueError(f"{kind} CSR signature does not verify")
        cn = prefix + secrets.token_hex(nbytes)
        cert = self.ca.sign_public_key(req.public_key(), cn)
        der = cert.public_bytes(serialization.Encoding.DER)
        return self.registry.add_certificate(der, pem(cert).decode(), cn, cert.serial_number, kind, "ACTIVE")

    def issue_device_certificate(self, csr_pem: bytes, thing: str, attributes: dict[str, str] | None = None) -> str:
        """A pre-provisioned device: sign its CSR (key on its token), create the thing, attach the
        certificate ACTIVE; returns the certificate PEM. AWS does the same with CreateCertificateFromCsr
        (--set-as-active), CreateThing and AttachThingPrincipal. The device then needs no claim."""
        rec = self._sign_csr(csr_pem, "device", "dev-", 12)
        self.registry.upsert_thing(thing, attributes or {})
        self.registry.activate_and_attach(rec.id, thing)
        self.reconcile()
        return rec.pem

    def register_claim_certificate(self, cert_pem: bytes) -> str:
        """Register a claim certificate whose key lives elsewhere (on a token); returns its CN."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(cert_pem)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.registry.add_certificate(
            cert.public_bytes(serialization.Encoding.DER),
            cert_pem.decode(),
            str(cn),
            cert.serial_number,
            "claim",
            "ACTIVE",
        )
        self.reconcile()
        return str(cn)

    def set_certificate_status(self, cert_id: str, status: str) -> None:
        self.registry.set_status(cert_id, status)
        self.reconcile()

    # -- just-in-time provisioning ---------------------------------------------------------
    def register_ca(self, ca_cert_pem: bytes | str, jitp_template: dict | str) -> str:
        """Register a manufacturer CA with its JITP template (AWS: RegisterCACertificate with
        --set-as-active --allow-auto-registration --registration-config); returns its id (SHA-256).

        `jitp_template` is the template document ({"templateBody", "roleArn"}) as a dict or JSON text.
        Registering the same CA again replaces its template (AWS: UpdateCACertificate). Devices with
        certificates it issued connect on endpoint.json's `jitp_port`."""
        from .registry import certificate_id

        pem_bytes = ca_cert_pem.encode() if isinstance(ca_cert_pem, str) else ca_cert_pem
        cert = jitp.parse_ca_certificate(pem_bytes)
        if cert.subject == self.ca.cert.subject and cert.public_key() == self.ca.cert.public_key():
            raise ValueError("that is the local cloud's own CA, not a manufacturer's")
        config = json.loads(jitp_template) if isinstance(jitp_template, str) else jitp_template
        jitp.template_body(config)  # refuse a template the local cloud could not run, now rather than at first connect
        rec = self.registry.put_ca_certificate(
            certificate_id(cert.public_bytes(serialization.Encoding.DER)),
            cert.subject.rfc4514_string(),
            pem(cert).decode(),
            json.dumps(config, sort_keys=True),
        )
        self.reconcile()
        return rec.id

    # -- the quarantine thing group --------------------------------------------------------------
    def quarantine(self, thing: str) -> bool:
        """Put a thing in the quarantine group: its certificates get provisioning/quarantine-policy.json
        (jobs, streams, certificate rotation) instead of the device policy, on open connections too.
        True when it was not quarantined before."""
        if not self.registry.has_thing(thing):
            raise ValueError(f"no thing {thing!r}")
        added = self.registry.add_to_group(QUARANTINE_GROUP, thing)
        self.reconcile()
        return added

    def release(self, thing: str) -> bool:
        """Take a thing out of the quarantine group (the device policy applies again); True if it was in."""
        if not self.registry.has_thing(thing):
            raise ValueError(f"no thing {thing!r}")
        removed = self.registry.remove_from_group(QUARANTINE_GROUP, thing)
        self.reconcile()
        return removed

    def quarantined(self) -> list[str]:
        return self.registry.group_things(QUARANTINE_GROUP)

    # -- up / down ----------------------------------------------------------------------------
    def up(self, port: int = 0, timeout: float = 20.0) -> dict:
        if self.running():
            return self.endpoint()
        jitp_port = 0
        if self.endpoint_file.exists():
            saved = self.endpoint()
            if not port:
                port = saved.get("port", 0)  # same port across restarts when it is free
                if port and not _port_free(port):
                    port = 0
            jitp_port = saved.get("jitp_port", 0)
            if jitp_port and (jitp_port == port or not _port_free(jitp_port)):
                jitp_port = 0
        port = port or procs.free_port()
        while not jitp_port or jitp_port == port:
            jitp_port = procs.free_port()
        self.reconcile()
        b = self.broker(port, jitp_port)
        b.start()
        with open(self.directory / "service.log", "ab") as svc_log:  # the child keeps its own descriptor
            svc = subprocess.Popen(
                [sys.executable, "-m", "localcloud.service", "--dir", str(self.directory), "--port", str(b.port)],
                stdout=svc_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=procs.REPO,
            )
        pids: dict = {"mosquitto": b.child.pid, "service": svc.pid}
        # Each process's start time too: `down` must not signal a stranger that got the number later.
        pids["started"] = {name: _start_time(pid) for name, pid in list(pids.items())}
        _atomic_write(self.directory / "pids.json", json.dumps(pids).encode())
        ready = self.directory / "service.ready"
        deadline = pace.deadline(timeout)
        while not ready.exists():
            if svc.poll() is not None or time.monotonic() > deadline:
                self.down()
                log = (self.directory / "service.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"localcloud service did not start:\n{log}")
            time.sleep(0.05)
        info = {
            "endpoint": "localhost",
            "host": "127.0.0.1",
            "port": b.port,
            "ca_file": str(self.ca.cert_path),
            "template": TEMPLATE_NAME,
            "jitp_port": jitp_port,
            "artifacts_port": int((self.directory / "artifacts.port").read_text()),
            "tunnels_port": int((self.directory / "tunnels.port").read_text()),
        }
        _atomic_write(self.endpoint_file, json.dumps(info, indent=1).encode())
        return info

    def running(self) -> bool:
        try:
            pids = json.loads((self.directory / "pids.json").read_text())
        except FileNotFoundError:
            return False
        started = pids.get("started", {})
        return all(_alive(pids[n], started.get(n)) for n in ("mosquitto", "service"))

    def down(self, timeout: float = 10.0) -> None:
        try:
            pids = json.loads((self.directory / "pids.json").read_text())
        except FileNotFoundError:
            return
        started = pids.get("started", {})
        for name in ("service", "mosquitto"):
            pid, since = pids.get(name), started.get(name)
            if pid and _alive(pid, since):
                os.kill(pid, signal.SIGTERM)
                deadline = pace.deadline(timeout)
                while _alive(pid, since) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid, since):
                    os.kill(pid, signal.SIGKILL)
        for f in ("pids.json", "service.ready", "artifacts.port", "tunnels.port"):
            (self.directory / f).unlink(missing_ok=True)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state is [0], start time [19]."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, started: int | None = None) -> bool:
    """True while `pid` runs and is not a zombie (a zombie child of ours counts as gone); with `started`,
    only while it is still the process that began then, not a later one that reuses the number."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return started is None or int(fields[19]) == started


def _subject_hash(cert_pem: bytes) -> str:
    """OpenSSL's subject name hash (what a CA directory's file names are made of)."""
    r = subprocess.run(["openssl", "x509", "-noout", "-subject_hash"], input=cert_pem, capture_output=True, check=True)
    return r.stdout.decode().strip()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
