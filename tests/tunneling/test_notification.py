"""The tunnel notification is network input: checked whole before anything opens, a token used once,
the tunnel limit kept, the token never logged. The feature is driven directly (its router handler), so
each refusal is one call and one log line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agent.base.state import StateStore
from agent.runtime import features
from agent.tunneling.feature import TunnelingFeature, endpoint_host, parse_notification

TOKEN = "AQGAAXiVzSmRL1VhZ8dBeh5FgLbhAAAAAQAAAAEAA" * 3


def note(**changes) -> bytes:
    doc = {"clientAccessToken": TOKEN, "clientMode": "destination", "region": "eu-west-1", "services": ["SSH"]}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (note(clientMode="source"), "clientMode is 'source', not 'destination'"),
        (note(clientMode=None), "no clientMode"),
        (note(clientAccessToken="short"), "clientAccessToken is missing or not 16-4096 visible ASCII characters"),
        (note(clientAccessToken=TOKEN + "\r\nX-Evil: 1"), "clientAccessToken is missing or not 16-4096 visible"),
        (note(region="eu-west-1.evil.example"), "region is missing or not an AWS region name"),
        (note(region=None), "region is missing or not an AWS region name"),
        (note(services=[]), "services is not a list of 1-10 service ids"),
        (note(services="SSH"), "services is not a list of 1-10 service ids"),
        (note(services=["SSH", "SSH"]), "services holds something other than distinct service ids"),
        (note(services=["S SH"]), "services holds something other than distinct service ids"),
        (b" " * 9000, "9000 bytes (at most 8192)"),
        (b"[" * 5000 + b"]" * 5000, "bytes (at most 8192)"),
    ],
)
def test_bad_notifications_are_refused_with_the_reason(payload, reason):
    with pytest.raises(ValueError) as e:
        parse_notification(payload)
    assert reason in str(e.value)
    assert TOKEN not in str(e.value)


def test_a_good_notification_and_the_endpoint_it_names():
    n = parse_notification(note(services=["SSH", "HTTP"]))
    assert (n.token, n.region, n.services) == (TOKEN, "eu-west-1", ("SSH", "HTTP"))
    assert endpoint_host("eu-west-1") == "data.tunneling.iot.eu-west-1.amazonaws.com"
    assert endpoint_host("cn-north-1") == "data.tunneling.iot.cn-north-1.amazonaws.com.cn"


@pytest.fixture
def feature(tmp_path: Path):
    from localcloud.pki import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "ca")  # a real CA file: the tunnel gets as far as connecting
    cfg = features.parse(
        {
            "broker": {"endpoint": "h", "ca_file": str(ca.cert_path), "connect_timeout_s": 1},
            "pkcs11": {"library": "l", "token_label": "t"},
            "device": {"state_dir": str(tmp_path / "state")},
            "tunneling": {
                "enabled": True,
                "endpoint": "127.0.0.1",
                "port": 9,  # discard: nothing listens, so an opened tunnel only retries
                "max_tunnels": 1,
                "reconnect_s": 600,  # it keeps retrying for the whole test
                "services": {"SSH": {"target": "127.0.0.1:22"}},
            },
        }
    )
    f = TunnelingFeature(cfg, StateStore(tmp_path / "state"))
    yield f
    f.stop()


def test_reused_tokens_unlisted_services_and_the_limit_are_refused(feature, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    topic = "$aws/things/gw/tunnels/notify"
    feature.on_notify(topic, note(services=["VNC"]))
    assert "none of its services (VNC) is in tunneling.services; nothing opened" in caplog.text
    assert not feature.tunnels
    feature.on_notify(topic, note())
    assert len(feature.tunnels) == 1
    assert feature.store.load()["tunnels"][0]["services"] == ["SSH"]  # recorded for status and inventory
    feature.on_notify(topic, note())
    assert "its access token was already used; nothing opened" in caplog.text
    feature.on_notify(topic, note(clientAccessToken="B" * 40))
    assert "tunneling.max_tunnels (1) are open; nothing opened" in caplog.text
    feature.on_notify(topic, b"{")
    assert "notification refused: not JSON; nothing opened" in caplog.text
    assert len(feature.tunnels) == 1
    assert TOKEN not in caplog.text and "B" * 40 not in caplog.text
    feature.stop()
    assert not feature.tunnels
    assert feature.store.load()["tunnels"] == []


def test_a_missing_tunneling_ca_file_is_one_line(tmp_path):
    cfg = features.parse(
        {
            "broker": {"endpoint": "h", "ca_file": "c"},
            "pkcs11": {"library": "l", "token_label": "t"},
            "tunneling": {
                "enabled": True,
                "ca_file": str(tmp_path / "nope.pem"),
                "services": {"SSH": {"target": "127.0.0.1:22"}},
            },
        }
    )
    problems = [p for p in features.check_files(cfg) if p.startswith("tunneling.")]
    assert problems == [
        f"tunneling.ca_file: {tmp_path / 'nope.pem'} does not exist; put the tunneling endpoint's root CA "
        "(AmazonRootCA1.pem) there"
    ]
