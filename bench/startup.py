"""Peak RSS and start-to-connected time of `iot-agent run`, as ratios against a minimal floor.

The floor (bench/baseline_connect.py) imports awscrt and awsiot and opens one PKCS#11 mTLS
connection, nothing more. Both run against the same mosquitto, SoftHSM token and certificate in
the same run, interleaved, with the same interpreter. Targets (issue 2): RSS <= 1.15x and time <= 1.3x
of the floor. Runs are paired (floor, then agent, back to back) and the verdict is the median of the
per-pair ratios, which cancels the drift of a busy 2-core machine better than a ratio of medians or
of minima (both printed too). Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localcloud.bench import Bench  # noqa: E402
from localcloud.tokens import softhsm_token  # noqa: E402

TARGET_RSS, TARGET_TIME = 1.15, 1.30


def measure(argv: list[str], env: dict[str, str], ready: bytes, timeout: float = 30.0) -> tuple[float, int]:
    """(seconds from spawn to the `ready` line on stderr, peak RSS in KiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        buf += line
        if ready in line:
            elapsed = time.perf_counter() - t0
            break
    if elapsed is None:
        p.kill()
        raise RuntimeError(f"{argv[1:3]} never printed {ready!r}: {buf.decode(errors='replace')[-800:]}")
    time.sleep(0.3)  # let it settle as a connected daemon before reading its peak
    # VmHWM belongs to the exec'd image; ru_maxrss would also count the fork of this (larger) parent.
    hwm_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p.pid}/status").read_text()).group(1))
    p.send_signal(signal.SIGTERM)
    _, status, _usage = os.wait4(p.pid, 0)
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[1:3]} exited with {p.returncode}")
    return elapsed, hwm_kib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--runs", type=int, default=15)
    args = ap.parse_args()
    # An installed agent runs from byte code compiled at install time (pip does it); in this
    # editable checkout, with PYTHONDONTWRITEBYTECODE possibly set, compile it the same way so the
    # agent is not charged for compiling its sources at every start.
    compileall.compile_dir(str(REPO / "agent"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="iot-agent-bench-"))
    bench = Bench(work).start()
    token = softhsm_token(work / "softhsm")
    try:
        dev = bench.enroll(token, "bench-gw")
        cfg = tomllib.loads(dev.config_path.read_text())
        env = token.full_env()
        # The console script a user runs, with the same interpreter as the floor.
        agent = [
            sys.executable,
            str(Path(sys.executable).parent / "iot-agent"),
            "--config",
            str(dev.config_path),
            "run",
        ]
        base = [
            sys.executable,
            str(REPO / "bench" / "baseline_connect.py"),
            "localhost",
            str(bench.broker.port),
            cfg["broker"]["ca_file"],
            cfg["identity"]["certificate_file"],
            cfg["pkcs11"]["library"],
            cfg["pkcs11"]["token_label"],
            cfg["pkcs11"]["key_label"],
            cfg["pkcs11"]["pin_file"],
            "bench-gw",
        ]
        # One warm-up of each so both read the interpreter and libraries from the page cache.
        measure(base, env, b"connected")
        measure(agent, env, b"connected to ")
        bt, br, at, ar = [], [], [], []
        for _ in range(args.runs):
            t, r = measure(base, env, b"connected")
            bt.append(t)
            br.append(r)
            t, r = measure(agent, env, b"connected to ")
            at.append(t)
            ar.append(r)
    finally:
        token.stop()
        bench.stop()
    b_t, a_t = statistics.median(bt), statistics.median(at)
    b_r, a_r = statistics.median(br), statistics.median(ar)
    print(f"runs: {args.runs} each, interleaved; medians")
    print(
        f"floor  (awscrt+awsiot, one PKCS#11 mTLS connection): {b_t * 1000:7.1f} ms to connected, "
        f"peak RSS {b_r / 1024:6.1f} MiB"
    )
    print(
        f"agent  (iot-agent run: config, PIN, clock gate, connect): {a_t * 1000:7.1f} ms to connected, "
        f"peak RSS {a_r / 1024:6.1f} MiB"
    )
    print(f"median ratios: time {a_t / b_t:.3f}, RSS {a_r / b_r:.3f}")
    print(
        f"best runs: floor {min(bt) * 1000:.1f} ms / {min(br) / 1024:.1f} MiB, agent {min(at) * 1000:.1f} ms / "
        f"{min(ar) / 1024:.1f} MiB"
    )
    rt = statistics.median(a / b for a, b in zip(at, bt, strict=True))
    rr = statistics.median(a / b for a, b in zip(ar, br, strict=True))
    print(f"min ratios: time {min(at) / min(bt):.3f}, RSS {min(ar) / min(br):.3f}")
    verdict_t = "ok" if rt <= TARGET_TIME else "MISSED"
    verdict_r = "ok" if rr <= TARGET_RSS else "MISSED"
    print(f"paired ratio time (median of {args.runs}) {rt:.3f} (target <= {TARGET_TIME})  {verdict_t}")
    print(f"paired ratio RSS  (median of {args.runs}) {rr:.3f} (target <= {TARGET_RSS})  {verdict_r}")
    return 0 if rt <= TARGET_TIME and rr <= TARGET_RSS else 1


if __name__ == "__main__":
    sys.exit(main())
