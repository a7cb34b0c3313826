"""The whole agent holds its TLS connection back until NTP vouches for the clock."""

from __future__ import annotations

import time

from localcloud.ntp import NtpResponder


def test_no_connection_until_ntp_answers_well(bench, softhsm, agents):
    ntp = NtpResponder(mode="silent")
    try:
        dev = bench.enroll(softhsm, "gw-clock", ntp_servers=[ntp.server])
        a = agents(dev)
        a.wait_for(r"waiting for a trustworthy clock: .*no usable answer")
        time.sleep(1.0)
        ntp.set(mode="good", skew_s=-7200)
        a.wait_for(r"waiting for a trustworthy clock: system clock is 7200\.0 s ahead of")
        time.sleep(1.0)
        assert "connecting to" not in a.text()
        assert not bench.broker.connected_clients()  # not even a TLS attempt reached the broker
        # Not even a TLS attempt reached the broker. Another test's port probe (a TCP connect on a port
        # number it expected to be its own, then close) may show up as a connection that sent no TLS
        # byte at all; the agent's attempt would send a ClientHello.
        log = bench.broker.log_text()
        assert log.count("New connection from") <= log.count("unexpected eof while reading"), log[-2000:]
        ntp.set(skew_s=0.3)
        a.wait_for(r"clock trusted: .* agrees with the system clock", timeout=10)
        a.wait_for(r"connected to localhost:\d+ as gw-clock")
        assert ("gw-clock", "gw-clock") in bench.broker.connected_clients()
    finally:
        ntp.close()


def test_sigterm_while_waiting_for_the_clock_is_a_clean_stop(bench, softhsm, agents):
    ntp = NtpResponder(mode="silent")
    try:
        dev = bench.enroll(softhsm, "gw-clock-stop", ntp_servers=[ntp.server])
        a = agents(dev)
        a.wait_for(r"waiting for a trustworthy clock")
        assert a.stop(timeout=10) == 0
        assert "stopped" in a.text() and "connecting to" not in a.text()
    finally:
        ntp.close()
