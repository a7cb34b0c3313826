"""Job documents with presigned-URL placeholders, served by the local HTTPS file server."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from cloudkit import provision_device
from test_localcloud_jobs import raw_request

from localcloud.artifacts import Artifacts
from localcloud.cloud import LocalCloud


def fetch(url: str, ca: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    ctx = ssl.create_default_context(cafile=ca)
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_job_document_urls_are_presigned_and_serve_ranges(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0001"])
    info = c.up()
    try:
        data = os.urandom(10000)
        (tmp_path / "app.bin").write_bytes(data)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "localcloud",
                "--dir",
                str(c.directory),
                "artifacts",
                "put",
                str(tmp_path / "app.bin"),
                "--key",
                "ota/app-1.2.0.bin",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        placeholder = r.stdout.strip()
        assert placeholder == "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/localcloud/ota/app-1.2.0.bin}"
        doc = tmp_path / "job.json"
        doc.write_text(json.dumps({"operation": "install", "url": placeholder}))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "localcloud",
                "--dir",
                str(c.directory),
                "jobs",
                "create",
                "--thing",
                "gw-SN-0001",
                "--document",
                str(doc),
                "--job-id",
                "ota-1",
            ],
            check=True,
            timeout=30,
        )
        dev, _ = provision_device(c, info, tmp_path, "SN-0001")
        try:
            dev.subscribe("$aws/things/gw-SN-0001/jobs/+/accepted")
            kind, resp = raw_request(dev, "$aws/things/gw-SN-0001/jobs/start-next", {})
        finally:
            dev.stop()
        url = resp["execution"]["jobDocument"]["url"]
        assert url.startswith(f"https://localhost:{info['artifacts_port']}/ota/app-1.2.0.bin?X-Expires=")
        ca = str(c.ca.cert_path)
        status, headers, body = fetch(url, ca)
        assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
        status, headers, body = fetch(url, ca, {"Range": "bytes=4000-"})
        assert status == 206 and body == data[4000:] and headers["Content-Range"] == "bytes 4000-9999/10000"
        status, _, body = fetch(url, ca, {"Range": "bytes=0-99"})
        assert status == 206 and body == data[:100]
        assert fetch(url, ca, {"Range": "bytes=20000-"})[0] == 416
        assert fetch(url.replace("X-Signature=", "X-Signature=0"), ca)[0] == 403
        assert fetch(url.replace("app-1.2.0", "app-9"), ca)[0] == 403
        assert fetch(url.split("?")[0], ca)[0] == 403
        # The raw document keeps the placeholder; the URL is made per delivery.
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "localcloud",
                "--dir",
                str(c.directory),
                "jobs",
                "describe",
                "ota-1",
                "--thing",
                "gw-SN-0001",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert "${aws:iot:s3-presigned-url:" in listing
    finally:
        c.down()


def test_expired_url_is_refused(tmp_path):
    a = Artifacts.open(tmp_path)
    (tmp_path / "f").write_bytes(b"x")
    a.put(tmp_path / "f", "f")
    a.port = 1
    url = a.url("f", now=0)  # expired in 1970
    q = url.split("?", 1)[1]
    assert a.check("/f", q) is None
    assert a.check("/f", a.url("f").split("?", 1)[1]) is not None
    assert a.check("/../pki/url-secret", a.url("../pki/url-secret").split("?", 1)[1]) is None
    with pytest.raises(ValueError):
        a.put(tmp_path / "f", "../escape")
