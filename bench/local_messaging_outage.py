"""Local messaging through a long broker outage: an app publishes at a sensor's steady pace while the broker is
down for --minutes (default 60), then the broker comes back and the agent drains its spool.

What it shows (issue 22: "survives hours of broker outage"): every message reaches the cloud once the broker is
back, each in order; the duplicates (counted at the broker's side); the agent's memory over the outage against
its own figure at the outage's start (target: within 2 MB, what the 100,000-message RSS figure in
bench/local_messaging.py also asks), and the spool's size; how long the drain took. The real agent
(`iot-agent run`, key on SoftHSM), the local cloud's broker with persistence, the campaign's paho publisher.
Exit status 1 if a message is lost or out of order, or the memory target is missed.

    python bench/local_messaging_outage.py [--minutes 60] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.local_messaging.spool import read_stats  # noqa: E402
from localcloud.bench import agent_cmd, enrolled_device, local_publisher_config  # noqa: E402
from localcloud.cloud import LocalCloud  # noqa: E402
from localcloud.ntp import Chrony  # noqa: E402
from localcloud.procs import Child  # noqa: E402
from localcloud.recorder import Recorder  # noqa: E402
from localcloud.tokens import softhsm_token  # noqa: E402

THING = "gw-bench-outage"
PUBLISHER = REPO / "tests" / "local_messaging" / "publisher.py"
TARGET_RSS_KIB = 2048


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="how long the broker stays down")
    ap.add_argument("--rate", type=float, default=20.0, help="the app's messages per second")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    outage_s = args.minutes * 60
    count = int(args.rate * outage_s)
    work = Path(tempfile.mkdtemp(prefix="lm-outage-"))
    cloud = LocalCloud(work / "cloud")
    cloud.configure(broker_persistence=True)
    ntp = Chrony(work / "chrony").start()
    cloud.up()
    token = softhsm_token(work / "softhsm")
    sock = work / "run" / "local.sock"
    sock.parent.mkdir()
    dev = enrolled_device(
        cloud,
        token,
        THING,
        work / "dev",
        [ntp.server],
        extra=local_publisher_config(sock, "sensor", spool_max_mib=256),
    )
    spool_file = dev.directory / "state" / "spool.sqlite"
    rec = Recorder(cloud, [f"dt/{THING}/#"], client_id="outage-recorder").start()
    agent = subprocess.Popen(
        agent_cmd(dev.config_path, "run"),
        env={**os.environ, **token.full_env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    app = None
    failed = False
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError("the agent did not open its socket")
            time.sleep(0.1)
        time.sleep(3)
        down = threading.Thread(target=cloud.restart_broker, kwargs={"down_for": outage_s, "timeout": 60})
        down.start()
        time.sleep(2)
        rss_start = rss_kib(agent.pid)
        began = time.monotonic()
        app = subprocess.Popen(
            [sys.executable, str(PUBLISHER), str(sock), f"dt/{THING}/sensor", "sensor", str(count)]
            + ["--rate", str(args.rate), "--give-up-s", str(outage_s + 600)],
            stdout=subprocess.PIPE,
            text=True,
        )
        peak = rss_start
        next_line = began
        while down.is_alive():
            rss = rss_kib(agent.pid)
            peak = max(peak, rss)
            if time.monotonic() >= next_line:
                next_line += 600
                s = read_stats(spool_file) or {}
                print(
                    f"{(time.monotonic() - began) / 60:5.1f} min down: spool {s.get('messages')} messages, "
                    f"{(s.get('bytes') or 0) / 1e6:.1f} MB; agent RSS {rss / 1024:.1f} MiB",
                    flush=True,
                )
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited ({agent.returncode}) during the outage")
            time.sleep(5)
        rss_end = rss_kib(agent.pid)
        peak = max(peak, rss_end)
        back = time.monotonic()
        out, _ = app.communicate(timeout=600)
        result = json.loads(out.strip().splitlines()[-1])
        spooled = (read_stats(spool_file) or {}).get("messages")
        print(f"broker back after {(back - began) / 60:.1f} min; the app's result: {result}; spooled {spooled}")
        drain_deadline = back + max(600.0, count / 200)
        while rec.count() < count and time.monotonic() < drain_deadline:
            time.sleep(0.1)
        drained = time.monotonic() - back  # until as many messages as were sent had arrived
        n = rec.wait_quiet(count, timeout=60, quiet_s=5.0)  # then any late duplicates
        seqs = [int(p.decode().partition(":")[2]) for t, p in rec.snapshot() if t == f"dt/{THING}/sensor"]
        firsts, seen = [], set()
        for s_ in seqs:
            if s_ not in seen:
                seen.add(s_)
                firsts.append(s_)
        missing = count - len(seen)
        in_order = firsts == sorted(firsts)
        stats = read_stats(spool_file) or {}
        print(
            f"messages: {count} at {args.rate:g}/s over {args.minutes:g} min of outage; arrived {len(seen)} "
            f"(missing {missing}), in order: {in_order}, duplicates at the recorder {len(seqs) - len(seen)}; "
            f"spool after: {stats.get('messages')} messages, resent {stats.get('resent')}; "
            f"drained in {drained:.0f} s ({n} received)"
        )
        grew = peak - rss_start
        print(
            f"agent RSS: {rss_start / 1024:.1f} MiB when the outage began, peak {peak / 1024:.1f} MiB, at its end "
            f"{rss_end / 1024:.1f} MiB: {grew:+d} KiB (target within {TARGET_RSS_KIB} KiB)"
        )
        failed = missing > 0 or not in_order or grew > TARGET_RSS_KIB or result.get("count") != count
    finally:
        if app is not None and app.poll() is None:
            app.kill()
        Child("agent", agent).stop(30)
        rec.stop()
        cloud.down()
        ntp.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
