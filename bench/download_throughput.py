"""A 200 MB artifact over local HTTPS: download throughput against `sha256sum` of the same file, and
the downloader's peak RSS growth. Targets (issue 6): ratio >= 0.7, RSS growth <= 4 MB.

The server (the local cloud's artifact server) runs in its own process so it neither shares the
downloader's interpreter nor counts in its memory.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.update.download import https_download  # noqa: E402
from localcloud.artifacts import Artifacts  # noqa: E402
from localcloud.pki import CertificateAuthority  # noqa: E402

SERVER = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from localcloud.artifacts import Artifacts
a = Artifacts.open(Path({d!r}))
a.serve(Path({cert!r}), Path({key!r}))
print(a.port, flush=True)
time.sleep(3600)
"""


def vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dl-bench-"))
    ca = CertificateAuthority(work / "ca")
    cert = ca.issue_server("srv", ["localhost"])
    src = work / "artifact.bin"
    with open(src, "wb") as f:
        for _ in range(args.mb):
            f.write(os.urandom(1 << 20))
    arts = Artifacts.open(work / "cloud")
    arts.put(src, "big.bin")
    size = src.stat().st_size
    srv = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVER.format(repo=str(REPO), d=str(work / "cloud"), cert=str(cert.cert_path), key=str(cert.key_path)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        arts.port = int(srv.stdout.readline())
        # warm the page cache for both
        subprocess.run(["sha256sum", str(src)], capture_output=True, check=True)
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", str(src)], capture_output=True, check=True)
        t_sum = time.perf_counter() - t0
        rss0 = vm("VmRSS")
        t0 = time.perf_counter()
        got = https_download(arts.url("big.bin"), work / "partial", size, ca_file=ca.cert_path)
        t_dl = time.perf_counter() - t0
        growth = (vm("VmHWM") - rss0) / 1024
    finally:
        srv.terminate()
        srv.wait(10)
    import hashlib

    assert got.sha256 == hashlib.sha256(src.read_bytes()).digest()
    mb = size / 1048576
    ratio = (mb / t_dl) / (mb / t_sum)
    print(
        f"artifact {mb:.0f} MiB; sha256sum {mb / t_sum:.0f} MiB/s; "
        f"HTTPS download + streaming SHA-256 {mb / t_dl:.0f} MiB/s"
    )
    print(f"throughput ratio {ratio:.2f} (target >= 0.7); peak RSS growth {growth:.1f} MiB (target <= 4)")
    for p in (src, work / "partial", work / "cloud" / "artifacts" / "big.bin"):
        p.unlink(missing_ok=True)
    return 0 if ratio >= 0.7 and growth <= 4 else 1


if __name__ == "__main__":
    sys.exit(main())
