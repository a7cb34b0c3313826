"""Signed OTA updates end to end: the real agent (SoftHSM key, provisioned by claim) against the local
cloud's jobs, HTTPS artifact server and MQTT streams.

One agent runs for the whole module and takes the jobs as they are queued: the happy paths over
HTTPS and streams for the signed-manifest schema and the legacy kinds (schema 1 and afr_ota over a
tar whose VERSION and TARGET bind it), then every refusal, each followed by a check that nothing was
installed and nothing was left behind.
"""

from __future__ import annotations

import http.server
import os
import ssl
import threading

import pytest
from otakit import AFR_PATH, HEALTH, CodeSigner, World, afr_doc, make_tar, our_doc, release, signed_doc

from agent.update.install import slot
from agent.update.manifest import make as make_manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(
        tmp_path_factory.mktemp("ota"),
        "OTA1",
        {
            "app": {
                "directory": "app",
                "health_command": HEALTH,
                "health_timeout_s": 10.0,
                "afr_ota_filepath": AFR_PATH,
            },
            "blob": {"directory": "blob", "unpack": False},
        },
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


def test_happy_paths_https_and_streams_for_every_document_kind(world, agent):
    s = world.signer
    cases = [
        ("signed-https", "1.0.1", lambda d: world.signed("app", "1.0.1", "app.tar", d)),
        ("signed-stream", "1.0.2", lambda d: world.signed("app", "1.0.2", "app.tar", d, stream=True)),
        ("our-https", "1.1.0", lambda d: our_doc("app", "1.1.0", "app.tar", d, s.sign(d), url=world.https(d))),
        (
            "our-stream",
            "1.2.0",
            lambda d: our_doc("app", "1.2.0", "app.tar", d, s.sign(d), stream=(world.stream(d), 0)),
        ),
        ("afr-https", "1.3.0", lambda d: afr_doc(AFR_PATH, d, s.sign(d), url=world.https(d))),
        ("afr-stream", "1.4.0", lambda d: afr_doc(AFR_PATH, d, s.sign(d), stream=world.stream(d))),
    ]
    previous = None
    for job_id, version, make in cases:
        data = release(version) + os.urandom(300_000)  # trailing bytes after the tar's end: several blocks/chunks
        ex = world.run(job_id, make(data), "SUCCEEDED")
        d = ex["statusDetails"]
        assert d["result"] == "installed" and d["version"] == version and d["progress"] == "100%", d
        assert (world.app / "current" / "app.txt").read_text() == f"app {version}\n"
        assert slot(world.app, "previous") == previous
        world.assert_clean(version)
        previous = version
    # Progress went out as IN_PROGRESS updates while downloading (several per job).
    delivered = [line for _, line in agent.lines if "job signed-https: IN_PROGRESS delivered" in line]
    assert len(delivered) >= 3, agent.text()[-2000:]
    # A single-file target keeps the artifact as it is; its version is bound by the signed manifest.
    blob = os.urandom(200_000)
    world.run("blob-1", world.signed("blob", "7.0.0", "firmware.bin", blob), "SUCCEEDED")
    assert (world.blob / "current" / "firmware.bin").read_bytes() == blob
    world.assert_clean("7.0.0", world.blob)


class Truncating(http.server.BaseHTTPRequestHandler):
    data = b""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data[: len(self.data) // 2])  # then the connection drops


@pytest.fixture
def truncating_server(world):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki = world.cloud.directory / "pki"
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_refusals_install_nothing(world, agent, truncating_server):
    s = world.signer
    other = CodeSigner(world.root / "other-signer")
    base = slot(world.app, "current")
    assert base == "1.4.0"  # from the happy-path test
    good = release("2.0.0")

    def doc(data=good, version="2.0.0", **kw):
        return world.signed("app", version, "app.tar", data, **kw)

    def legacy(data=good, version="2.0.0", sig=None, **kw):
        return our_doc(
            "app", version, "app.tar", data, sig or s.sign(data), url=kw.pop("url", None) or world.https(data), **kw
        )

    tampered = good[:-10] + b"X" * 10
    Truncating.data = good
    traversal = make_tar({"../evil.txt": b"owned", "app.txt": b"app 2.0.0\n"}, "2.0.0")
    manifest = make_manifest("app", "2.0.0", "app.tar", len(good), __import__("hashlib").sha256(good).hexdigest())
    cases = [
        (
            "bad-signature",
            signed_doc(
                s,
                "app",
                "2.0.0",
                "app.tar",
                good,
                url=world.https(good),
                manifest=(manifest, s.sign(b"something else")),
            ),
            "REJECTED",
            "manifest signature does not verify",
        ),
        ("other-key", doc(signer=other), "REJECTED", "manifest signature does not verify"),
        ("tampered", doc(url=world.https(tampered)), "REJECTED", "sha256 does not match the signed manifest"),
        ("size-mismatch", doc(url=world.https(good + b"extra")), "REJECTED", "size mismatch"),
        (
            "truncated",
            doc(url=f"https://localhost:{truncating_server.server_address[1]}/app.tar"),
            "FAILED",
            "download failed after 2 attempts",
        ),
        ("downgrade", doc(data=release("1.0.0"), version="1.0.0"), "REJECTED", "downgrade of app from 1.4.0 to 1.0.0"),
        ("replay", doc(data=release("1.4.0"), version="1.4.0"), "REJECTED", "already installed"),
        (
            "version-lie",
            doc(data=release("1.0.0"), version="2.0.0"),
            "REJECTED",
            "VERSION inside the artifact (1.0.0) differs from the signed manifest",
        ),
        (
            "other-target",
            doc(data=release("2.0.0", target="firmware")),
            "REJECTED",
            "a release of 'firmware', not of 'app'",
        ),
        ("not-canonical", doc(version="02.0.0"), "REJECTED", "not MAJOR.MINOR.PATCH"),
        ("traversal", doc(data=traversal), "REJECTED", "not a safe tar archive"),
        (
            "unknown-target",
            world.signed("kernel", "2.0.0", "app.tar", good),
            "REJECTED",
            "unknown update target 'kernel'",
        ),
        ("oversized-doc", {**doc(), "padding": "x" * 40_000}, "REJECTED", "limit is 32768"),
        ("oversized-artifact", doc(size=5 * 1024 * 1024), "REJECTED", "exceeds ota.max_artifact_bytes"),
        ("malformed", {"operation": "ota-update", "schema": 2, "artifact": {}}, "REJECTED", "manifest must be"),
        # Legacy documents: the signature covers the artifact, which must say what it is.
        ("legacy-bad-signature", legacy(sig=s.sign(b"something else")), "REJECTED", "signature does not verify"),
        (
            "legacy-tampered",
            our_doc("app", "2.0.0", "app.tar", good, s.sign(good), url=world.https(tampered)),
            "REJECTED",
            "sha256 does not match",
        ),
        (
            "legacy-tampered-hash-too",
            our_doc("app", "2.0.0", "app.tar", tampered, s.sign(good), url=world.https(tampered)),
            "REJECTED",
            "signature does not verify",
        ),
        ("legacy-no-target-file", legacy(data=release("2.0.0", target=None)), "REJECTED", "binds no version or target"),
        (
            "legacy-version-lie",
            legacy(data=release("1.0.0"), version="2.0.0"),
            "REJECTED",
            "VERSION inside the artifact (1.0.0) differs",
        ),
        (
            "afr-traversal",
            afr_doc("/opt/app/../../etc/passwd", good, s.sign(good), url=world.https(good)),
            "REJECTED",
            "filepath must name a plain file",
        ),
        ("legacy-malformed", {"operation": "ota-update", "schema": 1, "target": "app"}, "REJECTED", "version"),
        (
            "unhealthy",
            doc(data=release("2.1.0", "unhealthy\n"), version="2.1.0"),
            "FAILED",
            "rolled back to 1.4.0: health check exited 1",
        ),
        (
            "broken-again",
            doc(data=release("2.1.0", "unhealthy\n"), version="2.1.0"),
            "REJECTED",
            "failed on this device before",
        ),
    ]
    for job_id, document, status, why in cases:
        ex = world.run(job_id, document, status)
        assert why in ex["statusDetails"]["reason"], (job_id, ex["statusDetails"])
        assert slot(world.app, "current") == base, job_id
        assert (world.app / "current" / "app.txt").read_text() == "app 1.4.0\n"
        world.assert_clean(base)
        assert not (world.root / "device" / "evil.txt").exists() and not (world.app / "evil.txt").exists()
    assert slot(world.app, "broken") == "2.1.0"
    # A single-file target cannot carry VERSION: a legacy document cannot bind its version.
    blob = os.urandom(1000)
    ex = world.run(
        "blob-legacy", our_doc("blob", "8.0.0", "firmware.bin", blob, s.sign(blob), url=world.https(blob)), "REJECTED"
    )
    assert "binds no version or target" in ex["statusDetails"]["reason"]
    world.assert_clean("7.0.0", world.blob)
    # After all that, a good update still goes through.
    world.run("good-after-refusals", doc(), "SUCCEEDED")
    world.assert_clean("2.0.0")


def test_a_stream_download_survives_a_broker_restart(world, agent):
    """The broker (and the cloud's services) restart in the middle of a stream download: the download
    pauses, resumes from its block bitmap after the reconnect, and no status update is lost."""
    import time

    data = release("3.0.0") + os.urandom(3_000_000)
    doc = world.signed("app", "3.0.0", "app.tar", data, stream=True)
    world.jobs.create("through-restart", world.thing, doc)
    i = agent.wait_for(r"job through-restart: IN_PROGRESS delivered", timeout=60)
    world.cloud.down()
    time.sleep(2.0)
    world.cloud.up()
    ex = world.run_wait("through-restart", "SUCCEEDED", timeout=180)
    assert ex["statusDetails"]["version"] == "3.0.0" and ex["statusDetails"]["progress"] == "100%"
    assert any(
        "paused while the broker is unreachable" in line or "download attempt" in line for _, line in agent.lines[i:]
    ), agent.text()[-3000:]
    assert (world.app / "current" / "app.txt").read_text() == "app 3.0.0\n"
    world.assert_clean("3.0.0")
