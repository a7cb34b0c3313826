"""Broker stopped and restarted: the agent reconnects by itself, with growing, jittered delays."""

from __future__ import annotations

import re
import statistics
import time


def test_agent_reconnects_after_broker_restart_with_jittered_backoff(bench, softhsm, agents):
    dev = bench.enroll(softhsm, "gw-reconnect")  # reconnect_min_s 0.2, reconnect_max_s 4.0
    a = agents(dev)
    first = a.wait_for(r"connected to localhost:\d+ as gw-reconnect")
    time.sleep(1.5)  # past reconnect_reset_after_s, so the backoff starts from its minimum
    port = bench.broker.port

    bench.broker.stop()
    down_at = time.monotonic()
    a.wait_for(r"disconnected: ", after=first)
    time.sleep(12)  # several failed attempts while the broker is down
    bench.broker.start()  # same port
    assert bench.broker.port == port
    back = a.wait_for(r"connected to localhost:\d+ as gw-reconnect", after=first + 1, timeout=20)

    failures = [t for t, line in a.lines[first:back] if re.search(r"connection to localhost:\d+ failed", line)]
    assert len(failures) >= 3, a.text()
    gaps = [b - a_ for a_, b in zip(failures, failures[1:], strict=False)]
    print("reconnect gaps (s):", [round(g, 2) for g in gaps])
    # Bounded: no retry storm (0.2 s minimum ceiling) and never longer than the 4 s cap (+ slack).
    assert len(failures) < 12 / 0.2, gaps
    assert max(gaps) <= 4.0 + 1.5, gaps
    # Growing: the later waits reach well beyond the first window of 0.2-0.4 s.
    assert max(gaps) > 0.8, gaps
    # Jittered: not a fixed schedule.
    assert statistics.pstdev(gaps) > 0.05, gaps
    assert ("gw-reconnect", "gw-reconnect") in bench.broker.connected_clients()
    assert time.monotonic() - down_at < 60
