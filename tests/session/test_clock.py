"""The clock gate against real NTP servers on loopback (chrony and a scriptable responder)."""

from __future__ import annotations

import threading
import time

import pytest

from agent.base.config import ClockConfig
from agent.base.errors import ClockError
from agent.session.clock import FLOOR, ClockGate, NtpAnswer, judge_answer, judge_floor, query_ntp
from localcloud.ntp import Chrony, NtpResponder


def cfg(servers, **kw) -> ClockConfig:
    base = dict(ntp_servers=servers, max_skew_s=5.0, query_timeout_s=0.3, retry_min_s=0.05, retry_max_s=0.3)
    base.update(kw)
    return ClockConfig(**base)


@pytest.fixture
def responder():
    r = NtpResponder()
    yield r
    r.close()


def test_judging_is_pure():
    good = NtpAnswer("s", 0.2, 2, 0, True)
    assert judge_answer(good, 5) is None
    assert "behind" in judge_answer(NtpAnswer("s", 60, 2, 0, True), 5)
    assert "ahead of" in judge_answer(NtpAnswer("s", -60, 2, 0, True), 5)
    assert "leap indicator 3" in judge_answer(NtpAnswer("s", 0, 2, 3, True), 5)
    assert "stratum 0" in judge_answer(NtpAnswer("s", 0, 0, 0, True), 5)
    assert "origin timestamp" in judge_answer(NtpAnswer("s", 0, 2, 0, False), 5)
    assert judge_floor(FLOOR - 1) and judge_floor(FLOOR + 1) is None


def test_chrony_on_loopback_opens_the_gate(tmp_path):
    c = Chrony(tmp_path / "chrony").start()
    try:
        a = query_ntp(c.server, 1.0)
        assert abs(a.offset) < 0.5 and a.origin_matches and a.leap != 3
        why = ClockGate(cfg([c.server])).wait()
        assert c.server in why
    finally:
        c.stop()


def _gate_in_thread(gate: ClockGate):
    result: dict = {}
    stop = threading.Event()

    def go():
        try:
            result["why"] = gate.wait(stop)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, result, stop


def test_gate_holds_while_silent_then_skewed_and_opens_on_a_good_answer(responder):
    responder.set(mode="silent")
    waits: list[str] = []
    gate = ClockGate(cfg([responder.server]), on_wait=lambda why, d: waits.append(why))
    t, result, stop = _gate_in_thread(gate)
    try:
        time.sleep(1.5)
        assert t.is_alive() and not result
        assert any("no usable answer" in w for w in waits)
        n_silent = responder.requests
        assert 2 <= n_silent < 40  # retried with backoff, not in a tight loop
        responder.set(mode="good", skew_s=3600)
        time.sleep(1.5)
        assert t.is_alive() and not result
        assert any("3600.0 s behind" in w for w in waits)
        responder.set(skew_s=-0.5)
        t.join(5)
        assert not t.is_alive()
        assert "agrees with the system clock" in result["why"]
    finally:
        stop.set()
        t.join(2)


def test_unsynchronised_server_is_not_trusted(responder):
    responder.set(leap=3)
    with pytest.raises(ClockError, match="leap indicator 3"):
        ClockGate(cfg([responder.server], max_wait_s=0.8)).wait()
    responder.set(leap=0, stratum=0)
    with pytest.raises(ClockError, match="kiss-of-death"):
        ClockGate(cfg([responder.server], max_wait_s=0.8)).wait()


def test_one_good_server_among_bad_ones_is_enough(responder, tmp_path):
    silent = NtpResponder(mode="silent")
    skewed = NtpResponder(skew_s=-120)
    try:
        why = ClockGate(cfg([silent.server, skewed.server, responder.server])).wait()
        assert responder.server in why
    finally:
        silent.close()
        skewed.close()


def test_clock_before_floor_blocks_even_if_a_server_agrees(responder):
    gate = ClockGate(cfg([responder.server], max_wait_s=0.6), now=lambda: FLOOR - 86400 * 400)
    with pytest.raises(ClockError, match="before this release's floor date"):
        gate.wait()


def test_max_wait_gives_up_with_the_reason(responder):
    responder.set(mode="silent")
    t0 = time.monotonic()
    with pytest.raises(ClockError, match="clock not trusted after 1 s: .*no usable answer"):
        ClockGate(cfg([responder.server], max_wait_s=1.0)).wait()
    assert time.monotonic() - t0 < 5


def test_system_source_trusts_the_host_daemon_only_once_synchronised():
    state = {"synced": False}
    gate = ClockGate(cfg([], source="system"), synchronised=lambda: state["synced"])
    t, result, stop = _gate_in_thread(gate)
    try:
        time.sleep(0.8)
        assert t.is_alive()
        state["synced"] = True
        t.join(5)
        assert "synchronised by the host NTP daemon" in result["why"]
    finally:
        stop.set()


def test_kernel_sync_query_runs_unprivileged():
    from agent.session.clock import kernel_clock_synchronised

    assert kernel_clock_synchronised() in (True, False)


def test_stop_interrupts_the_wait(responder):
    responder.set(mode="silent")
    t, result, stop = _gate_in_thread(ClockGate(cfg([responder.server], retry_min_s=5, retry_max_s=5)))
    time.sleep(0.5)
    stop.set()
    t.join(3)
    assert isinstance(result.get("error"), ClockError)
