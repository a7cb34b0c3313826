"""The Commands request parser: whatever arrives, a Request or a RequestError with a documented reason code."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.base import cbor
from agent.commands import request as rq

THING = "gw-1"
ACTIONS = ("report-status", "collect-logs")
JSON_TOPIC = rq.Topic("0f8e1c2a-1111-4222-8333-444455556666", "json")
CBOR_TOPIC = rq.Topic("0f8e1c2a-1111-4222-8333-444455556666", "cbor")


def parse(payload: bytes, topic: rq.Topic = JSON_TOPIC, content_type: str | None = None) -> rq.Request:
    return rq.parse_request(payload, topic, content_type, max_bytes=32 * 1024, actions=ACTIONS)


def refused(payload: bytes, topic: rq.Topic = JSON_TOPIC, content_type: str | None = None) -> rq.RequestError:
    with pytest.raises(rq.RequestError) as e:
        parse(payload, topic, content_type)
    return e.value


def test_topics():
    base = f"$aws/commands/things/{THING}/executions/abc-123/request"
    assert rq.parse_topic(base + "/json", THING) == rq.Topic("abc-123", "json")
    assert rq.parse_topic(base + "/cbor", THING) == rq.Topic("abc-123", "cbor")
    assert rq.parse_topic(base, THING) == rq.Topic("abc-123", None)
    for bad in (
        base + "/xml",
        base + "/json/extra",
        "$aws/commands/things/other/executions/abc-123/request/json",
        f"$aws/commands/things/{THING}/executions/abc-123/response/json",
        f"$aws/commands/things/{THING}/executions/a+b/request/json",
        f"$aws/commands/things/{THING}/executions//request/json",
        f"$aws/commands/things/{THING}/executions/{'x' * 65}/request/json",
    ):
        assert rq.parse_topic(bad, THING) is None, bad
    assert rq.request_filter(THING) == f"$aws/commands/things/{THING}/executions/+/request/#"
    assert rq.response_topic(THING, "abc", "cbor") == f"$aws/commands/things/{THING}/executions/abc/response/cbor"


def test_good_requests_in_json_cbor_and_by_content_type():
    assert parse(b'{"action": "report-status"}') == rq.Request("report-status", {})
    doc = {"action": "collect-logs", "parameters": {"lines": 200, "units": ["a", "b"], "deep": {"x": None}}}
    assert parse(json.dumps(doc).encode()).parameters == doc["parameters"]
    assert parse(cbor.dumps(doc), CBOR_TOPIC).parameters == doc["parameters"]
    untyped = rq.Topic("abc", None)
    assert parse(json.dumps(doc).encode(), untyped, "application/json; charset=utf-8").action == "collect-logs"
    assert parse(cbor.dumps(doc), untyped, "application/cbor").action == "collect-logs"
    assert rq.response_format(untyped, "application/cbor") == "cbor"
    assert rq.response_format(untyped, "text/plain") == "json"


@pytest.mark.parametrize(
    "payload, code, words",
    [
        (b"", rq.MALFORMED, "not valid JSON"),
        (b"\xff\xfe", rq.MALFORMED, "not valid JSON"),
        (b"[1, 2]", rq.MALFORMED, "must be a JSON map"),
        (b'{"action": 3}', rq.MALFORMED, "non-empty string"),
        (b'{"action": ""}', rq.MALFORMED, "non-empty string"),
        (b'{"action": "report-status", "run": "rm -rf /"}', rq.MALFORMED, 'unknown field(s) "run"'),
        (b'{"action": "collect-logs", "parameters": [1]}', rq.MALFORMED, "must be a map"),
        (b'{"action": "collect-logs", "parameters": {"n": NaN}}', rq.MALFORMED, "not valid JSON"),
        (b'{"action": "collect-logs", "parameters": {"n": 1e999}}', rq.MALFORMED, "finite"),
        (b'{"action": "reboot"}', rq.UNKNOWN, '"reboot" is not a command this device runs'),
        (b"[" * 5000 + b"]" * 5000, rq.MALFORMED, "JSON"),
    ],
)
def test_refusals_name_the_reason(payload, code, words):
    e = refused(payload)
    assert (e.status, e.reason_code) == (rq.REJECTED, code) and words in e.description, e.description


def test_size_type_and_depth_limits():
    e = refused(b'{"action": "collect-logs", "parameters": {"x": "' + b"a" * 40000 + b'"}}')
    assert e.reason_code == rq.TOO_LARGE and "commands.max_request_kib" in e.description
    e = refused(b"hello", rq.Topic("abc", None), "text/plain")
    assert e.reason_code == rq.UNSUPPORTED_FORMAT and '"text/plain"' in e.description
    e = refused(b"{}", rq.Topic("abc", None), None)
    assert e.reason_code == rq.UNSUPPORTED_FORMAT
    deep: dict = {}
    node = deep
    for _ in range(rq.MAX_DEPTH + 1):
        node["d"] = {}
        node = node["d"]
    e = refused(json.dumps({"action": "collect-logs", "parameters": deep}).encode())
    assert "nested more than" in e.description
    e = refused(cbor.dumps({"action": "collect-logs", "parameters": {"blob": b"\x00"}}), CBOR_TOPIC)
    assert "bytes value is not allowed" in e.description
    e = refused(cbor.dumps({"action": "collect-logs", "parameters": {1: "x"}}), CBOR_TOPIC)
    assert "keys must be strings" in e.description


def test_responses_fit_awss_limits():
    doc = rq.response(rq.FAILED, rq.HANDLER_FAILED, "x" * 5000, {"exit_code": {"s": "3"}})
    assert doc["statusReason"]["reasonCode"] == "HANDLER_FAILED"
    assert len(doc["statusReason"]["reasonDescription"]) == 1024
    for code in (*rq.REASON_CODES, rq.CANNOT_RUN, rq.INTERRUPTED):
        assert rq.REASON_CODE_RE.fullmatch(code)
    assert json.loads(rq.encode(doc, "json")) == doc
    assert cbor.loads(rq.encode(doc, "cbor")) == doc
    assert rq.encode(rq.response(rq.SUCCEEDED, result={"o": {"s": "\ud800"}}), "json")  # a lone surrogate is escaped


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
requestish = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from([*ACTIONS, "", "other"]) | json_values,
        "parameters": json_values,
        "extra": json_values,
    },
)


def _only_documented(payload: bytes, topic: rq.Topic, content_type: str | None) -> None:
    try:
        r = parse(payload, topic, content_type)
    except rq.RequestError as e:
        assert e.reason_code in rq.REASON_CODES and e.status == rq.REJECTED
        assert len(e.description) <= rq.MAX_DESCRIPTION
        return
    assert r.action in ACTIONS and isinstance(r.parameters, dict)
    json.dumps(r.parameters, allow_nan=False)  # plain JSON: a handler can always be given it


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300),
    st.sampled_from([JSON_TOPIC, CBOR_TOPIC, rq.Topic("a", None)]),
    st.none() | st.text(max_size=30),
)
def test_any_bytes_give_a_request_or_a_documented_refusal(payload, topic, content_type):
    _only_documented(payload, topic, content_type)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(requestish, st.sampled_from(["json", "cbor"]))
def test_any_document_gives_a_request_or_a_documented_refusal(doc, fmt):
    if fmt == "json":
        payload = json.dumps(doc).encode()  # NaN and Infinity included: json.dumps writes them
    else:
        try:
            payload = cbor.dumps(doc)
        except (ValueError, UnicodeEncodeError):  # beyond 64-bit integers, lone surrogates: not CBOR
            assume(False)
    _only_documented(payload, rq.Topic("a", fmt), None)


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_any_topic_gives_a_request_topic_or_none(tail):
    t = rq.parse_topic(f"$aws/commands/things/{THING}/executions/{tail}", THING)
    assert t is None or (rq.EXECUTION_ID_RE.fullmatch(t.execution_id) and t.fmt in (None, "json", "cbor"))
