"""agent.base.digest: the same SHA-256 as hashlib on every path, and the daemon never maps libcrypto."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from agent.base import digest

REPO = Path(__file__).resolve().parents[2]


def test_every_path_gives_hashlibs_digest():
    data = bytes(range(256)) * 4099
    want = hashlib.sha256(data).hexdigest()
    assert digest.sha256(data).hexdigest() == want
    h = digest._CrtSha256()
    view = memoryview(data)
    for i in range(0, len(data), 65536):  # in chunks, as memoryview slices (what the download passes)
        h.update(view[i : i + 65536])
    assert h.hexdigest() == want
    s = digest.stream_sha256()
    s.update(data)
    assert s.hexdigest() == want
    assert len(digest.token_hex(8)) == 16 and digest.token_hex(8) != digest.token_hex(8)


def test_the_daemons_modules_load_no_second_crypto_library():
    """Every module `iot-agent run` loads, with awscrt: no hashlib, hmac, secrets, ssl or tarfile (they map
    OpenSSL or cost a MiB each, for the agent's whole life; bench/lifecycle_rss.py)."""
    code = (
        "import sys, awscrt.mqtt5\n"
        "from awsiot import mqtt5_client_builder, iotjobs, iotshadow, iotidentity\n"
        "import agent.cli, agent.runtime.daemon, agent.update.ota, agent.update.streamdl, agent.update.download\n"
        "import agent.jobs.engine, agent.defender.reporter, agent.inventory.reporter, agent.identity.provisioning\n"
        "print(sorted(m for m in ('_hashlib', 'hashlib', 'hmac', 'secrets', 'ssl', '_ssl', 'tarfile', 'http.client')"
        " if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
