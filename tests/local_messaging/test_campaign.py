"""Local messaging's fault campaign: 3 apps publish 10,000 QoS 1 messages each through the agent while the
broker restarts 5 times and the agent is killed with SIGKILL 3 times, at random moments.

Every message must reach the cloud (counted by a subscriber with a persistent session on the local
cloud's broker, which keeps its sessions across restarts as AWS IoT Core keeps what it acknowledged),
each app's messages in order (the first copy of each), and the duplicates are counted and printed.

`IOT_AGENT_LM_MESSAGES` sizes it (10,000 per app by default); `IOT_AGENT_LM_SEED` replays one run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from localcloud import pace
from localcloud.bench import enrolled_device, local_publisher_config
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.recorder import Recorder

HERE = Path(__file__).resolve().parent
THING = "gw-campaign"
APPS = ("app1", "app2", "app3")
MESSAGES = int(os.environ.get("IOT_AGENT_LM_MESSAGES", "10000"))
SEED = int(os.environ.get("IOT_AGENT_LM_SEED", str(int(time.time()))))
BROKER_RESTARTS = 5
AGENT_KILLS = 3
SPREAD_S = 20.0  # the apps publish at a steady rate for about this long; the faults fall inside it


@pytest.mark.soak
def test_nothing_lost_under_broker_restarts_and_kills(tmp_path, softhsm, agents):
    rnd = random.Random(SEED)
    print(f"campaign: seed {SEED}, {len(APPS)} apps x {MESSAGES} messages (IOT_AGENT_LM_SEED={SEED} replays it)")
    cloud = LocalCloud(tmp_path / "cloud")
    cloud.configure(broker_persistence=True)
    ntp = Chrony(tmp_path / "chrony").start()
    cloud.up()
    run = Path(tempfile.mkdtemp(prefix="iot-agent-run-", dir="/tmp"))
    sock = run / "local.sock"
    dev = enrolled_device(
        cloud,
        softhsm,
        THING,
        tmp_path / "dev",
        [ntp.server],
        extra=local_publisher_config(sock, "campaign"),
    )
    rec = Recorder(cloud, [f"dt/{THING}/#"], client_id="campaign-recorder").start()
    procs: list[subprocess.Popen] = []
    current = [agents(dev)]
    try:
        current[0].wait_for("local messaging: serving MQTT 5", timeout=60)
        for name in APPS:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "publisher.py"), str(sock), f"dt/{THING}/{name}", name, str(MESSAGES)]
                    + ["--give-up-s", str(pace.scaled(600)), "--rate", str(MESSAGES / SPREAD_S)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        # The faults, at random moments while the apps publish: restarts of the broker, SIGKILLs of the agent.
        faults = ["broker"] * BROKER_RESTARTS + ["kill"] * AGENT_KILLS
        rnd.shuffle(faults)
        at = sorted(rnd.uniform(1.0, SPREAD_S - 6.0) for _ in faults)
        began = time.monotonic()
        done_faults: Counter = Counter()
        for kind, when in zip(faults, at, strict=True):
            time.sleep(max(0.0, began + when - time.monotonic()))
            if all(p.poll() is not None for p in procs):
                break
            if kind == "broker":
                cloud.restart_broker(down_for=rnd.uniform(0.2, 2.0))
            else:
                a = current[0]
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(10)
                time.sleep(rnd.uniform(0.0, 1.0))
                current[0] = agents(dev)
                current[0].wait_for("local messaging: serving MQTT 5", timeout=60)
            done_faults[kind] += 1
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=pace.scaled(900))
            assert p.returncode == 0, out
            results.append(json.loads(out.strip().splitlines()[-1]))
        total = len(APPS) * MESSAGES
        n = rec.wait_quiet(total, timeout=pace.scaled(120), quiet_s=3.0)
        got = rec.snapshot()
        firsts: dict[str, list[int]] = {name: [] for name in APPS}
        seen: set[tuple[str, int]] = set()
        dups = 0
        for topic, payload in got:
            name, _, seq = payload.decode().partition(":")
            assert topic == f"dt/{THING}/{name}", topic
            key = (name, int(seq))
            if key in seen:
                dups += 1
                continue
            seen.add(key)
            firsts[name].append(int(seq))
        missing = {name: MESSAGES - len(firsts[name]) for name in APPS}
        # What the agent sent twice, counted where it arrives: the broker's log line for every PUBLISH it
        # received from the device (the witness's own count also holds what mosquitto delivers to it again
        # from its persistence file after a restart, which says nothing about the agent).
        log = (cloud.broker_dir / "mosquitto.log").read_text(errors="replace")
        rx = re.compile(rf"Received PUBLISH from {THING} \(d\d, q1, r0, m\d+, 'dt/{THING}/app")
        received = len(rx.findall(log))
        agent_dups = received - total
        status = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(dev.config_path), "status", "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, **dev.token.full_env()},
            timeout=pace.scaled(30),
        )
        spool = json.loads(status.stdout)["local_messaging"]
        print(
            f"campaign: faults {dict(done_faults)}; {total} messages from the apps; the broker received "
            f"{received} publishes from the agent: duplicates {agent_dups} ({agent_dups / total:.2%}); the witness "
            f"got {n} (missing {sum(missing.values())}, {dups} delivered again by the broker); app-side resends "
            f"{sum(r['resent'] for r in results)}; agent: delivered {spool.get('delivered')}, resent "
            f"{spool.get('resent')}, refused {spool.get('refused')}; apps took "
            + ", ".join(f"{r['name']} {r['seconds']} s" for r in results)
        )
        assert done_faults["broker"] == BROKER_RESTARTS and done_faults["kill"] == AGENT_KILLS, (
            f"the apps finished before every fault happened: {dict(done_faults)}"
        )
        assert not any(missing.values()), (
            f"messages lost: {missing}; spool {spool}; the recorder's connection: {rec.events}; the agent's log:\n"
            + "\n".join(current[0].text().splitlines()[-80:])
        )
        for name in APPS:
            assert firsts[name] == sorted(firsts[name]), f"{name}: order broken"
        # At most one forwarder window in flight per fault is sent again (the forwarder's resend, or awscrt's own),
        # plus, per kill, each app's window it had not yet been acknowledged for and publishes again.
        bound = 64 * (BROKER_RESTARTS + AGENT_KILLS) + 20 * len(APPS) * AGENT_KILLS
        assert 0 <= agent_dups <= bound, (agent_dups, bound)
        assert spool.get("messages") == 0, spool
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        rec.stop()
        cloud.down()
        ntp.stop()
        shutil.rmtree(run, ignore_errors=True)
