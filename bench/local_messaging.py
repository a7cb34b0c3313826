"""Local messaging: an app's QoS 1 messages through the agent to the broker, against a direct awscrt publish
loop in the same run; the spool's cost per message; the agent's memory with 100,000 messages spooled offline.

Targets (issue 22): through the agent >= 0.5x the direct loop's messages per second; RSS with 100,000
messages spooled while offline within 2 MB of the idle agent.

Neither path is paced to AWS IoT Core's 100 publishes/s per connection (the local broker has no such
limit; the agent's broker.aws_iot_core_limits is off here): the figures are the agent's own cost.
Both paths publish the same messages (QoS 1, 256-byte payloads) as the same device (its key on SoftHSM)
to the local cloud's broker, and both are timed from the first publish until the broker has acknowledged
the last message (for the agent: its spool's delivered counter, read from the file):
  direct:  one process with awscrt's MQTT 5 client (what an app holding the device's key would run), a
           window of --window publishes in flight; also one at a time (--window 1), for scale;
  agent:   `iot-agent run` (the real daemon), and one app process on the agent's Unix socket with the same
           client (awscrt's MQTT 5 client, no TLS: a Unix socket) and the same window; each message is on
           disk (SQLite, synchronous=FULL) before the app's PUBACK and leaves the spool only after the
           broker's. The ratio is this against the direct loop. The same with paho-mqtt (the README's
           client) is printed too: in Python it is the slower side of its own path.
The ceiling, measured in the same run: whatever the agent does, an app's message costs the app's own
client work and then the agent's publish of it to the broker, which is at least what the direct loop
does. So two direct loops at once (each publishing --messages), on the same cores, are the most any
agent of this kind could carry; the ratio is also given against that.
Each is measured twice, for the two ways an app sets how many messages it has in flight: a window of its
own (--window, 20: paho's default), and none, so that awscrt keeps to the server's Receive Maximum (what an
awscrt app does unless told otherwise): 20 from mosquitto, 64 from the agent (local_messaging.receive_maximum;
the agent answers only after an fsync, so it lets apps keep more in flight). The target is judged on the
second: each client as it runs against each server by default. The CPU per message of each process (the
publisher, the agent, the broker) is printed for both.
Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.local_messaging.spool import read_stats  # noqa: E402
from localcloud.bench import agent_cmd, enrolled_device, local_publisher_config  # noqa: E402
from localcloud.cloud import LocalCloud  # noqa: E402
from localcloud.ntp import Chrony  # noqa: E402
from localcloud.procs import Child  # noqa: E402
from localcloud.tokens import softhsm_token  # noqa: E402

THING = "gw-bench-local"
TOPIC = f"dt/{THING}/bench"
TARGET_RATIO = 0.5
TARGET_RSS_KIB = 2048

DIRECT = r"""
import sys, time, threading
from pathlib import Path
import awscrt.io, awscrt.mqtt5 as m5
from awsiot import mqtt5_client_builder
endpoint, port, ca, cert, lib_path, token, key, pin_file, client_id, topic, n, window = sys.argv[1:13]
n, window = int(n), int(window)
lib = awscrt.io.Pkcs11Lib(file=lib_path, behavior=awscrt.io.Pkcs11Lib.InitializeFinalizeBehavior.STRICT)
up, stopped = threading.Event(), threading.Event()
c = mqtt5_client_builder.mtls_with_pkcs11(
    pkcs11_lib=lib, user_pin=Path(pin_file).read_text().strip(), token_label=token, private_key_label=key,
    cert_filepath=cert, endpoint=endpoint, port=int(port), ca_filepath=ca, client_id=client_id,
    extended_validation_and_flow_control_options=m5.ExtendedValidationAndFlowControlOptions.NONE,
    on_lifecycle_connection_success=lambda d: up.set(), on_lifecycle_stopped=lambda d: stopped.set())
c.start()
assert up.wait(30)
payload = bytes(256)
sem = threading.Semaphore(window or n)  # 0: no window of its own; the server's Receive Maximum
bad = []
def done(f):
    try:
        if int(f.result().puback.reason_code) >= 128: bad.append(1)
    except Exception:
        bad.append(1)
    sem.release()
print("ready", flush=True)
sys.stdin.readline()
start = time.perf_counter()
for i in range(n):
    sem.acquire()
    c.publish(m5.PublishPacket(topic=topic, payload=payload, qos=m5.QoS.AT_LEAST_ONCE)).add_done_callback(done)
for _ in range(window or n):
    sem.acquire()
print("done", len(bad), time.perf_counter() - start, flush=True)
c.stop(); stopped.wait(10)
"""

APP = r"""
import sys, threading
import paho.mqtt.client as mqtt
path, topic, n, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sem = threading.Semaphore(window)
bad = []
up = threading.Event()
def on_publish(c, u, mid, reason, props):
    if reason.value: bad.append(reason.value)
    sem.release()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport="unix")
c.on_publish = on_publish
c.on_connect = lambda *a: up.set()
c.max_inflight_messages_set(window)
c.max_queued_messages_set(0)
c.connect(path)
c.loop_start()
assert up.wait(30)
print("ready", flush=True)
sys.stdin.readline()
payload = bytes(256)
for i in range(n):
    sem.acquire()
    c.publish(topic, payload, qos=1)
for _ in range(window):
    sem.acquire()
print("done", len(bad), flush=True)
c.disconnect(); c.loop_stop()
"""


# The same client library as the direct loop (awscrt's MQTT 5 client), on the agent's Unix socket: the
# like-for-like comparison. paho-mqtt (the README's example client) is measured too; in Python it is the
# slower side of its own path.
APP_CRT = r"""
import sys, threading, time
import awscrt.io as io, awscrt.mqtt5 as m5
path, topic, n, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
so = io.SocketOptions()
so.domain = io.SocketDomain.Local
up, stopped = threading.Event(), threading.Event()
c = m5.Client(m5.ClientOptions(host_name=path, port=0, socket_options=so,
    connect_options=m5.ConnectPacket(client_id="bench-crt-app", keep_alive_interval_sec=60),
    on_lifecycle_event_connection_success_fn=lambda d: up.set(),
    on_lifecycle_event_stopped_fn=lambda d: stopped.set()))
c.start()
assert up.wait(30)
sem = threading.Semaphore(window or n)  # 0: no window of its own; the server's Receive Maximum
bad = []
def done(f):
    try:
        if int(f.result().puback.reason_code) >= 128: bad.append(1)
    except Exception:
        bad.append(1)
    sem.release()
print("ready", flush=True)
sys.stdin.readline()
payload = bytes(256)
for i in range(n):
    sem.acquire()
    c.publish(m5.PublishPacket(topic=topic, payload=payload, qos=m5.QoS.AT_LEAST_ONCE)).add_done_callback(done)
for _ in range(window or n):
    sem.acquire()
print("done", len(bad), flush=True)
c.stop(); stopped.wait(10)
"""


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system, all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def timed(
    proc: subprocess.Popen, arrived: Callable[[], int], n: int, watched: tuple[int, ...] = (), timeout: float = 600
) -> tuple[float, list[float]]:
    """Seconds from telling `proc` to go until `arrived()` (a count at the broker's side) has grown by n, and the
    CPU seconds that `proc` and each of `watched` used meanwhile."""
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        raise RuntimeError(f"publisher did not start: {line!r}")
    before = arrived()
    pids = (proc.pid, *watched)
    cpu0 = [cpu_s(pid) for pid in pids]
    start = time.perf_counter()
    proc.stdin.write("\n")
    proc.stdin.flush()
    deadline = time.monotonic() + timeout
    while arrived() < before + n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {arrived() - before} of {n} messages arrived")
        time.sleep(0.02)  # each look opens the spool file: often enough for 1% at 20,000 messages, no more
    took = time.perf_counter() - start
    out = proc.stdout.readline().split()
    cpu = [cpu_s(pid) - c0 for pid, c0 in zip(pids, cpu0, strict=True)]  # the publisher lingers (it stops its client)
    proc.wait(30)
    if out[:1] != ["done"] or out[1] != "0":
        raise RuntimeError(f"publisher reported failures: {out}")
    return took, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=20, help="QoS 1 publishes in flight (paho's default: 20)")
    ap.add_argument("--spooled", type=int, default=100_000, help="messages spooled offline for the RSS figure")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    # SIGTERM or SIGHUP (a timeout, a CI runner, a closed terminal) still runs the clean-up below: nothing is
    # left running.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="lm-bench-"))
    cloud = LocalCloud(work / "cloud")
    ntp = Chrony(work / "chrony").start()
    cloud.up()
    token = softhsm_token(work / "softhsm")
    run = work / "run"
    run.mkdir()
    sock = run / "local.sock"
    dev = enrolled_device(
        cloud,
        token,
        THING,
        work / "dev",
        [ntp.server],
        extra=local_publisher_config(sock, "bench", spool_max_mib=256),
    )
    env = {**os.environ, **token.full_env()}
    info = cloud.endpoint()
    failed = False
    agent = None
    try:
        direct_cmd = [
            sys.executable,
            "-c",
            DIRECT,
            "localhost",
            str(info["port"]),
            info["ca_file"],
            str(dev.cert_path),
            token.library,
            token.label,
            "device",
            str(token.pin_file()),
            THING,
            TOPIC,
            str(args.messages),
        ]

        # The ceiling's second loop is a second device (its own token and key: a client id is one thing's).
        token2 = softhsm_token(work / "softhsm2")
        dev2 = enrolled_device(cloud, token2, THING + "-2", work / "dev2", [ntp.server])
        second_env = {**os.environ, **token2.full_env()}
        second_cmd = [
            *direct_cmd[:6],
            str(dev2.cert_path),
            token2.library,
            token2.label,
            "device",
            str(token2.pin_file()),
            THING + "-2",
            f"dt/{THING}-2/bench",
            str(args.messages),
        ]

        broker_pid = cloud._mosquitto_pid()
        assert broker_pid is not None
        # Two ways an app sets how many QoS 1 messages it has in flight: a window of its own (--window; paho's
        # default is 20), or none, leaving it to awscrt and the server's Receive Maximum: 20 from mosquitto (its
        # max_inflight_messages), local_messaging.receive_maximum (64) from the agent, which answers each
        # message only after an fsync, and so needs more of them in flight for the same rate.
        modes = {args.window: f"a window of {args.window}", 0: "the server's Receive Maximum"}
        cpu: dict[tuple[int, str], list[float]] = collections.defaultdict(list)

        def direct(window: int) -> float:
            """The loop's own time from its first publish to its last PUBACK."""
            p = subprocess.Popen(
                [*direct_cmd, str(window)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            assert p.stdout is not None and p.stdin is not None
            if not p.stdout.readline().startswith("ready"):
                raise RuntimeError("the direct loop did not connect")
            cpu0 = cpu_s(p.pid), cpu_s(broker_pid)
            p.stdin.write("\n")
            p.stdin.flush()
            out = p.stdout.readline().split()
            cpu[window, "direct"].append(cpu_s(p.pid) - cpu0[0])
            cpu[window, "direct broker"].append(cpu_s(broker_pid) - cpu0[1])
            p.wait(30)
            if out[:2] != ["done", "0"]:
                raise RuntimeError(f"the direct loop reported failures: {out}")
            return float(out[2])

        def two_at_once(window: int) -> float:
            """Two direct loops started together; the time until both have their last PUBACK."""
            procs = [
                subprocess.Popen([*cmd, str(window)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=e)
                for cmd, e in ((direct_cmd, env), (second_cmd, second_env))
            ]
            for p in procs:
                assert p.stdout is not None
                if not p.stdout.readline().startswith("ready"):
                    raise RuntimeError("a direct loop did not connect")
            start = time.perf_counter()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("\n")
                p.stdin.flush()
            for p in procs:
                assert p.stdout is not None
                out = p.stdout.readline().split()
                p.wait(30)
                if out[:2] != ["done", "0"]:
                    raise RuntimeError(f"a direct loop reported failures: {out}")
            return time.perf_counter() - start

        direct_s = {w: [direct(w) for _ in range(args.runs)] for w in modes}
        direct_one_s = direct(1)
        ceiling_s = {w: [two_at_once(w) for _ in range(args.runs)] for w in modes}
        agent = subprocess.Popen(
            agent_cmd(dev.config_path, "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError("the agent did not open its socket")
            time.sleep(0.1)
        time.sleep(3)  # connected and idle

        def delivered() -> int:
            stats = read_stats(dev.directory / "state" / "spool.sqlite") or {}
            return int(stats.get("delivered") or 0)

        def through(n: int, app: str = APP, window: int = args.window) -> float:
            p = subprocess.Popen(
                [sys.executable, "-c", app, str(sock), TOPIC, str(n), str(window)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            # until the broker has acknowledged the last one to the agent
            took, (app_cpu, agent_cpu, broker_cpu) = timed(p, delivered, n, (agent.pid, broker_pid))
            if app is APP_CRT and n == args.messages:
                for k, v in (("app", app_cpu), ("agent", agent_cpu), ("broker", broker_cpu)):
                    cpu[window, k].append(v)
            return took

        through(1000)  # warm-up
        agent_s = {w: [through(args.messages, APP_CRT, w) for _ in range(args.runs)] for w in modes}
        paho_s = [through(args.messages) for _ in range(args.runs)]
        print(f"messages: {args.messages} QoS 1, 256 bytes, best of {args.runs}")
        ratio = {}
        for w, mode in modes.items():
            direct_rate = args.messages / min(direct_s[w])
            agent_rate = args.messages / min(agent_s[w])
            ceiling_rate = args.messages / min(ceiling_s[w])  # each of the two loops' rate
            ratio[w] = agent_rate / direct_rate
            print(f"-- in flight: {mode}")
            print(f"direct awscrt publish loop:            {direct_rate:8.0f} msg/s")
            print(f"awscrt app -> agent (spool) -> broker: {agent_rate:8.0f} msg/s")
            print(
                f"ratio: {ratio[w]:.2f} (target >= {TARGET_RATIO}): the same client, with and without the agent between"
            )
            print(
                f"ceiling, two direct loops at once: {ceiling_rate:8.0f} msg/s each = {ceiling_rate / direct_rate:.2f}"
                f" of the direct loop; the agent reaches {agent_rate / ceiling_rate:.2f} of it"
            )
            # Where the CPU goes, per message (the mean over the runs): what bounds either path on these cores.
            per = {k: sum(v) / len(v) / args.messages * 1e6 for (cw, k), v in cpu.items() if cw == w}
            direct_total = per["direct"] + per["direct broker"]
            agent_total = per["app"] + per["agent"] + per["broker"]
            print(
                f"CPU per message: direct loop {per['direct']:.0f} us + broker {per['direct broker']:.0f} us = "
                f"{direct_total:.0f} us; through the agent: app {per['app']:.0f} us + agent {per['agent']:.0f} us + "
                f"broker {per['broker']:.0f} us = {agent_total:.0f} us ({agent_total / direct_total:.2f}x)"
            )
        one = args.messages / direct_one_s
        paho_rate = args.messages / min(paho_s)
        print(
            f"paho app (window {args.window}) -> agent (spool) -> broker: {paho_rate:8.0f} msg/s "
            f"({paho_rate / (args.messages / min(direct_s[args.window])):.2f} of the direct loop; "
            f"{paho_rate / one:.2f} of it one at a time: {one:.0f} msg/s)"
        )
        failed |= ratio[0] < TARGET_RATIO  # judged where each server's Receive Maximum governs (see above)

        # The spool alone: store, mark sent, remove, in batches of 64 (what a busy loop turn does).
        from agent.local_messaging.spool import Spool

        sp = Spool(work / "cost.sqlite")
        n = 20_000
        start = time.perf_counter()
        for _ in range(0, n, 64):
            ids = [r for r in sp.add_many([("bench", TOPIC, bytes(256), None, None)] * 64) if isinstance(r, int)]
            sp.mark_sent(ids)
            sp.remove(ids)
        per = (time.perf_counter() - start) / n * 1e6
        sp.close()
        print(f"spool cost: {per:.1f} us per message (store + mark sent + remove, batches of 64, fsync each)")

        # Offline: the broker and the cloud's service stop; the app spools --spooled messages.
        time.sleep(2)
        idle = rss_kib(agent.pid)
        cloud.down()
        time.sleep(2)
        idle = min(idle, rss_kib(agent.pid))
        p = subprocess.Popen(
            [sys.executable, "-c", APP, str(sock), TOPIC, str(args.spooled), str(args.window)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdin is not None
        p.stdout.readline()
        start = time.perf_counter()
        p.stdin.write("\n")
        p.stdin.flush()
        out = p.stdout.readline().split()
        took = time.perf_counter() - start
        p.wait(30)
        time.sleep(2)
        spooled = rss_kib(agent.pid)
        grew = spooled - idle
        print(
            f"offline: {args.spooled} messages spooled in {took:.1f} s ({args.spooled / took:.0f} msg/s, "
            f"app result {' '.join(out)}); agent RSS idle {idle / 1024:.1f} MiB, with them spooled "
            f"{spooled / 1024:.1f} MiB: {grew:+d} KiB (target within {TARGET_RSS_KIB} KiB)"
        )
        failed |= grew > TARGET_RSS_KIB
    finally:
        if agent is not None:
            Child("agent", agent).stop(30)
        cloud.down()
        ntp.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
