"""Device Defender reports on the local cloud: all four encodings, throttling, rejections, storage."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import cbor2
import pytest
from cloudkit import provision_device

from localcloud.cloud import LocalCloud
from localcloud.defender import validate


def report(rid: int, short: bool) -> dict:
    long = {
        "header": {"report_id": rid, "version": "1.0"},
        "metrics": {
            "tcp_connections": {
                "established_connections": {
                    "connections": [
                        {"remote_addr": "192.0.2.7:443", "local_port": 50123, "local_interface": "eth0"},
                        {"remote_addr": "[2001:db8::1]:8883", "local_port": 50124},
                    ],
                    "total": 2,
                }
            },
            "listening_tcp_ports": {"ports": [{"port": 22, "interface": "eth0"}], "total": 1},
            "listening_udp_ports": {"ports": [{"port": 5353}], "total": 1},
            "network_stats": {"bytes_in": 10, "bytes_out": 20, "packets_in": 1, "packets_out": 2},
        },
        "custom_metrics": {"cpu_usage": [{"number": 12.5}], "agent_version": [{"string_list": ["0.1.0"]}]},
    }
    if not short:
        return long
    from localcloud.defender import NAMES

    def conv(v):
        if isinstance(v, dict):
            return {(NAMES.get(k, k) if k not in long["custom_metrics"] else k): conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    out = conv({k: v for k, v in long.items() if k != "custom_metrics"})
    out["cmet"] = long["custom_metrics"]
    return out


def test_report_fixtures_follow_the_specification():
    assert validate(report(1, False)) is None and validate(report(1, True)) is None


def test_the_troubleshooting_guides_malformed_report_gets_its_documented_code():
    # The example from AWS's Device Defender troubleshooting guide: a "number" custom metric not wrapped in
    # a list is answered ErrorCode InvalidPayload, ErrorMessage "Malformed metrics report".
    doc = {
        "header": {"report_id": 12334567, "version": "1.0"},
        "metrics": {"network_stats": {"bytes_in": 30680, "bytes_out": 10652, "packets_in": 113, "packets_out": 118}},
        "custom_metrics": {"my_custom_metric": {"number": 0}},
    }
    code, message = validate(doc)
    assert code == "InvalidPayload" and message.startswith("Malformed metrics report")
    doc["custom_metrics"]["my_custom_metric"] = [{"number": 0}]
    assert validate(doc) is None


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.configure(defender_min_interval_s=0.5)
    c.registry.allow_serials(["SN-0001"])
    info = c.up()
    yield c, info
    c.down()


def send(dev, fmt: str, doc) -> tuple[str, dict]:
    base = "$aws/things/gw-SN-0001/defender/metrics/" + fmt
    body = doc if isinstance(doc, bytes) else (cbor2.dumps(doc) if fmt == "cbor" else json.dumps(doc).encode())
    assert dev.publish(base, body) in (0, 16)
    t, p = dev.messages.get(timeout=10)
    assert t in (base + "/accepted", base + "/rejected")
    return t.rsplit("/", 1)[1], (cbor2.loads(p) if fmt == "cbor" else json.loads(p))


def test_reports_in_all_four_encodings_accepted_then_throttled_and_rejected(cloud, tmp_path):
    c, info = cloud
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    try:
        for fmt in ("json", "cbor"):
            dev.subscribe(f"$aws/things/gw-SN-0001/defender/metrics/{fmt}/+")
        rid = 1000
        for fmt in ("json", "cbor"):
            for short in (False, True):
                rid += 1
                before = int(time.time() * 1000)
                kind, doc = send(dev, fmt, report(rid, short))
                # AWS's answer carries a timestamp in epoch milliseconds (Device Defender troubleshooting guide).
                stamp = doc.pop("timestamp")
                assert before <= stamp <= int(time.time() * 1000)
                assert (kind, doc) == ("accepted", {"thingName": "gw-SN-0001", "status": "ACCEPTED", "reportId": rid})
                time.sleep(0.6)
        kind, doc = send(dev, "json", report(rid + 1, False))
        kind2, doc2 = send(dev, "json", report(rid + 2, False))  # within the interval
        assert kind == "accepted" and kind2 == "rejected" and doc2["statusDetails"]["ErrorCode"] == "Throttled"
        time.sleep(0.6)
        kind, doc = send(dev, "json", report(rid, False))  # not increasing
        assert kind == "rejected" and "not greater" in doc["statusDetails"]["ErrorMessage"]
        assert doc["statusDetails"]["ErrorCode"] == "InvalidPayload"
        bad = report(rid + 9, False)
        bad["metrics"]["listening_tcp_ports"]["ports"][0]["port"] = 0
        kind, doc = send(dev, "json", bad)
        # AWS's code and message for a report that breaks the specification (troubleshooting guide):
        # InvalidPayload, "Malformed metrics report" (here followed by what is wrong).
        assert kind == "rejected" and doc["statusDetails"]["ErrorCode"] == "InvalidPayload"
        assert (
            doc["statusDetails"]["ErrorMessage"].startswith("Malformed metrics report")
            and "port" in doc["statusDetails"]["ErrorMessage"]
        )
        assert set(doc) == {"thingName", "status", "statusDetails", "timestamp", "reportId"}
        kind, doc = send(dev, "cbor", b"\xff\x00garbage")
        assert kind == "rejected" and doc["statusDetails"]["ErrorCode"] == "InvalidPayload"
        kind, doc = send(dev, "json", {"header": {"report_id": rid + 10, "version": "1.0"}, "hed": {}})
        assert kind == "rejected"
    finally:
        dev.stop()
    out = subprocess.run(
        [sys.executable, "-m", "localcloud", "--dir", str(c.directory), "defender", "reports", "gw-SN-0001"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["status"] for r in rows[:5]] == ["ACCEPTED"] * 5
    assert rows[0]["report"]["metrics"]["network_stats"]["bytes_out"] == 20
    assert {r["format"] for r in rows} == {"json", "cbor"}
