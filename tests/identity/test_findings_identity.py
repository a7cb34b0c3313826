"""Findings of the hardening review (issue 17, items 1 and 3) against the real agent, SoftHSM and the
local cloud: a power cut between a rotation's commit and its switch, a certificate answer naming the
certificate in use, and hostile provisioning answers. Each test failed on the code before the fix
(commit a3a3cd0) and is written so it can run there: tests/killwrap.py kills without the agent's help,
and the hostile answers come from the local cloud's test-only `tamper_answers` setting.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path

import pytest
from cloudkit import new_csr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sweep import Run

from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.pki import pem

HERE = Path(__file__).resolve().parent.parent  # tests/, beside killwrap.py
QUIET = {"defender": {"enabled": False}, "inventory": {"enabled": False}, "jobs": {"enabled": False}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("findid")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    yield cloud, ntp
    cloud.configure(tamper_answers={})
    ntp.stop()
    cloud.down()


def _status(dev) -> dict:
    r = dev.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _active(cloud, thing: str) -> list:
    return [c for c in cloud.registry.certificates() if c.thing == thing and c.status == "ACTIVE"]


def _provisioned(world, softhsm, tmp_path, serial: str, agents, extra: dict | None = None):
    cloud, ntp = world
    cloud.registry.allow_serials([serial])
    dev = fresh_device(cloud, softhsm, serial, tmp_path / "device", [ntp.server], extra={**QUIET, **(extra or {})})
    a = agents(dev)
    a.wait_for(rf"connected to localhost:\d+ as gw-{serial}", timeout=60)
    assert a.stop() == 0
    return dev, f"gw-{serial}"


def test_power_cut_between_the_rotation_commit_and_the_switch_keeps_the_identity(world, softhsm, agents, tmp_path):
    """Item 1: kill -9 right after the state first records the rotation's commit. The code before the
    fix recorded the commit and switched the identity in two writes: restarted, it reconnected with
    the old certificate, had the cloud deactivate it, deleted the old key and exited 2, for good."""
    cloud, _ = world
    dev, thing = _provisioned(world, softhsm, tmp_path, "FIND001", agents)
    before = _status(dev)["certificate_file"]
    dev.cli("rotate")
    cut = Run(
        [
            sys.executable,
            str(HERE / "killwrap.py"),
            "--path",
            "*/state.json",
            "--state",
            "rotation.step=commit",
            "--",
            "--config",
            str(dev.config_path),
            "run",
        ],
        softhsm.full_env(),
        tmp_path / "cut.log",
    ).start()
    assert cut.wait(90) == -9, cut.text()[-3000:]
    cut.reap()
    a = agents(dev)
    a.wait_for(r"certificate rotation done", timeout=60)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=30)
    assert a.stop() == 0
    st = _status(dev)
    assert st["certificate_file"] != before and st["rotation"]["last"]["status"] == "SUCCEEDED"
    active = _active(cloud, thing)
    assert len(active) == 1 and Path(st["certificate_file"]).read_text().strip() == active[0].pem.strip()
    keys = [line.split("\t")[0] for line in dev.cli("keys", "list").stdout.splitlines() if line.startswith("device")]
    assert keys == [st["key_label"]]


def _foreign_certificate(cloud, cn: str) -> tuple[str, str]:
    """A certificate the cloud's CA issued for ANOTHER key, and its id."""
    csr_pem, _key = new_csr(cn)
    cert = cloud.ca.sign_csr(csr_pem.encode(), cn)
    der = cert.public_bytes(serialization.Encoding.DER)
    return pem(cert).decode(), hashlib.sha256(der).hexdigest()


def test_a_certificate_answer_naming_the_certificate_in_use_never_replaces_it(world, softhsm, agents, tmp_path):
    """Item 1, second case: CreateCertificateFromCsr answers with the certificateId of the certificate
    in use and a certificate for another key. Before the fix it overwrote the file in use (named by the
    id's first 16 digits) before anything was proven: the device lost its only working certificate."""
    cloud, _ = world
    dev, thing = _provisioned(
        world, softhsm, tmp_path, "FIND002", agents, extra={"rotation": {"retry_min_s": 1.0, "retry_max_s": 2.0}}
    )
    st = _status(dev)
    in_use = Path(st["certificate_file"])
    original = in_use.read_bytes()
    in_use_id = hashlib.sha256(
        x509.load_pem_x509_certificate(original).public_bytes(serialization.Encoding.DER)
    ).hexdigest()
    foreign, _ = _foreign_certificate(cloud, thing)
    cloud.configure(tamper_answers={"create-from-csr": {"certificateId": in_use_id, "certificatePem": foreign}})
    try:
        dev.cli("rotate")
        a = agents(dev)
        a.wait_for(r"certificate rotation (refused|failed)", timeout=60)
        assert in_use.read_bytes() == original, "the certificate in use was overwritten"
        a.wait_for(r"certificate rotation failed", timeout=30)  # the attempt is closed: a new request counts
    finally:
        cloud.configure(tamper_answers={})
    dev.cli("rotate")  # the cloud is honest again: the next try succeeds
    a.wait_for(r"certificate rotation done", timeout=90)
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=30)
    assert a.stop() == 0
    st = _status(dev)
    active = _active(cloud, thing)
    assert len(active) == 1 and Path(st["certificate_file"]).read_text().strip() == active[0].pem.strip()


HOSTILE_THING_NAMES = ["#", "+", "gw/../x", "x" * 2048, "", 12345]


def test_hostile_provisioning_answers_are_refused_and_nothing_is_saved(world, softhsm, agents, tmp_path):
    """Item 3: thing names '#', '+', 'gw/../x', 2 KB, '' and 12345; a certificate for another key; a
    garbage PEM; a certificateId that is not the certificate's; a 1 MB ownership token. Before the fix
    each was saved as the identity and the device never recovered, even once the cloud was honest."""
    cloud, ntp = world
    serial = "FIND003"
    thing = f"gw-{serial}"
    cloud.registry.allow_serials([serial])
    dev = fresh_device(cloud, softhsm, serial, tmp_path / "device", [ntp.server], extra=QUIET)
    foreign, foreign_id = _foreign_certificate(cloud, thing)
    # Certificate answers first: a refused RegisterThing answer is retried from RegisterThing alone.
    cases = [
        ("create-from-csr", {"certificatePem": foreign, "certificateId": foreign_id}),
        (
            "create-from-csr",
            {"certificatePem": "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"},
        ),
        ("create-from-csr", {"certificateId": "0" * 64}),
        ("create-from-csr", {"certificateOwnershipToken": "A" * (1 << 20)}),
    ] + [("provision", {"thingName": name}) for name in HOSTILE_THING_NAMES]
    a = None
    try:
        for i, (op, fields) in enumerate(cases):
            cloud.configure(tamper_answers={op: fields})
            if a is None:
                a = agents(dev)
            seen = len(re.findall(r"provisioning refused: InvalidAnswer", a.text()))
            deadline = time.monotonic() + 45
            while len(re.findall(r"provisioning refused: InvalidAnswer", a.text())) <= seen:
                assert a.proc.poll() is None, f"case {i} ({op} {list(fields)}): the agent stopped:\n{a.text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"case {i} ({op} {str(fields)[:80]}) not refused:\n{a.text()[-3000:]}"
                )
                time.sleep(0.2)
            state = json.loads((dev.directory / "state" / "state.json").read_text())["data"]
            assert "thing_name" not in state and "certificate_file" not in state, (i, state)
            flow = state.get("provisioning", {})
            assert "thing_name" not in flow and len(json.dumps(flow)) < 20_000, (i, op)
            files = [p.name for p in (dev.directory / "state").glob("device-*.pem")]
            for name in files:  # any certificate on disk is one the CA issued for this device's key
                assert foreign not in (dev.directory / "state" / name).read_text()
    finally:
        cloud.configure(tamper_answers={})
    a.wait_for(rf"connected to localhost:\d+ as {thing}", timeout=60)
    assert a.stop() == 0
    st = _status(dev)
    assert st["thing_name"] == thing
    active = _active(cloud, thing)
    assert len(active) == 1 and Path(st["certificate_file"]).read_text().strip() == active[0].pem.strip()
