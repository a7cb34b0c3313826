"""A short session of the installed agent (/opt/iot-agent, as scripts/install.sh lays it out), for
scripts/check-arm64.sh: on each token (SoftHSM, swtpm) a pre-provisioned device connects to the local
cloud with the installed `iot-agent run`, is seen by the broker under its thing name, and stops
cleanly on SIGTERM. Prints one line per token; exit status 1 if one fails."""

from __future__ import annotations

import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localcloud.bench import enrolled_device  # noqa: E402
from localcloud.cloud import LocalCloud  # noqa: E402
from localcloud.ntp import Chrony  # noqa: E402
from localcloud.tokens import softhsm_token, tpm_token  # noqa: E402

INSTALLED = Path("/opt/iot-agent/venv/bin/iot-agent")
QUIET = {"defender": {"enabled": False}, "inventory": {"enabled": False}, "jobs": {"enabled": False}}


def session(cloud: LocalCloud, ntp: Chrony, kind: str, d: Path) -> str:
    token = softhsm_token(d / "token") if kind == "softhsm" else tpm_token(d / "token")
    try:
        thing = f"gw-arm64-{kind}"
        dev = enrolled_device(cloud, token, thing, d / "device", [ntp.server], extra=QUIET)
        log = d / "agent.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [str(INSTALLED), "--config", str(dev.config_path), "run"], env=token.full_env(), stderr=out
            )
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 180:  # bounded: emulation is slow, not that slow
                if re.search(rf"connected to localhost:\d+ as {thing}", log.read_text(errors="replace")):
                    break
                if p.poll() is not None:
                    break
                time.sleep(0.2)
            connected = time.monotonic() - t0
            text = log.read_text(errors="replace")
            if not re.search(rf"connected to localhost:\d+ as {thing}", text):
                raise RuntimeError(f"{kind}: the installed agent did not connect:\n{text[-2000:]}")
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        if p.returncode != 0:
            raise RuntimeError(f"{kind}: exit {p.returncode} after SIGTERM:\n{log.read_text()[-2000:]}")
        return f"{kind}: the installed agent connected as {thing} in {connected:.1f} s and stopped cleanly"
    finally:
        token.stop()


def main() -> int:
    print(f"session on {platform.machine()} ({sys.implementation.cache_tag}), agent {INSTALLED}")
    with tempfile.TemporaryDirectory(prefix="arm64-session-") as tmp:
        d = Path(tmp)
        cloud = LocalCloud(d / "cloud")
        cloud.up()
        ntp = Chrony(d / "chrony").start()
        try:
            for kind in ("softhsm", "tpm"):
                print(session(cloud, ntp, kind, d / kind), flush=True)
        finally:
            ntp.stop()
            cloud.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
