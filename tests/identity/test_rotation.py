"""Certificate rotation against the local cloud, on SoftHSM and swtpm: by command, by job and by expiry
window; the old certificate is deactivated (on the broker's CRL) only after the new one connected,
and the token ends with exactly one device key."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from cloudkit import wait_status

from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.jobs import Jobs
from localcloud.ntp import Chrony


@pytest.fixture
def world(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["R1", "R2", "R3", "R4", "R5", "R6", "R7"])
    c.up()
    ntp = Chrony(tmp_path / "chrony").start()
    yield c, ntp
    ntp.stop()
    c.down()


def device(c, ntp, token, serial, tmp_path, **rotation):
    return fresh_device(
        c,
        token,
        serial,
        tmp_path / "dev",
        [ntp.server],
        extra={
            "defender": {"enabled": False},
            "rotation": {"retry_min_s": 1.0, "retry_max_s": 5.0, "prove_timeout_s": 20.0, **rotation},
        },
    )


def device_keys(dev) -> list[str]:
    return [line.split("\t")[0] for line in dev.cli("keys", "list").stdout.splitlines() if line.startswith("device")]


def on_crl(c, serial: str) -> bool:
    crl = c.directory / "broker" / "crl.pem"
    text = subprocess.run(["openssl", "crl", "-in", str(crl), "-noout", "-text"], capture_output=True, text=True).stdout
    return str(serial).upper().lstrip("0") in text.replace(":", "").upper()


def snapshot(dev) -> dict:
    """`status --json` with the certificate's text (the old file is removed once a rotation is done)."""
    st = json.loads(dev.cli("status", "--json").stdout)
    return {**st, "certificate_pem": open(st["certificate_file"]).read()}


def check_rotated(c, dev, thing: str, before: dict) -> dict:
    status = json.loads(dev.cli("status", "--json").stdout)
    assert status["certificate_file"] != before["certificate_file"] and status["key_label"] != before["key_label"]
    certs = [x for x in c.registry.certificates() if x.thing == thing]
    active = [x for x in certs if x.status == "ACTIVE"]
    assert len(active) == 1 and Path(status["certificate_file"]).read_text().strip() == active[0].pem.strip()
    old = next(x for x in certs if x.pem.strip() == before["certificate_pem"].strip())
    assert old.status == "INACTIVE" and on_crl(c, old.serial)  # the broker refuses the old certificate
    assert device_keys(dev) == [status["key_label"]]  # exactly one device key (listed while the agent is stopped)
    return status


def test_rotation_by_command(world, token, agents, tmp_path):
    c, ntp = world
    serial = "R1" if token.kind == "softhsm" else "R2"
    dev = device(c, ntp, token, serial, tmp_path)
    thing = f"gw-{serial}"
    handles = token.tpm.transient_handles() if token.tpm else None
    a = agents(dev)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=90)
    before = snapshot(dev)
    r = dev.cli("rotate")
    assert r.returncode == 0 and "starts it now" in r.stdout, r.stderr
    i = a.wait_for(r"certificate rotation started: requested by iot-agent rotate", timeout=30)
    a.wait_for(r"certificate rotation done", after=i, timeout=90)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", after=i, timeout=30)
    # Provisioning and the rotation each ended with the agent restarting itself in place: the same
    # process (systemd's main PID, the PID file), the token released before each exec.
    assert a.text().count("restarting in place (same PID)") == 2, a.text()[-3000:]
    assert int((dev.directory / "state" / "agent.pid").read_text()) == a.proc.pid
    assert a.stop() == 0
    if handles is not None:
        assert token.tpm.transient_handles() == handles  # nothing left loaded in the TPM by either program
    check_rotated(c, dev, thing, before)
    # The agent starts again on the new identity.
    b = agents(dev)
    b.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=60)
    assert b.stop() == 0


def test_rotation_by_job_and_by_expiry_window(world, token, agents, tmp_path):
    c, ntp = world
    serial = "R3" if token.kind == "softhsm" else "R7"
    dev = device(c, ntp, token, serial, tmp_path, expiry_window_days=400.0)  # every certificate is "due"...
    thing = f"gw-{serial}"
    a = agents(dev, env={})
    # ...so the first start rotates at once (365-day certificates inside a 400-day window) and then waits.
    a.wait_for(r"certificate rotation started: certificate expires in 36\d\.\d days \(window 400\)", timeout=90)
    a.wait_for(r"certificate rotation done", timeout=90)
    before = snapshot(dev)
    jobs = Jobs(c.registry.db, c.registry.lock)
    jobs.create("rotate-1", thing, {"operation": "rotate-certificate"})
    ex = wait_status(jobs, "rotate-1", thing, "SUCCEEDED", timeout=90)
    assert "rotated to certificate" in ex["statusDetails"]["result"]
    assert a.stop() == 0
    check_rotated(c, dev, thing, before)


def test_refused_rotation_keeps_the_old_certificate_and_retries(world, softhsm, agents, tmp_path):
    c, ntp = world
    c.configure(rotation_refused=True)
    c.down()
    c.up()
    # Due at once (400-day window): refused, then tried again after a growing, bounded backoff (1-4 s here).
    dev = device(c, ntp, softhsm, "R4", tmp_path, expiry_window_days=400.0, retry_min_s=1.0, retry_max_s=4.0)
    thing = "gw-R4"
    a = agents(dev)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=90)
    before = snapshot(dev)
    i = -1
    for _ in range(3):
        i = a.wait_for(
            r"certificate rotation failed: .*Forbidden.*; the old certificate stays; next try in",
            after=i + 1,
            timeout=60,
        )
    starts = [t for t, line in a.lines if "certificate rotation started: certificate expires" in line]
    gaps = [b - a_ for a_, b in zip(starts, starts[1:], strict=False)]
    assert len(starts) >= 3 and all(0.5 < g < 30 for g in gaps), gaps
    jobs = Jobs(c.registry.db, c.registry.lock)
    jobs.create("rotate-no", thing, {"operation": "rotate-certificate"})
    ex = wait_status(jobs, "rotate-no", thing, "FAILED", timeout=60)
    assert "Forbidden" in ex["statusDetails"]["reason"]
    assert a.stop() == 0
    after = json.loads(dev.cli("status", "--json").stdout)
    assert after["certificate_file"] == before["certificate_file"] and device_keys(dev) == [before["key_label"]]
    active = [x for x in c.registry.certificates() if x.thing == thing and x.status == "ACTIVE"]
    assert len(active) == 1


def test_a_new_certificate_that_cannot_connect_falls_back_to_the_old_one(world, softhsm, agents, tmp_path):
    c, ntp = world
    c.configure(rotation_new_inactive=True)
    c.down()
    c.up()
    dev = device(c, ntp, softhsm, "R5", tmp_path, retry_min_s=600.0, retry_max_s=1200.0)
    thing = "gw-R5"
    a = agents(dev)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=90)
    before = snapshot(dev)
    jobs = Jobs(c.registry.db, c.registry.lock)
    jobs.create("rotate-bad", thing, {"operation": "rotate-certificate"})
    ex = wait_status(jobs, "rotate-bad", thing, "FAILED", timeout=120)
    assert "no connection within 20 s" in ex["statusDetails"]["reason"], ex
    i = a.wait_for(r"the new certificate did not connect .*; back to the old one", timeout=5)
    a.wait_for(r"certificate rotation failed: no connection within 20 s.*next try in (\d+) s", after=i, timeout=30)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", after=i, timeout=30)
    assert a.stop() == 0
    after = json.loads(dev.cli("status", "--json").stdout)
    assert after["certificate_file"] == before["certificate_file"] and after["key_label"] == before["key_label"]
    # The next automatic attempt waits for a full-jitter backoff of at most retry_max_s (1200 s here).
    assert after["rotation"]["last"]["status"] == "FAILED"
    assert time.time() - 60 < after["rotation"]["next_attempt_at"] <= time.time() + 1200
    assert device_keys(dev) == [before["key_label"]]
    active = [x for x in c.registry.certificates() if x.thing == thing and x.status == "ACTIVE"]
    assert len(active) == 1 and active[0].pem.strip() == before["certificate_pem"].strip()


def test_an_expired_certificate_gives_a_clear_status_not_a_crash_loop(world, softhsm, agents, tmp_path):
    c, ntp = world
    c.configure(device_cert_days=(300 + 12) / 86400)  # valid from 5 minutes ago until 12 s from now
    c.down()
    c.up()
    c.registry.allow_serials(["R6"])
    dev = device(c, ntp, softhsm, "R6", tmp_path, enabled=False)
    a = agents(dev)
    a.wait_for(r"connected to localhost:\d+ as gw-R6", timeout=60)
    assert a.stop() == 0
    deadline = time.time() + 30
    while time.time() < deadline and not json.loads(dev.cli("status", "--json").stdout)["certificate_expired"]:
        time.sleep(1)
    b = agents(dev)
    assert b.proc.wait(60) == 2  # a config-class exit: systemd's RestartPreventExitStatus=2 ends it there
    errors = [line for _, line in b.lines if "expired" in line]
    assert len(errors) == 1 and "cannot connect or rotate itself" in errors[0], b.text()
    out = dev.cli("status").stdout
    assert "EXPIRED" in out
