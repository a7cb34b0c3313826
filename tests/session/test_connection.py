"""mTLS to a real mosquitto with the device key on SoftHSM and on swtpm."""

from __future__ import annotations

import datetime as dt
import re
import signal
import time

import pytest

from agent.identity.current import Identity
from agent.runtime.daemon import settings_for
from agent.runtime.features import load
from agent.session.connection import Connection
from localcloud.broker import Broker
from localcloud.observer import Observer


@pytest.fixture
def observer(bench):
    o = Observer(bench.broker).start(["dt/#", "$aws/things/#"])
    yield o
    o.stop()


def _wait_settled(broker, client: str, topics: tuple[str, ...], timeout: float = 30.0) -> None:
    """Until the client has published to each topic and every PUBLISH of its has been acknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = broker.log_text()
        published = re.findall(rf"Received PUBLISH from {client} \(.*", log)
        acked = re.findall(rf"Sending PUBACK to {client} ", log)
        if all(any(t in line for line in published) for t in topics) and len(acked) >= len(published):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{client} never settled:\n{broker.log_text()[-3000:]}")


def test_agent_connects_with_thing_name_as_client_id(bench, token, agents):
    dev = bench.enroll(token, "gw-mtls-1")
    a = agents(dev)
    a.wait_for(r"clock trusted: 127\.0\.0\.1:\d+ agrees")
    a.wait_for(r"connected to localhost:\d+ as gw-mtls-1")
    bench.broker.wait_log(r"New client connected from 127\.0\.0\.1:\d+ as gw-mtls-1 \(p5, c1, k60, u'gw-mtls-1'\)")
    # The session settled first (the features' first requests answered): mosquitto 2.0.11 reports a client
    # that closes while it still has an acknowledgement to send as "out of memory" or a protocol error
    # (eclipse-mosquitto/mosquitto#3253, fixed in 2.0.22) instead of the DISCONNECT it was sent.
    _wait_settled(bench.broker, "gw-mtls-1", ("jobs/start-next'", "shadow/name/inventory/update'"))
    assert a.stop() == 0
    assert ("gw-mtls-1", "gw-mtls-1") in bench.broker.connected_clients()
    # A clean DISCONNECT, not a dropped socket ("closed its connection"). The agent's shutdown unsubscribes
    # its request-response topics; when the DISCONNECT follows an UNSUBACK still on its way, mosquitto 2.0.11
    # logs the DISCONNECT as "Protocol error" or "out of memory" (#3253): that form counts, with the agent's
    # own word that it sent a DISCONNECT.
    try:
        line = bench.broker.wait_log(r"Client gw-mtls-1 (disconnected|closed its connection)[^\n]*\n").group(0).strip()
    except TimeoutError:
        raise AssertionError(a.text()[-4000:]) from None
    clean = re.search(r"disconnected\.$", line) or (
        re.search(r"disconnected.*(Protocol error|out of memory)", line) and "disconnected (stop requested)" in a.text()
    )
    assert clean, f"{line}\n{a.text()[-3000:]}"
    assert token.pin not in a.text()


def test_publish_own_topic_delivered_other_device_topic_refused(bench, token, observer, monkeypatch):
    dev = bench.enroll(token, "gw-pub-1")
    for k, v in token.env.items():
        monkeypatch.setenv(k, v)
    cfg = load(dev.config_path)
    conn = Connection(settings_for(cfg, Identity("gw-pub-1", dev.cert_path, "device"), token.pin))
    conn.start()
    try:
        assert conn.wait_connected(15), conn.events
        assert conn.publish("dt/gw-pub-1/hello", b'{"n":1}') == 0
        assert observer.expect("dt/gw-pub-1/hello") == b'{"n":1}'
        # Another device's topics: the broker answers PUBACK "not authorized" (135) and drops it.
        assert conn.publish("dt/gw-other/hello", b"spoof") == 135
        assert conn.publish("$aws/things/gw-other/shadow/update", b"{}") == 135
        assert conn.publish("dt/gw-pub-1/after", b"x") == 0
        observer.expect("dt/gw-pub-1/after")
        assert not [m for m in observer.drain() if "gw-other" in m[0]]
    finally:
        conn.stop()
    assert [e.kind for e in conn.events][-1] == "stopped"


def _bad_servers(bench, tmp_path) -> dict:
    from localcloud.pki import CertificateAuthority

    now = dt.datetime.now(dt.UTC)
    rogue = CertificateAuthority(tmp_path / "rogue", "rogue CA")
    return {
        # mosquitto still verifies our client certificates with the real CA: only the server side changes.
        "other-ca": rogue.issue_server("rogue-server", ["localhost", "127.0.0.1"]),
        "wrong-host": bench.ca.issue_server("other-host", ["iot.example.com"]),
        "expired": bench.ca.issue_server(
            "expired", ["localhost", "127.0.0.1"], days=1, not_before=now - dt.timedelta(days=3)
        ),
        "not-yet-valid": bench.ca.issue_server(
            "future", ["localhost", "127.0.0.1"], days=30, not_before=now + dt.timedelta(days=2)
        ),
    }


def test_bad_server_certificates_are_refused_without_fallback(bench, softhsm, agents, tmp_path):
    """Four brokers with bad server certificates, one agent each, run side by side.

    s2n delays closing a failed handshake by 10-30 s (blinding against timing attacks), so the
    failures are awaited in parallel rather than one after another.
    """
    brokers, runs = {}, {}
    start = time.monotonic()
    for case, server in _bad_servers(bench, tmp_path).items():
        b = Broker(tmp_path / f"broker-{case}", bench.ca, server).start()
        brokers[case] = b
        dev = bench.enroll(softhsm, f"gw-{case}", key_label=f"key-{case}")
        config = dev.config_path.read_text().replace(f"port = {bench.broker.port}", f"port = {b.port}")
        dev.config_path.write_text(config)
        runs[case] = agents(dev)
    try:
        for _case, a in runs.items():
            a.wait_for(r"connection to localhost:\d+ failed: AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE", timeout=60)
        t0 = time.monotonic()
        for a in runs.values():  # all at once: each stop may wait out a retry's blinding delay
            a.proc.send_signal(signal.SIGTERM)
        for case, a in runs.items():
            assert "connected to localhost" not in a.text(), case
            assert not brokers[case].connected_clients(), case
            # Already told to stop: a second SIGTERM could land while the interpreter finalises (when
            # CPython has put the default action back) and kill it with -15, so only wait.
            assert a.wait_exit(60) == 0
        print(f"failures seen after {t0 - start:.1f} s, stopped after {time.monotonic() - t0:.1f} s")
    finally:
        for b in brokers.values():
            b.stop()


def test_the_same_certificate_chain_is_accepted(bench, softhsm, agents, tmp_path):
    """Control for the test above: a correct server certificate connects (so the refusals are real)."""
    b = Broker(tmp_path / "broker-good", bench.ca, bench.ca.issue_server("fresh", ["localhost"])).start()
    try:
        dev = bench.enroll(softhsm, "gw-control")
        dev.config_path.write_text(
            dev.config_path.read_text().replace(f"port = {bench.broker.port}", f"port = {b.port}")
        )
        agents(dev).wait_for(r"connected to localhost:\d+ as gw-control")
        assert ("gw-control", "gw-control") in b.connected_clients()
    finally:
        b.stop()


class TlsOnlyServer:
    """A bare TLS server (no MQTT) with a chosen maximum protocol version; records each handshake."""

    def __init__(self, issued, ca_path, max_version):
        import socket
        import ssl
        import threading

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = max_version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS < 1.2 at its default level
        ctx.load_cert_chain(issued.cert_path, issued.key_path)
        ctx.load_verify_locations(ca_path)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx, self.results = ctx, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self):
        import ssl

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.results.append(tls.version())
            except (ssl.SSLError, OSError) as e:
                self.results.append(f"failed: {e.__class__.__name__}")

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("max_version, refused", [("TLSv1_1", True), ("TLSv1_2", False)])
def test_tls_below_1_2_is_refused(bench, softhsm, agents, max_version, refused):
    """Against a server capped at TLS 1.1 the handshake fails; the same server capped at 1.2 completes it."""
    import ssl

    srv = TlsOnlyServer(bench.broker.server, bench.ca.cert_path, getattr(ssl.TLSVersion, max_version))
    try:
        dev = bench.enroll(softhsm, "gw-tls")
        dev.config_path.write_text(
            dev.config_path.read_text().replace(f"port = {bench.broker.port}", f"port = {srv.port}")
        )
        a = agents(dev)
        a.wait_for(r"connection to localhost:\d+ failed", timeout=60)
        if refused:
            assert not any(r.startswith("TLSv") for r in srv.results), srv.results
            assert "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE" in a.text()
        else:
            assert "TLSv1.2" in srv.results, srv.results  # handshake done; no MQTT server behind it
    finally:
        srv.close()


def test_wrong_pin_or_key_label_is_one_clear_line_and_exit_2(bench, softhsm):
    dev = bench.enroll(softhsm, "gw-creds")
    (softhsm.directory / "pkcs11-pin").write_text("987654")
    r = dev.cli("run", timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "iot-agent: token 'iot-agent' refused the PIN (a TPM locks out after repeated failures); fix the PIN file "
        "(AWS_ERROR_PKCS11_CKR_PIN_INCORRECT)"
    )
    assert "987654" not in r.stderr + r.stdout
    softhsm.pin_file()  # the right PIN again
    dev.config_path.write_text(dev.config_path.read_text().replace('key_label = "device"', 'key_label = "nokey"'))
    r = dev.cli("run", timeout=60)
    assert r.returncode == 2
    assert "no single private key labelled 'nokey' on token 'iot-agent'" in r.stderr.strip().splitlines()[-1]
    assert not bench.broker.connected_clients()
