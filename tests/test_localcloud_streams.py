"""MQTT file streams: describe, blocks by count and by bitmap, in JSON and CBOR, and AWS's errors."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import cbor2
import pytest

from localcloud.cloud import LocalCloud
from test_localcloud_authz import provision_device


@pytest.fixture
def cloud(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0001"])
    info = c.up()
    yield c, info
    c.down()


def request(dev, thing, stream, op, fmt, doc, expect_n=1):
    base = f"$aws/things/{thing}/streams/{stream}"
    body = cbor2.dumps(doc) if fmt == "cbor" else json.dumps(doc).encode()
    assert dev.publish(f"{base}/{op}/{fmt}", body) in (0, 16)
    out = []
    while len(out) < expect_n:
        t, p = dev.messages.get(timeout=10)
        if t == f"{base}/{op}/{fmt}":
            continue  # our own request, echoed by the wildcard subscription
        d = cbor2.loads(p) if fmt == "cbor" else json.loads(p)
        out.append((t[len(base) + 1:], d))
    return out


def test_stream_describe_and_get_blocks(cloud, tmp_path):
    c, info = cloud
    data = os.urandom(5000)
    (tmp_path / "fw.bin").write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "localcloud", "--dir", str(c.directory), "streams", "create",
                        "--file", str(tmp_path / "fw.bin"), "--stream-id", "fw-1", "--description", "firmware"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "fw-1"
    dev, _ = provision_device(c, info, tmp_path, "SN-0001")
    thing = "gw-SN-0001"
    try:
        dev.subscribe(f"$aws/things/{thing}/streams/+/+/+")
        [(kind, doc)] = request(dev, thing, "fw-1", "describe", "json", {"c": "t1"})
        assert kind == "description/json" and doc == {"c": "t1", "s": 1, "d": "firmware", "r": [{"f": 0, "z": 5000}]}
        blocks = request(dev, thing, "fw-1", "get", "json", {"c": "t2", "s": 1, "f": 0, "l": 1024, "o": 0, "n": 5}, 5)
        got = b"".join(base64.b64decode(d["p"]) for _, d in sorted(blocks, key=lambda x: x[1]["i"]))
        assert got == data and {k for k, _ in blocks} == {"data/json"}
        # Bitmap (CBOR): blocks 1 and 3 only, bytes as a CBOR byte string.
        blocks = request(dev, thing, "fw-1", "get", "cbor", {"f": 0, "l": 1024, "o": 0, "b": bytes([0b00001010])}, 2)
        assert sorted(d["i"] for _, d in blocks) == [1, 3]
        assert all(d["p"] == data[d["i"] * 1024:(d["i"] + 1) * 1024] for _, d in blocks)
        errors = {
            "BlockSizeOutOfBounds": {"f": 0, "l": 100},
            "OffsetOutOfBounds": {"f": 0, "l": 1024, "o": 99},
            "VersionMismatch": {"f": 0, "l": 1024, "s": 7},
            "ResourceNotFound": {"f": 3, "l": 1024},
            "BlockCountLimitExceeded": {"f": 0, "l": 65536, "n": 3},
            "InvalidRequest": {"f": 0, "l": 1024, "zz": 1},
        }
        for code, doc in errors.items():
            [(kind, rej)] = request(dev, thing, "fw-1", "get", "json", {**doc, "c": code})
            assert kind == "rejected/json" and rej["o"] == code and rej["c"] == code, (code, rej)
        [(kind, rej)] = request(dev, thing, "nope", "describe", "json", {})
        assert kind == "rejected/json" and rej["o"] == "ResourceNotFound"
    finally:
        dev.stop()
