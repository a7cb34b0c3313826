"""The README's main job runs end to end and verifies what it claims."""

import subprocess
import sys


def test_demo_main_job():
    r = subprocess.run([sys.executable, "-m", "localcloud.demo"], capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    out = r.stdout
    assert "agent: provisioned as gw-SN-000123" in out
    assert "PUBACK 135" in out
    verified = out.split("Verified:")[1].strip().splitlines()
    for step in (
        "clock trusted",
        "provisioned by claim",
        "Device Defender report",
        "signed update",
        "tampered update REJECTED",
        "certificate rotated",
        "another device's topic refused",
    ):
        assert any(step in v for v in verified), (step, verified)
    assert "10 steps verified" in out
    status = out.split("iot-agent status:")[1]
    assert "update app:   current 1.1.0, previous -" in status and "jobs:         last rotate-1 SUCCEEDED" in status
