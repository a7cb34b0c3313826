"""Metrics without Detect and live reconfiguration: [defender] destinations/topic, each problem one line;
the report on the user's topic; Reporter.reconfigure and DefenderFeature.reconfigure."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import cbor2
import pytest

from agent.base import config as base
from agent.base.errors import ConfigError
from agent.base.state import StateStore
from agent.defender import config as defender_config
from agent.defender.config import DefenderConfig
from agent.defender.feature import DefenderFeature
from agent.defender.reporter import Reporter, Snapshot
from agent.session.feature import MessageRouter, Session
from localcloud.defender import validate

BASE = {"broker": {"endpoint": "h", "ca_file": "c"}, "pkcs11": {"library": "l", "token_label": "t"}}
SNAP = Snapshot([(22, "eth0")], [], [("192.0.2.1:443", 50000, "eth0")], (100, 200, 3, 4), {})


def parse(defender: dict):
    return base.parse({**BASE, "defender": defender}, None, defender_config.SECTIONS)


def problems(defender: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(defender)
    return e.value.problems


# -- config ---------------------------------------------------------------------------------------
def test_defaults_keep_detect_only_and_the_dt_topic():
    d = parse({}).defender
    assert d.destinations == ["defender"] and d.topic == "dt/${thing}/metrics"
    assert d.metrics_topic("gw-SN-1") == "dt/gw-SN-1/metrics"
    both = parse({"destinations": ["topic", "defender"], "topic": "fleet/${thing}/m"}).defender
    assert both.destinations == ["topic", "defender"] and both.metrics_topic("gw") == "fleet/gw/m"
    assert parse({"topic": "${thing}/metrics"}).defender.metrics_topic("gw") == "gw/metrics"


def test_detects_300_s_minimum_applies_only_when_reporting_to_detect():
    assert parse({"destinations": ["topic"], "interval_s": 60}).defender.interval_s == 60
    assert problems({"destinations": ["defender", "topic"], "interval_s": 60}) == [
        "defender.interval_s: 60 is below AWS's 300 s minimum (reports would be throttled)"
    ]


LONG = "a/" * 5 + "x" * 120 + "/${thing}"  # 131 bytes + a 128-byte thing name = 259 > 256
BAD = [
    (
        {"destinations": []},
        "defender.destinations: empty; list 'defender' and/or 'topic' (set defender.enabled = false to stop reporting)",
    ),
    (
        {"destinations": ["defender", "cloudwatch"]},
        "defender.destinations: 'cloudwatch' is not a destination (known: defender, topic)",
    ),
    (
        {"destinations": ["topic", "defender", "topic"]},
        "defender.destinations: 'topic' is listed twice; list each destination once",
    ),
    ({"destinations": "topic"}, "defender.destinations: expected a list of strings, got string 'topic'"),
    ({"topic": ""}, 'defender.topic: is empty; set a topic such as "dt/${thing}/metrics"'),
    (
        {"topic": "dt/+/metrics"},
        "defender.topic: 'dt/+/metrics': contains a wildcard (+ or #); a topic to publish to names one topic",
    ),
    (
        {"topic": "dt/${thing}/#"},
        "defender.topic: 'dt/${thing}/#': contains a wildcard (+ or #); a topic to publish to names one topic",
    ),
    (
        {"topic": "$aws/things/${thing}/metrics"},
        "defender.topic: '$aws/things/${thing}/metrics': $aws/ topics are reserved by AWS IoT; use one of your own, "
        "such as dt/${thing}/metrics",
    ),
    (
        {"topic": "$SYS/metrics"},
        "defender.topic: '$SYS/metrics': topics starting with $ are reserved for the broker; use one such as "
        "dt/${thing}/metrics",
    ),
    (
        {"topic": "dt/${thing_name}/metrics"},
        "defender.topic: 'dt/${thing_name}/metrics': only ${thing} is replaced (by the thing name); "
        "remove the other ${...}",
    ),
    (
        {"topic": "dt/\0/metrics"},
        "defender.topic: 'dt/\\x00/metrics': contains a NUL character, which a topic name may not",
    ),
    (
        {"topic": "a/b/c/d/e/f/g/h/${thing}"},
        "defender.topic: 'a/b/c/d/e/f/g/h/${thing}': 8 slashes; AWS IoT allows at most 7",
    ),
    (
        {"topic": LONG},
        f"defender.topic: {LONG!r}: 259 bytes with a 128-character thing name; AWS IoT allows 256",
    ),
    ({"topic": "dt/\ud800"}, "defender.topic: 'dt/\\ud800': not valid UTF-8 text"),
]


@pytest.mark.parametrize("bad, line", BAD, ids=[str(i) for i in range(len(BAD))])
def test_each_bad_destination_or_topic_is_one_line(bad, line):
    assert problems(bad) == [line]


def test_a_topic_of_exactly_256_bytes_with_the_longest_thing_name_is_accepted():
    topic = "dt/" + "m" * (256 - 3 - 1 - 128) + "/${thing}"
    assert parse({"topic": topic}).defender.metrics_topic("x" * 128).encode().__len__() == 256
    assert problems({"topic": "dt/m" + topic[3:]})[0].endswith(
        "257 bytes with a 128-character thing name; AWS IoT allows 256"
    )


# -- the reporter ---------------------------------------------------------------------------------
class FakeCollector:
    def collect(self):
        return SNAP


class Harness:
    """A reporter over fakes: the published messages, subscriptions and state in plain lists and dicts."""

    def __init__(self, cfg: DefenderConfig, clock: float = 1_800_000_000.0, fail: set[str] | None = None):
        self.state: dict = {}
        self.clock = {"t": clock}
        self.published: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []
        self.fail = fail or set()
        self.r = Reporter(
            cfg,
            "gw-1",
            FakeCollector(),  # type: ignore[arg-type]
            publish=self.publish,
            subscribe=lambda t: self.subscribed.append(t) or 0,
            connected=lambda: True,
            connection_count=lambda: 1,
            load_state=lambda: dict(self.state),
            save_state=lambda d: (self.state.clear(), self.state.update(d)),
            now=lambda: self.clock["t"],
        )

    def publish(self, topic: str, payload: bytes) -> int:
        if topic in self.fail:
            raise TimeoutError(f"no PUBACK for {topic}")
        self.published.append((topic, payload))
        return 0


SHORT = {"interval_s": 1.0, "testing_allow_short_interval": True}


def test_both_destinations_get_the_same_report_and_only_detect_is_subscribed(caplog):
    h = Harness(DefenderConfig(**SHORT, destinations=["defender", "topic"]))
    with caplog.at_level(logging.INFO, "agent.defender"):
        rid = h.r.report_once()
    (t1, p1), (t2, p2) = h.published
    assert t1 == "$aws/things/gw-1/defender/metrics/json" and t2 == "dt/gw-1/metrics" and p1 == p2
    doc = json.loads(p2)
    assert doc["header"]["report_id"] == rid and validate(doc) is None
    assert h.subscribed == [f"{t1}/accepted", f"{t1}/rejected"]
    assert f"report {rid} published to dt/gw-1/metrics (" in caplog.text
    assert f"report {rid} published (" in caplog.text


def test_topic_only_never_subscribes_and_keeps_the_persisted_report_id():
    h = Harness(DefenderConfig(**SHORT, destinations=["topic"], format="cbor", names="short"))
    h.state["last_report_id"] = int(h.clock["t"]) + 50  # a report made before the clock stepped back
    first = h.r.report_once()
    h.clock["t"] += 1
    second = h.r.report_once()
    assert [t for t, _ in h.published] == ["dt/gw-1/metrics"] * 2 and h.subscribed == []
    assert first == h.clock["t"] + 50 and second == first + 1 and h.state["last_report_id"] == second
    doc = cbor2.loads(h.published[1][1])
    assert doc["hed"]["rid"] == second and validate(doc) is None


def test_a_failing_destination_does_not_keep_the_report_from_the_other():
    h = Harness(
        DefenderConfig(**SHORT, destinations=["defender", "topic"]), fail={"$aws/things/gw-1/defender/metrics/json"}
    )
    with pytest.raises(TimeoutError, match="no PUBACK"):
        h.r.report_once()
    assert [t for t, _ in h.published] == ["dt/gw-1/metrics"]
    assert "last_report_id" in h.state  # written ahead: the id is not reused


def test_after_a_format_change_the_next_report_is_cbor_and_answers_of_both_formats_are_read(caplog):
    h = Harness(DefenderConfig(**SHORT, destinations=["defender", "topic"]))
    h.r.report_once()
    with caplog.at_level(logging.INFO, "agent.defender"):
        h.r.reconfigure(DefenderConfig(**SHORT, destinations=["defender", "topic"], format="cbor", names="short"))
    assert (
        "Device Defender: now every 1 s (cbor, short names, to Detect $aws/things/gw-1/defender/metrics/cbor, "
        "dt/gw-1/metrics)" in caplog.text
    )
    h.clock["t"] += 1
    rid = h.r.report_once()
    (t1, p1), (t2, p2) = h.published[2:]
    assert t1 == "$aws/things/gw-1/defender/metrics/cbor" and t2 == "dt/gw-1/metrics"
    assert cbor2.loads(p1)["hed"]["rid"] == rid and p1 == p2
    assert h.subscribed[2:] == [f"{t1}/accepted", f"{t1}/rejected"]  # the new format's answers
    # The route is the prefix: a late JSON answer to the old report and a CBOR one to the new are both read.
    prefix = h.r.response_prefix
    h.r.on_response(prefix + "json/accepted", json.dumps({"reportId": rid - 1}).encode())
    h.r.on_response(prefix + "cbor/rejected", cbor2.dumps({"reportId": rid, "statusDetails": {"ErrorCode": "X"}}))
    assert h.r.accepted == 1 and h.r.rejected == 1 and h.r.last_rejection == "X: "


def test_reconfigure_to_a_shorter_interval_recomputes_the_wait_at_once():
    """Deterministic: the thread's wait is replaced by a fake that advances the fake clock."""
    h = Harness(DefenderConfig(interval_s=300))
    h.state["last_report_at"] = h.clock["t"]  # a report just went out
    waits: list[float] = []

    def fake_wait(delay: float) -> bool:
        waits.append(delay)
        if len(waits) == 1:  # 2 s into the 300 s wait, the config feature shortens the interval
            h.clock["t"] += 2
            h.r.reconfigure(DefenderConfig(interval_s=10, destinations=["topic"]))
            return False
        h.clock["t"] += delay
        if len(h.published) >= 2:
            h.r._stop.set()
        return h.r._stop.is_set()

    h.r._wait = fake_wait  # type: ignore[method-assign]
    h.r._loop()
    assert waits[:3] == [300, 8, 10], waits  # 10 s after the last report, then every 10 s
    assert [t for t, _ in h.published] == ["dt/gw-1/metrics"] * 2


def test_reconfigure_wakes_the_sleeping_thread_in_real_time():
    """The real thread: it sleeps an hour, is reconfigured to 0.2 s, and reports within a second."""
    h = Harness(DefenderConfig(interval_s=3600), clock=0.0)
    h.r.now = time.time
    h.state["last_report_at"] = time.time()
    h.r.start()
    try:
        time.sleep(0.2)
        assert h.published == []
        t0 = time.monotonic()
        h.r.reconfigure(DefenderConfig(interval_s=1, testing_allow_short_interval=True))
        deadline = t0 + 5
        while len(h.published) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(h.published) >= 2 and time.monotonic() - t0 < 3, h.published
    finally:
        t = time.monotonic()
        h.r.stop()
        assert time.monotonic() - t < 1  # stop wakes it too


def test_reconfigure_with_the_same_config_neither_logs_nor_reports_early(caplog):
    cfg = DefenderConfig(interval_s=300)
    h = Harness(cfg)
    h.state["last_report_at"] = h.clock["t"]
    waits: list[float] = []

    def fake_wait(delay: float) -> bool:
        waits.append(delay)
        if len(waits) == 1:
            h.clock["t"] += 100
            h.r.reconfigure(DefenderConfig(interval_s=300))
            return False
        h.r._stop.set()
        return True

    h.r._wait = fake_wait  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, "agent.defender"):
        h.r._loop()
    assert waits == [300, 200] and h.published == [] and "now every" not in caplog.text


# -- the feature ----------------------------------------------------------------------------------
class FakeConn:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connect_count = 1
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        self.published.append((topic, payload))
        return 0

    def subscribe(self, topic: str, qos: int = 1) -> int:
        return 1


def test_feature_reconfigure_applies_live_or_says_restart(tmp_path: Path):
    cfg = parse({"interval_s": 300})
    store = StateStore(tmp_path)
    feature = DefenderFeature(cfg, store)
    assert feature.reconfigure(cfg) is False  # not running: the caller restarts the session
    router = MessageRouter()
    session = Session(
        thing_name="gw-1",
        certificate_file=tmp_path / "device.pem",
        key_label="device",
        conn=FakeConn(),  # type: ignore[arg-type]
        store=store,
        router=router,
        stop=threading.Event(),
        end=lambda: None,
        request_restart=lambda: None,
    )
    feature.start(session)
    try:
        reporter = feature.reporter
        assert reporter is not None
        new = parse({"interval_s": 600, "format": "cbor", "destinations": ["defender", "topic"]})
        assert feature.reconfigure(new) is True
        assert reporter.cfg == new.defender and reporter.collector.cfg == new.defender
        assert reporter.topic == "$aws/things/gw-1/defender/metrics/cbor"
        # The route registered at start still reaches the reporter for the new format's answers.
        router("$aws/things/gw-1/defender/metrics/cbor/accepted", cbor2.dumps({"reportId": 1}))
        assert reporter.accepted == 1
        assert feature.reconfigure(parse({"enabled": False})) is False  # turning it off takes a restart
    finally:
        feature.stop()
    assert feature.reconfigure(cfg) is False
