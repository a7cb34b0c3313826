"""The README's main job runs end to end and verifies what it claims."""

import subprocess
import sys


def test_demo_main_job():
    r = subprocess.run([sys.executable, "-m", "localcloud.demo"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "agent: provisioned as gw-SN-000123" in out
    assert "PUBACK 135" in out
    verified = out.split("Verified:")[1].strip().splitlines()
    assert len(verified) == 6, verified
