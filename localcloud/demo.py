"""The main job (`make demo`): a factory-fresh simulated device's life against the local cloud, narrated.

The factory puts a claim key on the device's SoftHSM token and the manufacturer's CA signs its CSR.
Then the agent runs as it would in the field: it waits for a trustworthy clock, provisions itself by
claim (its own key generated on the token, CreateCertificateFromCsr, RegisterThing), reconnects as its
thing over mutual TLS, sends a Device Defender report, installs a signed update from a job, refuses a
tampered one, and rotates its certificate on request. Last, a connection with its final identity
publishes where its policy allows and is refused where it does not, and `iot-agent status` shows the
device. Every step is checked against the cloud's own records, not the agent's word.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.base.pin import read_pin
from agent.base.state import StateStore
from agent.identity.current import current_identity
from agent.runtime.daemon import settings_for
from agent.runtime.features import load
from agent.session.connection import PUBACK_ACCEPTED, Connection

from . import pace
from .bench import agent_cmd, fresh_device, run_agent_cli
from .cloud import LocalCloud
from .defender import DefenderStore
from .jobs import Jobs
from .ntp import Chrony
from .observer import Observer
from .streams import Streams
from .tokens import softhsm_token
from .vendor import CodeSigner, make_tar, signed_doc

T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {what}", flush=True)


def wait_until(what: str, check, timeout: float):
    """Poll the cloud's records (bounded) until check() returns something true."""
    deadline = pace.deadline(timeout)
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} did not happen within {pace.scaled(timeout):g} s")


def job_status(jobs: Jobs, job_id: str, thing: str, statuses: tuple[str, ...]):
    ex = jobs.execution(job_id, thing)
    return ex if ex and ex["status"] in statuses else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="localcloud.demo", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="keep everything here (default: a temporary folder, removed after)")
    p.add_argument("--serial", default="SN-000123")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="         agent %(levelname)s %(name)s: %(message)s")
    work = args.dir or Path(tempfile.mkdtemp(prefix="iot-agent-demo-"))
    thing = f"gw-{args.serial}"
    verified: list[str] = []
    cloud = ntp = token = observer = conn = agent = None
    try:
        say(f"working folder: {work}")
        cloud = LocalCloud(work / "cloud")
        info = cloud.up()
        say(
            f"local cloud up: mosquitto on 127.0.0.1:{info['port']} (TLS 1.2+, client certificates, policy ACLs, CRL) "
            "and its provisioning/jobs/defender services"
        )
        ntp = Chrony(work / "chrony").start()
        say(f"chronyd serving NTP on {ntp.server} (-x: it never touches this machine's clock)")
        token = softhsm_token(work / "softhsm", label="iot-agent")
        token.apply_env()
        say(f"factory-fresh device: empty SoftHSM token {token.label!r}")

        signer = CodeSigner(work / "vendor")
        say("vendor: code-signing key (ECDSA P-256) and certificate; the device pins the certificate")
        app_dir = work / "device" / "app"
        dev = fresh_device(
            cloud,
            token,
            args.serial,
            work / "device",
            [ntp.server],
            extra={
                "ota": {
                    "code_signing_certificate": str(signer.cert_path),
                    "ca_file": info["ca_file"],
                    "targets": {"app": {"directory": str(app_dir), "health_command": ["sh", "-c", "test -f app.txt"]}},
                }
            },
        )
        say(
            f"factory: claim key generated ON the token, CSR signed there, manufacturer CA issued the claim "
            f"certificate; serial {args.serial} recorded"
        )
        verified.append("claim key generated on the token; only the public claim certificate is on disk")
        cloud.registry.allow_serials([args.serial])
        say(f"cloud: serial {args.serial} added to the provisioning allow list")

        observer = Observer(cloud.broker(port=info["port"])).start([f"dt/{thing}/#"])
        agent = subprocess.Popen(
            agent_cmd(dev.config_path, "run"),
            env=token.full_env(),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        connected = threading.Event()

        def relay() -> None:
            for line in agent.stderr:
                m = re.match(r"\S+ (\w+) ([\w.]+): (.*)", line.rstrip())
                if m and m.group(1) != "DEBUG":
                    say(f"agent: {m.group(3)}")
                if f"as {thing}" in line and "connected to" in line:
                    connected.set()

        threading.Thread(target=relay, daemon=True).start()
        if not connected.wait(90):
            raise SystemExit("demo: the agent did not provision and connect within 90 s")
        verified.append("clock trusted by NTP before any TLS connection")
        verified.append(
            "provisioned by claim: device key generated on the token, CSR signed there, "
            "CreateCertificateFromCsr + RegisterThing through AWS's IotIdentityClientV2"
        )
        things = [n for n, _ in cloud.registry.things()]
        active = [c for c in cloud.registry.certificates() if c.kind == "device" and c.status == "ACTIVE"]
        say(f"cloud: things {things}; active device certificates {[(c.id[:12], c.thing) for c in active]}")
        if things != [thing] or [c.thing for c in active] != [thing]:
            raise SystemExit("demo: expected exactly one thing and one active device certificate")
        verified.append("exactly one thing and one ACTIVE device certificate, bound to it")
        first_cert = active[0].id

        defender = DefenderStore(cloud.registry.db, cloud.registry.lock)
        rep = wait_until(
            "a Device Defender report", lambda: [r for r in defender.reports(thing) if r["status"] == "ACCEPTED"], 60
        )[0]
        say(
            f"cloud: Device Defender report {rep['reportId']} ACCEPTED ({len(json.dumps(rep['report']))} bytes, "
            f"metrics {sorted(rep['report'].get('metrics', {}))})"
        )
        verified.append("Device Defender report validated and accepted by the cloud")

        jobs = Jobs(cloud.registry.db, cloud.registry.lock)
        streams = Streams(cloud.registry.db, cloud.registry.lock, cloud.directory / "streams")
        release = make_tar({"app.txt": b"app 1.1.0\n"}, "1.1.0")
        (work / "app-1.1.0.tar").write_bytes(release)
        sid = streams.create([work / "app-1.1.0.tar"], "app-1-1-0")
        jobs.create(
            "update-1-1-0", thing, signed_doc(signer, "app", "1.1.0", "app-1.1.0.tar", release, stream=(sid, 0))
        )
        say(
            "cloud: job update-1-1-0: release 1.1.0, its manifest (target, version, size, SHA-256) signed by the "
            "vendor, delivered by MQTT file stream"
        )
        ex = wait_until(
            "update 1.1.0", lambda: job_status(jobs, "update-1-1-0", thing, ("SUCCEEDED", "FAILED", "REJECTED")), 90
        )
        current = (app_dir / "current").resolve().name if (app_dir / "current").exists() else None
        say(f"cloud: job update-1-1-0 {ex['status']} {ex.get('statusDetails')}; device app/current -> {current}")
        if ex["status"] != "SUCCEEDED" or current != "1.1.0":
            raise SystemExit("demo: the signed update was not installed")
        verified.append("signed update (stream, ECDSA P-256 manifest) verified, installed, health-checked: SUCCEEDED")

        tampered = bytearray(make_tar({"app.txt": b"app 1.2.0\n"}, "1.2.0"))
        manifest = signer.manifest("app", "1.2.0", "app-1.2.0.tar", bytes(tampered))
        tampered[700] ^= 0x01  # one bit flipped after signing
        (work / "app-1.2.0.tar").write_bytes(bytes(tampered))
        sid = streams.create([work / "app-1.2.0.tar"], "app-1-2-0")
        jobs.create(
            "update-1-2-0",
            thing,
            signed_doc(signer, "app", "1.2.0", "app-1.2.0.tar", bytes(tampered), stream=(sid, 0), manifest=manifest),
        )
        say("cloud: job update-1-2-0: a release tampered with after signing")
        ex = wait_until(
            "the tampered update's refusal",
            lambda: job_status(jobs, "update-1-2-0", thing, ("SUCCEEDED", "FAILED", "REJECTED")),
            90,
        )
        current = (app_dir / "current").resolve().name
        say(
            f"cloud: job update-1-2-0 {ex['status']}: {ex.get('statusDetails', {}).get('reason')}; "
            f"device app/current -> {current}"
        )
        if ex["status"] != "REJECTED" or current != "1.1.0":
            raise SystemExit("demo: the tampered update was not refused")
        verified.append(
            "tampered update REJECTED (its SHA-256 is not the signed manifest's); the running release untouched"
        )

        jobs.create("rotate-1", thing, {"operation": "rotate-certificate"})
        say("cloud: job rotate-1: rotate the device certificate")
        ex = wait_until(
            "the certificate rotation",
            lambda: job_status(jobs, "rotate-1", thing, ("SUCCEEDED", "FAILED", "REJECTED")),
            120,
        )
        certs = {c.id: c.status for c in cloud.registry.certificates() if c.thing == thing}
        active = [cid for cid, st in certs.items() if st == "ACTIVE"]
        say(
            f"cloud: job rotate-1 {ex['status']}; certificates of {thing}: "
            f"{ {cid[:12]: st for cid, st in certs.items()} }"
        )
        if (
            ex["status"] != "SUCCEEDED"
            or len(active) != 1
            or active[0] == first_cert
            or certs[first_cert] != "INACTIVE"
        ):
            raise SystemExit("demo: the certificate rotation did not leave exactly one new active certificate")
        verified.append(
            "certificate rotated: new key on the token, new certificate proven on a connection, "
            "old certificate INACTIVE"
        )
        agent.terminate()
        if agent.wait(30) != 0:
            raise SystemExit("demo: the agent did not stop cleanly on SIGTERM")
        say("agent stopped (SIGTERM): exit 0")

        cfg = load(dev.config_path)
        identity = current_identity(cfg, StateStore(cfg.resolve(cfg.device.state_dir)).load())
        conn = Connection(settings_for(cfg, identity, read_pin(cfg)))
        conn.start()
        if not conn.wait_connected(20):
            raise SystemExit(f"demo: the agent did not connect: {[e.detail for e in conn.events]}")
        say(f"reconnected over mutual TLS as {identity.thing_name} with its rotated certificate (key on the token)")
        topic = f"dt/{thing}/telemetry"
        payload = json.dumps({"hello": "world", "ts": int(time.time())}).encode()
        rc = conn.publish(topic, payload)
        got = observer.expect(topic)
        say(f"published to {topic} (PUBACK {rc}); the observer received {got.decode()}")
        assert rc in PUBACK_ACCEPTED and got == payload
        verified.append("publish to the device's own topic delivered")
        rc = conn.publish("dt/gw-another-device/telemetry", b"spoofed")
        say(f"published to another device's topic: PUBACK {rc} (135 = not authorized by the device policy)")
        if rc != 135:
            raise SystemExit("demo: the broker accepted a publish to another device's topic")
        verified.append("publish to another device's topic refused by the broker")
        conn.stop()
        conn = None
        status = run_agent_cli(dev.config_path, token, "status").stdout
        say("iot-agent status:\n" + "\n".join("           " + line for line in status.splitlines()))
    finally:
        if agent and agent.poll() is None:
            agent.kill()
        if conn:
            conn.stop()
        if observer:
            observer.stop()
        if token:
            token.stop()
        if ntp:
            ntp.stop()
        if cloud:
            cloud.down()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nVerified:")
    for v in verified:
        print(f"  - {v}")
    print(f"\n{len(verified)} steps verified in {time.monotonic() - T0:.0f} s; no AWS account was used.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
