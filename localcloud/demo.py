"""The main job (`make demo`): a simulated device's life against the local bench, narrated.

Today it covers the foundation: a trustworthy clock, a key generated on a SoftHSM token, a
certificate from a throwaway CA for a CSR signed on the token, a mutual-TLS MQTT 5 connection with
the thing name as client ID, a publish the broker delivers and one it refuses. Later stages
(provisioning by claim, Defender, OTA, rotation) extend this same timeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from agent.clock import ClockGate
from agent.config import load
from agent.connection import PUBACK_ACCEPTED, Connection
from agent.daemon import current_identity, settings_for
from agent.pin import read_pin

from .bench import Bench
from .observer import Observer
from .tokens import softhsm_token

T0 = time.monotonic()


def say(what: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="localcloud.demo", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="keep the bench here (default: a temporary folder, removed after)")
    p.add_argument("--thing", default="demo-gateway-001")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="         agent %(levelname)s %(name)s: %(message)s")
    work = args.dir or Path(tempfile.mkdtemp(prefix="iot-agent-demo-"))
    verified: list[str] = []
    bench = token = conn = observer = None
    try:
        say(f"bench folder: {work}")
        bench = Bench(work).start()
        say(f"mosquitto {bench.broker.port}/tcp on 127.0.0.1: TLS 1.2+, client certificates required, per-device ACLs")
        say(f"chronyd serving NTP on {bench.chrony.server} (-x: it never touches this machine's clock)")
        token = softhsm_token(work / "softhsm", label="iot-agent")
        say(f"SoftHSM token {token.label!r} initialised in {token.directory}")
        token.apply_env()

        dev = bench.enroll(token, args.thing)
        say(f"EC P-256 key 'device' generated ON the token (sensitive, not extractable); CSR signed on the token")
        say(f"throwaway CA issued {dev.cert_path.name} for CN={args.thing}")
        verified.append("device key generated on the token; CSR signed there; certificate issued for it")

        observer = Observer(bench.broker).start([f"dt/{args.thing}/#"])
        cfg = load(dev.config_path)
        say(f"agent config: {dev.config_path}")
        why = ClockGate(cfg.clock).wait()
        say(f"clock gate open: {why}")
        verified.append("clock trusted by NTP before any TLS connection")

        identity = current_identity(cfg, {})
        conn = Connection(settings_for(cfg, identity, read_pin(cfg)))
        conn.start()
        if not conn.wait_connected(20):
            raise SystemExit(f"demo: the agent did not connect: {[e.detail for e in conn.events]}")
        bench.broker.wait_log(rf"New client connected .* as {args.thing} ")
        seen = [c for c in bench.broker.connected_clients() if c[0] == args.thing]
        say(f"connected over mutual TLS; broker saw client ID {seen[-1][0]!r} with certificate CN {seen[-1][1]!r}")
        verified.append("mutual TLS with the key on the token; client ID = thing name")

        topic = f"dt/{args.thing}/telemetry"
        payload = json.dumps({"hello": "world", "ts": int(time.time())}).encode()
        rc = conn.publish(topic, payload)
        got = observer.expect(topic)
        say(f"published to {topic} (PUBACK {rc}); the observer received {got.decode()}")
        assert rc in PUBACK_ACCEPTED and got == payload
        verified.append("publish to the device's own topic delivered")

        rc = conn.publish("dt/another-device/telemetry", b"spoofed")
        say(f"published to another device's topic: broker answered PUBACK {rc} (135 = not authorized)")
        if rc != 135:
            raise SystemExit("demo: the broker accepted a publish to another device's topic")
        verified.append("publish to another device's topic refused by the broker")

        conn.stop()
        conn = None
        say("disconnected cleanly; PKCS#11 library released")
    finally:
        if conn:
            conn.stop()
        if observer:
            observer.stop()
        if token:
            token.stop()
        if bench:
            bench.stop()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nVerified:")
    for v in verified:
        print(f"  - {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
