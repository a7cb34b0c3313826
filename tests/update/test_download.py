"""HTTPS artifact downloads against the local cloud's file server: resume, size checks, trust."""

from __future__ import annotations

import hashlib
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.update.download import DownloadError, https_download
from localcloud.artifacts import Artifacts
from localcloud.pki import CertificateAuthority


@pytest.fixture
def server(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    srv_cert = ca.issue_server("srv", ["localhost", "127.0.0.1"])
    arts = Artifacts.open(tmp_path / "cloud")
    data = os.urandom(3 * 1024 * 1024 + 123)
    (tmp_path / "blob").write_bytes(data)
    arts.put(tmp_path / "blob", "ota/blob.bin")
    httpd = arts.serve(srv_cert.cert_path, srv_cert.key_path)
    yield arts, ca, data, tmp_path
    httpd.shutdown()


def test_download_verifies_the_server_and_hashes_in_stream(server):
    arts, ca, data, tmp = server
    got = https_download(arts.url("ota/blob.bin"), tmp / "part", len(data), ca_file=ca.cert_path)
    assert got.sha256 == hashlib.sha256(data).digest() and (tmp / "part").read_bytes() == data
    other = CertificateAuthority(tmp / "other", "other CA")
    with pytest.raises(DownloadError, match="download failed: SSLCertVerificationError"):
        https_download(arts.url("ota/blob.bin"), tmp / "p2", len(data), ca_file=other.cert_path)


def test_resume_after_a_partial_download(server):
    arts, ca, data, tmp = server
    (tmp / "part").write_bytes(data[:1_000_000])  # a previous run was cut off here
    got = https_download(arts.url("ota/blob.bin"), tmp / "part", len(data), ca_file=ca.cert_path)
    assert got.resumed_from == 1_000_000 and got.sha256 == hashlib.sha256(data).digest()


def test_size_mismatch_and_expired_urls_are_refused(server):
    arts, ca, data, tmp = server
    with pytest.raises(DownloadError, match="size mismatch"):
        https_download(arts.url("ota/blob.bin"), tmp / "a", len(data) - 1, ca_file=ca.cert_path)
    with pytest.raises(DownloadError, match="size mismatch"):
        https_download(arts.url("ota/blob.bin"), tmp / "b", len(data) + 10, ca_file=ca.cert_path)
    with pytest.raises(DownloadError, match="HTTP 403"):
        https_download(arts.url("ota/blob.bin", now=0), tmp / "c", len(data), ca_file=ca.cert_path)
    with pytest.raises(DownloadError, match="only https"):
        https_download("http://localhost/x", tmp / "d", 10)


def test_truncated_transfer_leaves_a_resumable_partial(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    cert = ca.issue_server("srv", ["localhost"])
    data = os.urandom(500_000)

    class Liar(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:200_000])  # then the connection drops

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="truncated|connection lost"):
            https_download(
                f"https://localhost:{httpd.server_address[1]}/x",
                tmp_path / "p",
                len(data),
                ca_file=ca.cert_path,
                timeout=5,
            )
        assert (tmp_path / "p").stat().st_size == 200_000
    finally:
        httpd.shutdown()
