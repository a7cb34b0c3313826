"""Hostile job documents and job text (issue 17): none may block the queue, forge a log line, or kill the
jobs loop.

The real agent (SoftHSM key, provisioned by claim) takes jobs from the local cloud, which hands documents
out byte for byte as AWS stores them (`Jobs.create_raw`): deep nesting, a 5,000-digit integer, NaN, a lone
surrogate escape, a number beyond a double's range, bytes that are not UTF-8, and a document over AWS's
32 KB. Each is REJECTED by its job id with the reason, and a signed update queued behind them is
installed. Then the pure parts: the raw scanner and the log formatter, with properties over arbitrary
input, and the notify-next subscription's failures against a real broker.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from types import SimpleNamespace

import pytest
from cloudkit import session_conn, wait_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from otakit import HEALTH, World, our_doc, release

from agent.jobs.engine import JobsEngine, Outcome
from localcloud import pace

# The limits the agent holds documents to (agent.jobs; imported where used, so that the tests of the agent
# as a whole also run, and fail, on a tree without them).
MAX_DOCUMENT_BYTES = 32 * 1024  # AWS's limit for a job document
MAX_DEPTH = 32
OTA = b'"operation":"ota-update"'  # an operation the agent performs: a hostile document must not reach it

HOSTILE: list[tuple[str, bytes, str]] = [  # job id, raw document, what the reason must say
    ("deep", b"{" + OTA + b',"d":' + b"[" * 5000 + b"]" * 5000 + b"}", f"deeper than {MAX_DEPTH} levels"),
    ("bigint", b"{" + OTA + b',"n":' + b"7" * 5000 + b"}", "5000 digits"),
    ("nan", b"{" + OTA + b',"n":NaN}', "NaN"),
    ("surrogate", b"{" + OTA + b',"note":"x\\ud800y"}', "surrogate"),
    ("infinity", b"{" + OTA + b',"n":1e400}', "beyond a double's range"),
    ("not-utf8", b"{" + OTA + b',"note":"\xff\xfe"}', "not UTF-8"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(
        tmp_path_factory.mktemp("hostile"),
        "HOST1",
        {"app": {"directory": "app", "health_command": HEALTH, "health_timeout_s": 10.0}},
    )
    yield w
    w.close()


@pytest.fixture(scope="module")
def agent(world):
    from conftest import AgentProcess

    a = AgentProcess(world.dev).start()
    a.wait_for(rf"connected to localhost:\d+ as {world.thing}", timeout=90)
    world.agent = a
    yield a
    assert a.stop() == 0


def _wait(world, job_id: str, status: str, timeout: float = 60) -> dict:
    try:
        return wait_status(world.jobs, job_id, world.thing, status, timeout=timeout)
    except AssertionError:
        print(world.agent.text()[-6000:])
        ex = world.jobs.execution(job_id, world.thing, with_document=False)
        raise AssertionError(f"{job_id} is not {status} after {timeout:g} s: {ex}") from None


# -- the real agent ----------------------------------------------------------------------------------
def test_documents_the_sdk_cannot_read_are_rejected_by_id_and_the_queue_moves_on(world, agent):
    started = time.monotonic()
    for job_id, body, _ in HOSTILE:
        world.jobs.create_raw(job_id, world.thing, body)
    # Plain JSON the SDK reads, but over AWS's 32 KB for a document.
    world.jobs.create("oversized", world.thing, {"operation": "ota-update", "pad": "x" * (MAX_DOCUMENT_BYTES + 100)})
    data = release("1.1.0")
    world.jobs.create(
        "update", world.thing, our_doc("app", "1.1.0", "app.tar", data, world.signer.sign(data), url=world.https(data))
    )
    for job_id, _, says in HOSTILE + [("oversized", b"", f"AWS's limit is {MAX_DOCUMENT_BYTES}")]:
        ex = _wait(world, job_id, "REJECTED")
        reason = ex["statusDetails"].get("reason", "")
        assert "not plain JSON" in reason and says in reason, (job_id, reason)
        agent.wait_for(rf"job {job_id}: REJECTED, ", timeout=10)
    ex = _wait(world, "update", "SUCCEEDED", timeout=90)  # the job behind them runs
    print("\n".join(line for _, line in agent.lines if re.search(r"job \S+: REJECTED|jobs:|update", line)))
    assert ex["statusDetails"]["version"] == "1.1.0"
    assert (world.app / "current" / "app.txt").read_text() == "app 1.1.0\n"
    # No request timed out on the way: the raw copy of each answer named its job at once.
    assert time.monotonic() - started < 60
    assert "REQUEST_RESPONSE_TIMEOUT" not in agent.text()


def test_job_text_cannot_forge_a_log_line(world, agent):
    forged = "2026-01-01T00:00:00.000 INFO agent: forged"
    cases = {"forge-lf": f"x\n{forged} lf", "forge-cr": f"x\r{forged} cr", "forge-ls": f"x\u2028{forged} ls\x1b[2J"}
    for job_id, op in cases.items():
        world.jobs.create(job_id, world.thing, {"operation": op})
    for job_id in cases:
        ex = _wait(world, job_id, "REJECTED")
        assert ex["statusDetails"]["reason"].startswith("unsupported operation")
    agent.wait_for(r"job forge-ls: REJECTED", timeout=10)
    lines = [line for _, line in agent.lines]
    assert not [line for line in lines if line.startswith(forged)], "a job's text started a log line"
    assert any("job forge-lf started (x\\n" + forged + " lf)" in line for line in lines)
    assert any("job forge-cr started (x\\r" + forged + " cr)" in line for line in lines)
    assert any("job forge-ls started (x\\u2028" + forged + " ls\\x1b[2J)" in line for line in lines)
    assert not [line for line in lines if "\x1b" in line or "\u2028" in line]


# -- the notify-next subscription's failures, against a real broker ------------------------------------
@pytest.fixture
def device(tmp_path):
    from cloudkit import provision_device

    from localcloud.cloud import LocalCloud
    from localcloud.jobs import Jobs

    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-H1"])
    info = c.up()
    dev, _ = provision_device(c, info, tmp_path, "SN-H1")
    yield SimpleNamespace(cloud=c, dev=dev, jobs=Jobs(c.registry.db, c.registry.lock), thing="gw-SN-H1")
    dev.stop()
    c.down()


def _engine(dev, thing: str, state: dict | None = None) -> JobsEngine:
    state = {} if state is None else state
    conn = session_conn(dev)
    return JobsEngine(
        thing,
        conn,
        load_state=lambda: dict(state),
        save_state=lambda d: (state.clear(), state.update(d)),
        handlers={"ok": lambda job_id, doc, progress: Outcome("SUCCEEDED", {"result": "done"})},
    )


@pytest.fixture
def unraisable():
    """Exceptions raised in CRT callbacks (they cannot propagate: Python reports them as unraisable)."""
    seen: list = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    yield seen
    sys.unraisablehook = old


def _logged(caplog, pattern: str, timeout: float) -> list[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [r.getMessage() for r in list(caplog.records) if rx.search(r.getMessage())]
        if hits:
            return hits
        time.sleep(0.1)
    raise AssertionError(f"never logged {pattern!r}: {[r.getMessage() for r in caplog.records][-20:]}")


def test_a_lost_subscription_is_logged_not_raised(device, caplog, unraisable):
    caplog.set_level(logging.DEBUG, logger="agent.jobs")
    eng = _engine(device.dev, device.thing)
    eng.start()
    eng.on_connected()
    try:
        _logged(caplog, r"notify-next subscription established", 20)
        device.cloud.down()  # the broker goes away: the CRT reports the subscription lost
        device.cloud.up()
        assert device.dev.connected.wait(30)
        _logged(caplog, r"notify-next subscription lost", 30)
        device.jobs.create("after", device.thing, {"operation": "ok"})
        wait_status(device.jobs, "after", device.thing, "SUCCEEDED")
        assert eng._thread.is_alive()
        assert not unraisable, unraisable
    finally:
        eng.stop()


def test_a_halted_subscription_is_opened_again_with_a_bounded_backoff(device, caplog, unraisable):
    import awscrt.exceptions
    import awscrt.mqtt_request_response as rr

    caplog.set_level(logging.DEBUG, logger="agent.jobs")
    eng = _engine(device.dev, device.thing)
    eng.start()
    eng.on_connected()
    try:
        _logged(caplog, r"notify-next subscription established", 20)
        first = eng._stream
        # What the CRT hands the listener when it gives up on a subscription (a refused SUBACK): the type
        # as a plain int, the error as an AwsCrtError. The listener runs on the CRT's thread: it must not raise.
        ev = rr.SubscriptionStatusEvent(2)
        ev.error = awscrt.exceptions.from_code(5170)  # AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE
        eng._on_stream_status(ev)
        _logged(
            caplog,
            r"notify-next subscription halted \(AWS_ERROR_MQTT_REQUEST_RESPONSE_SUBSCRIBE_FAILURE\); "
            r"subscribing again in 1 s",
            5,
        )
        deadline = time.monotonic() + 15
        while (eng._stream is None or eng._stream is first) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng._stream is not None and eng._stream is not first  # subscribed again
        assert len(_logged(caplog, r"notify-next subscription established", 10)) >= 2
        # Halted again and again: the delay doubles up to its bound, never a tight loop.
        delays = []
        for _ in range(12):
            eng._on_stream_status(ev)
            delays.append(round(eng._stream_retry_at - time.monotonic()))
        assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
        assert eng._thread.is_alive() and not unraisable
    finally:
        eng.stop()


def test_a_stream_that_cannot_be_opened_is_retried_with_backoff(device, caplog):
    caplog.set_level(logging.DEBUG, logger="agent.jobs")
    eng = _engine(device.dev, "gw+bad")  # the CRT refuses this topic filter: the stream cannot be created
    eng.start()
    eng.on_connected()
    try:
        hits = _logged(caplog, r"notify-next subscription cannot be opened .*; subscribing again in 2 s", 20)
        assert "subscribing again in 1 s" in " ".join(r.getMessage() for r in caplog.records)
        assert hits and eng._thread.is_alive()
    finally:
        eng.stop()


def test_an_update_the_cloud_refuses_as_invalid_does_not_hold_up_the_queue(device, caplog):
    caplog.set_level(logging.INFO, logger="agent.jobs")
    device.jobs.create("first", device.thing, {"operation": "ok"})
    device.jobs.create("second", device.thing, {"operation": "ok"})
    # An update the cloud will never take (an empty statusDetails name: InvalidRequest), persisted by an
    # earlier run: resent a bounded number of times, with backoff, then dropped.
    state = {"outbox": [{"job_id": "first", "status": "IN_PROGRESS", "details": {"": "x"}}]}
    eng = _engine(device.dev, device.thing, state)
    eng.start()
    eng.on_connected()
    try:
        wait_status(device.jobs, "second", device.thing, "SUCCEEDED", timeout=40)
        assert device.jobs.execution("first", device.thing)["status"] == "SUCCEEDED"
        _logged(caplog, r"job first: IN_PROGRESS refused 3 times \(.*InvalidRequest.*\); dropped", 1)
        # the cloud records SUCCEEDED before its answer reaches the agent, which then empties the outbox
        deadline = pace.deadline(10)
        while state["outbox"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["outbox"] == []
    finally:
        eng.stop()


# -- the scanner (pure) ---------------------------------------------------------------------------------
def _message(doc: bytes, job_id: bytes = b"j-1", token: bytes = b"tok", first: bool = True) -> bytes:
    ex = (
        b'"jobId":"' + job_id + b'","jobDocument":' + doc
        if first
        else b'"jobDocument":' + doc + b',"jobId":"' + job_id + b'"'
    )
    return b'{"clientToken":"' + token + b'","execution":{"thingName":"t",' + ex + b',"versionNumber":2}}'


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("job_id, doc, says", HOSTILE)
def test_scanner_names_the_job_and_the_problem(first, job_id, doc, says):
    from agent.jobs.engine import scan_execution

    r = scan_execution(_message(doc, job_id.encode(), first=first))
    assert r.job_id == job_id and r.client_token == "tok" and says in r.problem, r


def test_scanner_on_plain_documents_and_edge_cases():
    from agent.jobs.engine import RawExecution, scan_execution

    assert scan_execution(
        _message(b'{"operation":"x","a":[1,2.5,-3e2,true,null,"\\ud83d\\ude00\\n"]}')
    ) == RawExecution("j-1", "tok", None)
    assert scan_execution(b'{"timestamp":1,"clientToken":"tok"}') == RawExecution(None, "tok", None)  # no job
    deep_ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert scan_execution(_message(deep_ok)).problem is None
    assert "deeper" in scan_execution(_message(b"[" + deep_ok + b"]")).problem
    assert "32768" in scan_execution(_message(b'"' + b"x" * MAX_DOCUMENT_BYTES + b'"')).problem
    assert scan_execution(_message(b'"' + b"x" * (MAX_DOCUMENT_BYTES - 2) + b'"')).problem is None
    assert scan_execution(_message(b"18446744073709551615")).problem is None  # 64 bits
    assert "digits" in scan_execution(_message(b"18446744073709551616")).problem
    # Escaped member names are names: "job\u0049d" is jobId.
    assert scan_execution(b'{"execution":{"job\\u0049d":"x1","jobDocument":{}}}').job_id == "x1"
    # A jobId not in AWS's form is never returned (it would become part of a topic).
    for bad in (b"a/b", b"#", b"a+b", b"x" * 65, b"", b"a\\nb"):
        assert scan_execution(_message(b"{}", bad)).job_id is None
    # A jobId inside the document is not the execution's.
    assert scan_execution(b'{"execution":{"jobDocument":{"execution":{"jobId":"evil"}}}}').job_id is None
    # A syntax error stops the scan: what came before it is kept.
    r = scan_execution(b'{"execution":{"jobId":"early","jobDocument":{"a":}}}')
    assert r.job_id == "early" and "not JSON" in r.problem
    r = scan_execution(b'{"execution":{"jobId":"t1","jobDocument":{}}')
    assert r.job_id == "t1" and "ends early" in r.problem
    with pytest.raises(TypeError):
        scan_execution("not bytes")  # type: ignore[arg-type]


def test_scanner_bounds_its_work():
    from agent.jobs.engine import scan_execution

    for body in (
        b"[" * 200_000,
        b'{"a":' * 60_000,
        b'"' + b"\\n" * 100_000 + b'"',
        b"1," * 100_000,
        _message(b"[" * 60_000 + b"]" * 60_000),
        _message(b"[" + b"1," * 60_000 + b"1]"),
    ):
        t = time.perf_counter()
        r = scan_execution(body)
        assert time.perf_counter() - t < 2.0 and r.problem
    assert "larger than" in scan_execution(b" " * (200 * 1024)).problem


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.text(alphabet='{}[]":,\\u0123456789abcdefnrtlsNIy- \n\x00\xff', max_size=200).map(str.encode),
        st.builds(lambda b: _message(b), st.binary(max_size=200)),
    )
)
def test_scanner_property_any_bytes_give_a_result(data):
    from agent.jobs.engine import RawExecution, scan_execution

    t = time.perf_counter()
    r = scan_execution(data)
    assert time.perf_counter() - t < 1.0
    assert isinstance(r, RawExecution)
    assert r.job_id is None or re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", r.job_id)
    assert r.problem is None or isinstance(r.problem, str)


@settings(max_examples=1000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(JSONISH)
def test_scanner_and_document_check_agree_on_what_json_builds(doc):
    import json

    from agent.jobs.engine import document_problem, scan_execution

    try:
        body = json.dumps(doc).encode()  # NaN/Infinity and lone surrogates come out as Python writes them
    except ValueError:
        return
    raw = scan_execution(_message(body))
    assert raw.job_id == "j-1"
    assert (raw.problem is None) == (document_problem(doc) is None), (raw.problem, document_problem(doc))


def test_document_check_is_iterative_and_bounded():
    from agent.jobs import engine as jobs
    from agent.jobs.engine import document_problem

    assert (jobs.MAX_DEPTH, jobs.MAX_DOCUMENT_BYTES) == (MAX_DEPTH, MAX_DOCUMENT_BYTES)  # this file's copies
    doc: list = []
    for _ in range(50_000):  # far past the recursion limit
        doc = [doc]
    assert "deeper" in document_problem(doc)
    assert "values" in document_problem([0] * (MAX_DOCUMENT_BYTES + 1))
    assert document_problem({"operation": "x", "n": 2**64 - 1, "f": 1.5, "s": "\U0001f600"}) is None
    assert "64 bits" in document_problem({"n": -(2**64)})
    assert "NaN" in document_problem({"n": float("nan")}) and "NaN" in document_problem([float("-inf")])
    assert "surrogate" in document_problem({"\udc00": 1})


# -- the log formatter (pure) ------------------------------------------------------------------------------
def _format(msg, *args, exc_info=None) -> str:
    from agent.base.logfmt import SafeFormatter

    f = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    return f.format(logging.LogRecord("agent.jobs", logging.INFO, __file__, 1, msg, args, exc_info))


def test_formatter_escapes_controls_and_bounds_the_message():
    assert (
        _format("job %s started (%s)", "j", "x\n2026 INFO agent: forged\r\u2028\u2029\x85\x1b\x00\t\ud800")
        == "INFO agent.jobs: job j started (x\\n2026 INFO agent: forged\\r\\u2028\\u2029\\x85\\x1b\\x00\\t\\ud800)"
    )
    assert _format("plain %d", 3) == "INFO agent.jobs: plain 3"
    long = _format("%s", "y" * 10_000)
    assert len(long) < 4200 and long.endswith("... [5904 more characters]")
    # Escaping cannot push a message past the bound.
    assert len(_format("%s", "\n" * 4000)) < 4200
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        text = _format("failed: %s", "a\nb", exc_info=sys.exc_info())
    first, rest = text.split("\n", 1)
    assert first == "INFO agent.jobs: failed: a\\nb" and rest.startswith("Traceback") and "second line" in rest


@pytest.mark.parametrize("entry", ["cli", "launcher", "privileged"])
def test_every_entry_point_logs_one_line_per_record(entry):
    """iot-agent, iot-agent-launch and iot-agent-install set up their logging with the safe formatter."""
    import subprocess
    from pathlib import Path

    setup = "m._setup_logging('info')" if entry == "cli" else "m.main(['--config', '/nonexistent/config.toml'])"
    module = {"cli": "agent.cli", "launcher": "agent.launch", "privileged": "agent.update.privileged"}[entry]
    code = (
        f"import logging\nimport {module} as m\ntry:\n    {setup}\nexcept BaseException:\n    pass\n"
        "logging.getLogger('agent.jobs').warning('job %s started (%s)', 'j1', "
        "'x\\n2026-01-01T00:00:00.000 INFO agent: forged\\r\\u2028')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(line for line in r.stderr.splitlines() if "agent.jobs" in line)
    assert line.endswith("job j1 started (x\\n2026-01-01T00:00:00.000 INFO agent: forged\\r\\u2028)"), r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith("2026-01-01")], r.stderr


def test_formatter_leaves_the_record_alone_for_other_handlers():
    from agent.base.logfmt import SafeFormatter

    rec = logging.LogRecord("agent", logging.INFO, __file__, 1, "a %s", ("\n",), None)
    SafeFormatter("%(message)s").format(rec)
    assert rec.msg == "a %s" and rec.args == ("\n",)


@settings(max_examples=1500, deadline=1000)
@given(st.text(max_size=6000), st.text(max_size=50))
def test_formatter_property_one_bounded_line(msg, arg):
    out = _format("%s|" + msg.replace("%", "%%"), arg)
    assert "\n" not in out and "\r" not in out
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", out)
    assert len(out) <= len("INFO agent.jobs: ") + 4096 + 60
    out.encode("utf-8")  # a UTF-8 stream can write it


@settings(max_examples=1000, deadline=1000)
@given(st.text(max_size=300))
def test_escape_property_keeps_safe_text_and_is_bounded(text):
    from agent.base.logfmt import escape

    out = escape(text, 100)
    assert len(out) <= 100 + 60
    if not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", text) and len(text) <= 100:
        assert out == text


def test_engine_never_dies_on_a_raw_message():
    eng = JobsEngine("gw-1", conn=None, load_state=dict, save_state=lambda d: None)
    for topic in (
        "$aws/things/gw-1/jobs/notify-next",
        "$aws/things/gw-1/jobs/start-next/accepted",
        "$aws/things/gw-1/jobs/notify",
        "$aws/things/gw-2/jobs/notify-next",
        "other",
    ):
        for payload in (b"", b"\xff" * 10, b"[" * 300_000, _message(b"NaN", b"bad-1")):
            eng.on_raw_message(topic, payload)
    assert len(eng._raw) <= 8 and all(len(p) <= 128 * 1024 + 1 for _, p in eng._raw)
    results = eng._take_raw()
    assert [k for k, _ in results] == ["notify-next"] * 4 + ["start-next/accepted"] * 4
    assert eng._next_bad[0] == "bad-1" and "NaN" in eng._next_bad[1]
    assert "NaN" in eng._bad_docs["bad-1"]
