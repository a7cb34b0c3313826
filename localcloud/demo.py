"""The main job (`make demo`): a factory-fresh simulated device's life against the local cloud, narrated.

Today: the factory puts a claim key on the device's SoftHSM token and the manufacturer's CA signs
its CSR; the agent waits for a trustworthy clock, provisions itself by claim (its own key generated
on the token, CreateCertificateFromCsr, RegisterThing), reconnects as its thing over mutual TLS,
publishes where its policy allows and is refused where it does not. Later stages (Defender, OTA,
rotation) extend this same timeline.
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

from agent.config import load
from agent.connection import PUBACK_ACCEPTED, Connection
from agent.daemon import current_identity, settings_for
from agent.pin import read_pin
from agent.state import StateStore

from .bench import agent_cmd, fresh_device, run_agent_cli
from .cloud import LocalCloud
from .ntp import Chrony
from .observer import Observer
from .tokens import softhsm_token

T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {what}", flush=True)


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
        say(f"local cloud up: mosquitto on 127.0.0.1:{info['port']} (TLS 1.2+, client certificates, policy ACLs, CRL) "
            "and its provisioning/jobs/defender services")
        ntp = Chrony(work / "chrony").start()
        say(f"chronyd serving NTP on {ntp.server} (-x: it never touches this machine's clock)")
        token = softhsm_token(work / "softhsm", label="iot-agent")
        token.apply_env()
        say(f"factory-fresh device: empty SoftHSM token {token.label!r}")

        dev = fresh_device(cloud, token, args.serial, work / "device", [ntp.server])
        say(f"factory: claim key generated ON the token, CSR signed there, manufacturer CA issued the claim "
            f"certificate; serial {args.serial} recorded")
        verified.append("claim key generated on the token; only the public claim certificate is on disk")
        cloud.registry.allow_serials([args.serial])
        say(f"cloud: serial {args.serial} added to the provisioning allow list")

        observer = Observer(cloud.broker(port=info["port"])).start([f"dt/{thing}/#"])
        agent = subprocess.Popen(agent_cmd(dev.config_path, "run"), env=token.full_env(), stderr=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, text=True, bufsize=1)
        connected = threading.Event()

        def relay() -> None:
            for line in agent.stderr:
                m = re.match(r"\S+ (\w+) ([\w.]+): (.*)", line.rstrip())
                if m:
                    say(f"agent: {m.group(3)}")
                if f"as {thing}" in line and "connected to" in line:
                    connected.set()

        threading.Thread(target=relay, daemon=True).start()
        if not connected.wait(90):
            raise SystemExit("demo: the agent did not provision and connect within 90 s")
        agent.terminate()
        agent.wait(15)
        verified.append("clock trusted by NTP before any TLS connection")
        verified.append("provisioned by claim: device key generated on the token, CSR signed there, "
                        "CreateCertificateFromCsr + RegisterThing through AWS's IotIdentityClientV2")
        things = [n for n, _ in cloud.registry.things()]
        active = [c for c in cloud.registry.certificates() if c.kind == "device" and c.status == "ACTIVE"]
        say(f"cloud: things {things}; active device certificates {[(c.id[:12], c.thing) for c in active]}")
        verified.append("exactly one thing and one ACTIVE device certificate, bound to it")

        cfg = load(dev.config_path)
        identity = current_identity(cfg, StateStore(cfg.resolve(cfg.device.state_dir)).load())
        conn = Connection(settings_for(cfg, identity, read_pin(cfg)))
        conn.start()
        if not conn.wait_connected(20):
            raise SystemExit(f"demo: the agent did not connect: {[e.detail for e in conn.events]}")
        say(f"reconnected over mutual TLS as {identity.thing_name} with its own certificate (key on the token)")
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
        say("iot-agent status:\n" + "\n".join("           " + l for l in status.splitlines()))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
