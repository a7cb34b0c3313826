"""The agent's metrics on a topic of its own (metrics without Device Defender Detect), against the local
cloud: the broker delivers each report to a subscriber on dt/<thing>/metrics, and Detect still accepts the
same reports when both destinations are configured."""

from __future__ import annotations

import json
import re
import time

import pytest

from localcloud import pace
from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.defender import validate
from localcloud.ntp import Chrony
from localcloud.recorder import Recorder


@pytest.fixture
def world(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["T0"])
    ntp = Chrony(tmp_path / "chrony").start()
    yield c, ntp
    ntp.stop()
    c.down()


def test_reports_reach_the_metrics_topic_and_detect_still_accepts_them(world, softhsm, agents, tmp_path):
    c, ntp = world
    c.configure(defender_min_interval_s=0.5)
    c.up()
    thing = "gw-T0"
    rec = Recorder(c, [f"dt/{thing}/metrics"], client_id="metrics-watcher").start()
    try:
        dev = fresh_device(
            c,
            softhsm,
            "T0",
            tmp_path / "dev",
            [ntp.server],
            extra={
                "defender": {
                    "interval_s": 1.0,
                    "testing_allow_short_interval": True,
                    "destinations": ["defender", "topic"],
                }
            },
        )
        a = agents(dev)
        a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=60)
        first = a.wait_for(rf"report \d+ published to dt/{thing}/metrics", timeout=30)
        a.wait_for(r"report \d+ accepted", timeout=30)
        a.wait_for(rf"report \d+ published to dt/{thing}/metrics", after=first + 1, timeout=30)
        deadline = time.monotonic() + pace.scaled(10)
        while len(rec.snapshot()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        a.stop()
    finally:
        rec.stop()
    got = [json.loads(p) for t, p in rec.snapshot() if t == f"dt/{thing}/metrics"]
    assert len(got) >= 2, rec.snapshot()
    assert all(validate(doc) is None for doc in got)  # the same document Detect takes
    ids = [doc["header"]["report_id"] for doc in got]
    assert ids == sorted(set(ids))
    on_topic = {int(m.group(1)) for _, line in a.lines if (m := re.search(r"report (\d+) published to dt/", line))}
    assert set(ids) <= on_topic
    reports = c.registry.db.execute("SELECT status, report FROM defender_reports WHERE thing = ?", (thing,)).fetchall()
    accepted = {json.loads(r[1])["header"]["report_id"] for r in reports if r[0] == "ACCEPTED"}
    assert set(ids) & accepted, (ids, reports)  # Detect got (and accepted) the same reports
