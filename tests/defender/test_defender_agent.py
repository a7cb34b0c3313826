"""The agent's Defender reports against the local cloud: all four encodings accepted; a throttled
report is logged once and reporting carries on at its interval."""

from __future__ import annotations

import re

import pytest

from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony


@pytest.fixture
def world(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials([f"D{i}" for i in range(6)])
    ntp = Chrony(tmp_path / "chrony").start()
    yield c, ntp
    ntp.stop()
    c.down()


@pytest.mark.parametrize("fmt,names", [("json", "long"), ("json", "short"), ("cbor", "long"), ("cbor", "short")])
def test_reports_in_every_encoding_are_accepted(world, softhsm, agents, tmp_path, fmt, names):
    c, ntp = world
    c.configure(defender_min_interval_s=0.5)
    c.up()
    serial = f"D{['json-long', 'json-short', 'cbor-long', 'cbor-short'].index(f'{fmt}-{names}')}"
    dev = fresh_device(
        c,
        softhsm,
        serial,
        tmp_path / "dev",
        [ntp.server],
        extra={"defender": {"interval_s": 1.0, "testing_allow_short_interval": True, "format": fmt, "names": names}},
    )
    a = agents(dev)
    a.wait_for(rf"connected to localhost:\d+ as gw-{serial}", timeout=60)
    first = a.wait_for(r"report \d+ accepted", timeout=30)
    a.wait_for(r"report \d+ accepted", after=first + 1, timeout=30)
    a.stop()
    reports = c.registry.db.execute(
        "SELECT status, format, report FROM defender_reports WHERE thing = ?", (f"gw-{serial}",)
    ).fetchall()
    assert len(reports) >= 2 and all(r[0] == "ACCEPTED" and r[1] == fmt for r in reports)
    assert ('"hed"' in reports[0][2]) == (names == "short")


def test_throttled_report_is_logged_once_and_the_next_goes_out_on_time(world, softhsm, agents, tmp_path):
    c, ntp = world
    c.configure(defender_min_interval_s=100)  # the second report within 100 s is throttled
    c.up()
    dev = fresh_device(
        c,
        softhsm,
        "D5",
        tmp_path / "dev",
        [ntp.server],
        extra={"defender": {"interval_s": 1.0, "testing_allow_short_interval": True}},
    )
    a = agents(dev)
    a.wait_for(r"report \d+ accepted", timeout=60)
    rej = a.wait_for(r"report \d+ rejected: Throttled: one report per 100 s", timeout=30)
    a.wait_for(r"report \d+ rejected: Throttled", after=rej + 1, timeout=30)
    a.stop()
    published = [t for t, line in a.lines if re.search(r"report \d+ published", line)]
    rejected = [line for _, line in a.lines if "rejected: Throttled" in line]
    ids = [int(re.search(r"report (\d+) rejected", line).group(1)) for line in rejected]
    assert len(ids) == len(set(ids))  # each rejection logged once, never re-sent
    gaps = [b - a_ for a_, b in zip(published, published[1:], strict=False)]
    assert gaps and all(0.5 < g < 3.0 for g in gaps), gaps  # reporting keeps its 1 s rhythm
