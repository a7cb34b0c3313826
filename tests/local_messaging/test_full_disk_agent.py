"""The agent's spool on a file system that stops accepting writes: a real `iot-agent run` whose state folder
holds its spool on a small tmpfs (in a mount namespace of its own: the host's mounts are untouched), a
real broker that is down meanwhile, and a paho app.

When the disk is full the app hears why (PUBACK 0x97, "disk full"), nothing it was acknowledged for is
lost, and once space is freed (the filler file removed inside the agent's namespace) the agent takes
messages again and every stored one reaches the cloud."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from test_local_messaging_agent import App

from localcloud import pace
from localcloud.bench import agent_cmd, enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.recorder import Recorder

THING = "gw-fulldisk"


def test_full_disk_refuses_with_the_reason_and_loses_nothing(tmp_path, softhsm, agents):
    c = LocalCloud(tmp_path / "cloud")
    # The broker keeps sessions and queued messages across its restart, as AWS IoT Core keeps what it acknowledged:
    # without it, what the agent delivers before the recorder has subscribed again reaches nobody (seen under load).
    c.configure(broker_persistence=True)
    ntp = Chrony(tmp_path / "chrony").start()
    c.up()
    run = Path(tempfile.mkdtemp(prefix="iot-agent-run-", dir="/tmp"))
    sock = run / "local.sock"
    small = tmp_path / "small"
    small.mkdir()
    dev = enrolled_device(
        c,
        softhsm,
        THING,
        tmp_path / "dev",
        [ntp.server],
        extra={
            "defender": {"enabled": False},
            "inventory": {"enabled": False},
            "local_messaging": {
                "enabled": True,
                "socket": str(sock),
                "spool_file": str(small / "spool.sqlite"),
                "apps": {"sensor": {"user": str(os.getuid()), "publish": ["dt/${thing}/#"]}},
            },
        },
    )
    # A 512 KiB tmpfs, 256 KiB of it taken by a filler file, mounted where only the agent sees it.
    script = (
        f"mount -t tmpfs -o size=512k,mode=0700 tmpfs {small} && "
        f'dd if=/dev/zero of={small}/filler bs=1k count=256 status=none && exec "$@"'
    )
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        *agent_cmd(dev.config_path, "run"),
    ]
    rec = Recorder(c, [f"dt/{THING}/#"], client_id="fulldisk-recorder").start()
    a = agents(dev, cmd=cmd)
    restart_errors: list[BaseException] = []

    def restart() -> None:  # a failed restart must fail the test as what it is, not as "lost"
        try:
            c.restart_broker(down_for=pace.scaled(12))
        except BaseException as e:
            restart_errors.append(e)

    down = threading.Thread(target=restart)
    app = None
    try:
        a.wait_for("local messaging: serving MQTT 5", timeout=60)
        a.wait_for(f"connected to localhost:\\d+ as {THING}", timeout=60)
        app = App(sock, "sensor-disk")
        down.start()
        gone = a.wait_for("disconnected", timeout=20)
        stored, refusal = 0, None
        for i in range(400):  # 2 KiB each: the free 256 KiB runs out long before
            code, why = app.publish(f"dt/{THING}/bulk", f"{i}:".encode() + bytes(2048))
            if code:
                refusal = (code, why)
                break
            stored += 1
        assert refusal is not None, "the disk never filled"
        assert refusal[0] == 0x97 and "disk full" in refusal[1], refusal
        assert stored >= 1, stored
        print(f"full disk: {stored} messages of 2 KiB stored, then refused: {refusal[1]}")
        a.wait_for("QoS 1 publishes are refused until it can")
        # Free the space inside the agent's own mount namespace.
        pid = a.proc.pid
        r = subprocess.run(["nsenter", "-t", str(pid), "-m", "rm", f"{small}/filler"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + pace.scaled(20)
        while True:  # the next publish is taken again (the refusal was for that moment only)
            code, why = app.publish(f"dt/{THING}/bulk", f"{stored}:".encode() + bytes(2048))
            if code == 0:
                stored += 1
                break
            assert time.monotonic() < deadline, f"still refused after freeing space: {why}"
            time.sleep(0.5)
        down.join(pace.scaled(40))
        assert not down.is_alive() and not restart_errors, f"the broker did not come back: {restart_errors}"
        # Delivery is timed from the agent's reconnection (its backoff is the config's, not this test's subject).
        a.wait_for(f"connected to localhost:\\d+ as {THING}", timeout=60, after=gone)
        deadline = time.monotonic() + pace.scaled(30)
        while True:
            seqs = {int(p.split(b":", 1)[0]) for t, p in rec.snapshot() if t == f"dt/{THING}/bulk"}
            if seqs >= set(range(stored)):
                break
            assert time.monotonic() < deadline, (
                f"lost: {sorted(set(range(stored)) - seqs)[:20]}; recorder: {rec.events[-5:]}; agent log:\n"
                + a.text()[-3000:]
            )
            time.sleep(0.2)
    finally:
        if app is not None:
            app.close()
        down.join(pace.scaled(40))
        rec.stop()
        c.down()
        ntp.stop()
        shutil.rmtree(run, ignore_errors=True)
