"""A gateway app as the fault campaign runs it: paho-mqtt over the agent's Unix socket, QoS 1, numbered
messages, at-least-once by itself.

It publishes a window of messages, waits for their PUBACKs, and moves on only when every one of them
was accepted; on anything else (the agent killed, the connection refused while it restarts, a
refusal) it makes a NEW client (so no library-side resend muddles the count) and publishes again
from the first message not acknowledged. Every wait and retry is bounded. Prints one JSON line at
the end: how many it sent, resent, and how long it took.

    python publisher.py SOCKET TOPIC NAME COUNT [--window 20] [--rate N] [--give-up-s 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


class Attempt:
    def __init__(self, path: str) -> None:
        self.acks: dict[int, int] = {}
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.failed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport="unix")
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_disconnect = lambda *a: self._fail()
        c.max_inflight_messages_set(1000)
        self.c = c
        c.connect(path, keepalive=30)
        c.loop_start()

    def _on_connect(self, _c, _u, _f, reason, _p) -> None:
        if reason.is_failure:
            self._fail()
        else:
            self.connected.set()

    def _on_publish(self, _c, _u, mid, reason, _p) -> None:
        with self.cond:
            self.acks[mid] = reason.value
            self.cond.notify_all()

    def _fail(self) -> None:
        self.failed.set()
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("topic")
    ap.add_argument("name")
    ap.add_argument("count", type=int)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--give-up-s", type=float, default=300.0)
    ap.add_argument("--rate", type=float, default=0.0, help="messages per second at most (0: as fast as acknowledged)")
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.give_up_s
    seq, sent, resent, attempts, refused = 0, 0, 0, 0, 0
    highest_sent = -1
    while seq < args.count:
        if time.monotonic() > deadline:
            print(json.dumps({"name": args.name, "error": f"gave up at {seq}", "sent": sent}), flush=True)
            return 1
        attempts += 1
        try:
            a = Attempt(args.socket)
        except OSError:
            time.sleep(0.2)  # the agent is restarting: its socket is gone or refuses
            continue
        try:
            if not a.connected.wait(10) or a.failed.is_set():
                time.sleep(0.2)
                continue
            while seq < args.count and not a.failed.is_set():
                if args.rate > 0:  # a sensor's steady pace, not a flood: the faults land while it publishes
                    ahead = start + seq / args.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                batch = range(seq, min(seq + args.window, args.count))
                mids = []
                for i in batch:
                    info = a.c.publish(args.topic, f"{args.name}:{i}".encode(), qos=1)
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        a.failed.set()
                        break
                    mids.append(info.mid)
                    sent += 1
                    if i <= highest_sent:
                        resent += 1
                    highest_sent = max(highest_sent, i)
                ok = 0
                with a.cond:
                    a.cond.wait_for(lambda a=a, mids=mids: a.failed.is_set() or all(m in a.acks for m in mids), 30)
                    for m in mids:
                        if a.acks.get(m) == 0:
                            ok += 1
                        else:
                            break
                if ok < len(mids) and any(a.acks.get(m, 0) >= 0x80 for m in mids):
                    refused += 1
                seq += ok  # only an unbroken run of acknowledged messages counts
                if ok < len(mids):
                    break
        finally:
            a.close()
    took = time.monotonic() - start
    out = {"name": args.name, "count": args.count, "sent": sent, "resent": resent, "attempts": attempts}
    out.update(refused=refused, seconds=round(took, 2))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
