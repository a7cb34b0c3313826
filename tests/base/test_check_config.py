"""`iot-agent check-config` reports what `run` would stop on at start, never blocks on what it reads, and
`iot-agent status` never prints a traceback: garbage CA files, a FIFO as the PIN file, a corrupt state file,
unusable certificates for each identity mode, a broken code-signing certificate.

Each test runs the real CLI (`python -m agent`) on files in a temporary folder.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import pytest
from test_config import GOOD, certificate_pem, cfgdir, cli  # noqa: F401  (cfgdir is a fixture)

from agent.base.errors import SecretError
from agent.base.pin import read_pin
from agent.base.state import StateStore
from agent.runtime.features import load

QUICK = 20  # seconds: generous for a CLI run on a loaded machine, far below "hangs"


def check(cfgdir, *, env: dict | None = None) -> tuple[int, list[str]]:
    r = cli("--config", str(cfgdir / "config.toml"), "check-config", env=env, timeout=QUICK)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stderr.strip().splitlines()


def test_the_fixture_is_a_good_config(cfgdir):
    r = cli("--config", str(cfgdir / "config.toml"), "check-config", timeout=QUICK)
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok"), r


# -- CA files --------------------------------------------------------------------------------------

GARBAGE = {
    "text": b"this is not a certificate\n",
    "empty": b"",
    "unclosed": b"-----BEGIN CERTIFICATE-----\n",
    "bad base64": b"-----BEGIN CERTIFICATE-----\n!!!!not base64!!!!\n-----END CERTIFICATE-----\n",
    "not x509": b"-----BEGIN CERTIFICATE-----\n"
    + base64.encodebytes(b"\x30\x03\x02\x01\x05")
    + b"-----END CERTIFICATE-----\n",
    "private key": b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    "DER": base64.b64decode(b"".join(certificate_pem().splitlines()[1:-1])),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_ca_file_is_refused(cfgdir, kind):
    (cfgdir / "ca.pem").write_bytes(GARBAGE[kind])
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"broker.ca_file: {cfgdir / 'ca.pem'} ") and "download the root CA" in lines[0]
    assert "PRIVATE" not in lines[0] or "labelled 'PRIVATE KEY'" in lines[0]  # the label, never the key


def test_one_bad_certificate_in_a_bundle_is_refused_and_a_good_bundle_with_comments_passes(cfgdir):
    good = b"# Issuer: test one\n" + certificate_pem("one") + b"\n# Issuer: test two\n" + certificate_pem("two")
    (cfgdir / "ca.pem").write_bytes(good)
    assert check(cfgdir) == (0, [])
    (cfgdir / "ca.pem").write_bytes(good + GARBAGE["not x509"])
    rc, lines = check(cfgdir)
    assert rc == 2 and lines == [
        f"broker.ca_file: {cfgdir / 'ca.pem'} has PEM block 3 of 3 that is not an X.509 "
        "certificate; download the root CA (AmazonRootCA1.pem) again to that path"
    ]


def test_garbage_or_missing_ota_ca_file_is_refused(cfgdir):
    path = cfgdir / "config.toml"
    path.write_text(GOOD + '\n[ota]\nca_file = "ota-ca.pem"\n')
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"ota.ca_file: {cfgdir / 'ota-ca.pem'} does not exist")
    (cfgdir / "ota-ca.pem").write_bytes(GARBAGE["text"])
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and "ota.ca_file:" in lines[0] and "is not a PEM certificate" in lines[0]
    (cfgdir / "ota-ca.pem").write_bytes(certificate_pem())
    assert check(cfgdir) == (0, [])


def test_a_fifo_as_ca_file_is_refused_without_blocking(cfgdir):
    (cfgdir / "ca.pem").unlink()
    os.mkfifo(cfgdir / "ca.pem")
    t = time.monotonic()
    rc, lines = check(cfgdir)
    assert rc == 2 and lines == [
        f"broker.ca_file: {cfgdir / 'ca.pem'} is a FIFO, not a regular file; download the "
        "root CA (AmazonRootCA1.pem) again to that path"
    ]
    assert time.monotonic() - t < QUICK


# -- the PIN file ----------------------------------------------------------------------------------


def test_a_fifo_as_pin_file_is_refused_without_hanging(cfgdir):
    """It hung check-config (and would hang run) in a blocking open()."""
    pin = cfgdir / "pin"
    pin.unlink()
    os.mkfifo(pin, 0o600)
    rc, lines = check(cfgdir, env={"CREDENTIALS_DIRECTORY": ""})
    assert rc == 2 and lines == [
        f"{pin}: PIN file is not a regular file (a FIFO); point pkcs11.pin_file (or the "
        "credential) at a file holding only the PIN, mode 600"
    ]
    r = cli("--config", str(cfgdir / "config.toml"), "run", env={"CREDENTIALS_DIRECTORY": ""}, timeout=QUICK)
    assert r.returncode == 2 and "PIN file is not a regular file (a FIFO)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_fifo_with_a_writer_is_still_refused_and_the_pin_never_shown(cfgdir):
    pin = cfgdir / "pin"
    pin.unlink()
    os.mkfifo(pin, 0o600)
    fd = os.open(pin, os.O_RDWR | os.O_NONBLOCK)  # a writer holding it open, the PIN waiting in the pipe
    try:
        os.write(fd, b"4321\n")
        with pytest.raises(SecretError, match=r"not a regular file \(a FIFO\)") as e:
            read_pin(load(cfgdir / "config.toml"), environ={})
        assert "4321" not in str(e.value)
    finally:
        os.close(fd)


def test_a_directory_socket_or_device_as_pin_file_is_refused(cfgdir, tmp_path_factory):
    pin = cfgdir / "pin"
    pin.unlink()
    pin.mkdir(mode=0o700)
    with pytest.raises(SecretError, match=r"not a regular file \(a directory\)"):
        read_pin(load(cfgdir / "config.toml"), environ={})
    short = tmp_path_factory.mktemp("s")  # AF_UNIX paths must be short
    config = cfgdir / "config.toml"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(short / "pin"))
        config.write_text(GOOD.replace('pin_file = "pin"', f'pin_file = "{short / "pin"}"'))
        with pytest.raises(SecretError, match=r"not a regular file \(a socket\)"):
            read_pin(load(config), environ={})
    config.write_text(GOOD.replace('pin_file = "pin"', 'pin_file = "/dev/null"'))
    with pytest.raises(SecretError, match=r"not a regular file \(a character device\)"):
        read_pin(load(config), environ={})


# -- what run checks at start, after the config ----------------------------------------------------


def test_corrupt_state_file_is_reported(cfgdir):
    (cfgdir / "state").mkdir(mode=0o700)
    (cfgdir / "state" / "state.json").write_text("{not json")
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and "state file is corrupt (not JSON" in lines[0], lines


def test_state_file_that_is_a_fifo_is_reported_without_blocking(cfgdir):
    (cfgdir / "state").mkdir(mode=0o700)
    os.mkfifo(cfgdir / "state" / "state.json", 0o600)
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and "state file is not a regular file" in lines[0], lines


@pytest.mark.parametrize("kind", ["text", "unclosed", "not x509", "DER"])
def test_garbage_identity_certificate_is_reported(cfgdir, kind):
    (cfgdir / "device.pem").write_bytes(GARBAGE[kind])
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"identity.certificate_file: {cfgdir / 'device.pem'} ")


def test_expired_identity_certificate_is_reported(cfgdir):
    (cfgdir / "device.pem").write_bytes(certificate_pem("gw-1", days=-1, start_days=-30))
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and "the device certificate expired on" in lines[0], lines


def test_certificate_recorded_in_the_state_is_checked(cfgdir):
    store = StateStore(cfgdir / "state")
    store.save({"thing_name": "gw-1", "certificate_file": str(cfgdir / "provisioned.pem"), "key_label": "device"})
    rc, lines = check(cfgdir)
    assert rc == 2 and lines == [
        f"{cfgdir / 'provisioned.pem'}: device certificate not found; restore it or provision the device again"
    ]
    (cfgdir / "provisioned.pem").write_bytes(GARBAGE["text"])
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and "device certificate (recorded in the state)" in lines[0], lines
    (cfgdir / "provisioned.pem").write_bytes(certificate_pem("gw-1"))
    assert check(cfgdir) == (0, [])


def test_no_identity_in_preprovisioned_mode_is_reported(cfgdir):
    path = cfgdir / "config.toml"
    path.write_text(GOOD.replace('thing_name = "gw-1"\n', ""))
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("no device identity yet"), lines


def test_jitp_without_a_device_certificate_is_reported(cfgdir):
    path = cfgdir / "config.toml"
    path.write_text(GOOD.replace('certificate_file = "device.pem"\n', 'mode = "jitp"\n'))
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and "identity.mode is jitp but there is no device certificate yet" in lines[0]


def test_claim_mode_needs_a_serial_and_a_claim_certificate_that_parses(cfgdir):
    path = cfgdir / "config.toml"
    path.write_text(
        GOOD.replace('certificate_file = "device.pem"\n', "").replace('thing_name = "gw-1"\n', "")
        + "\n[provisioning]\nenabled = true\n"
    )
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 2, lines
    assert lines[0].startswith("provisioning: no serial number")
    assert lines[1] == (
        f"provisioning: claim certificate {cfgdir / 'state' / 'claim.pem'} not found; run "
        "`iot-agent factory claim-cert`"
    )
    path.write_text(path.read_text().replace("enabled = true\n", 'enabled = true\nserial_number = "SN-1"\n'))
    (cfgdir / "state").mkdir(mode=0o700)
    (cfgdir / "state" / "claim.pem").write_bytes(GARBAGE["not x509"])
    rc, lines = check(cfgdir)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("provisioning.claim_certificate: "), lines
    (cfgdir / "state" / "claim.pem").write_bytes(certificate_pem("claim"))
    assert check(cfgdir) == (0, [])


def test_broken_code_signing_certificate_is_reported(cfgdir):
    path = cfgdir / "config.toml"
    path.write_text(GOOD + '\n[ota]\ncode_signing_certificate = "cs.pem"\n[ota.targets.app]\ndirectory = "app"\n')
    (cfgdir / "cs.pem").write_bytes(GARBAGE["text"])
    rc, lines = check(cfgdir)
    assert (
        rc == 2
        and len(lines) == 1
        and lines[0].startswith("ota.code_signing_certificate: ")
        and "not a valid code-signing certificate" in lines[0]
    ), lines
    (cfgdir / "cs.pem").write_bytes(certificate_pem("signer"))
    assert check(cfgdir) == (0, [])


def test_every_start_up_problem_is_listed_at_once(cfgdir):
    (cfgdir / "ca.pem").write_bytes(GARBAGE["text"])
    (cfgdir / "pin").chmod(0o644)
    (cfgdir / "device.pem").write_bytes(GARBAGE["unclosed"])
    rc, lines = check(cfgdir, env={"CREDENTIALS_DIRECTORY": ""})
    assert rc == 2 and len(lines) == 3, lines
    assert [line.split(":")[0] for line in lines] == [
        "broker.ca_file",
        str(cfgdir / "pin"),
        "identity.certificate_file",
    ]
    assert "1234" not in "\n".join(lines)


# -- status ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "unclosed", "not x509"])
def test_status_shows_an_unreadable_certificate_without_a_traceback(cfgdir, kind):
    (cfgdir / "device.pem").write_bytes(GARBAGE[kind])
    r = cli("--config", str(cfgdir / "config.toml"), "status", "--json", timeout=QUICK)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    s = json.loads(r.stdout)
    assert s["certificate_expires"] is None and s["certificate_expired"] is False
    assert s["certificate_error"].startswith(str(cfgdir / "device.pem")), s
    r = cli("--config", str(cfgdir / "config.toml"), "status", timeout=QUICK)
    assert r.returncode == 0 and "certificate:  UNUSABLE: " in r.stdout and "Traceback" not in r.stderr


def test_status_on_a_fifo_certificate_returns(cfgdir):
    (cfgdir / "device.pem").unlink()
    os.mkfifo(cfgdir / "device.pem")
    r = cli("--config", str(cfgdir / "config.toml"), "status", "--json", timeout=QUICK)
    assert r.returncode == 0 and "is a FIFO" in json.loads(r.stdout)["certificate_error"]


def test_status_of_a_good_certificate(cfgdir):
    r = cli("--config", str(cfgdir / "config.toml"), "status", "--json", timeout=QUICK)
    s = json.loads(r.stdout)
    assert r.returncode == 0 and s["certificate_error"] is None and s["certificate_expires"].endswith("+00:00")


def test_status_on_a_corrupt_state_file_is_one_line(cfgdir):
    (cfgdir / "state").mkdir(mode=0o700)
    (cfgdir / "state" / "state.json").write_text('{"schema": 1, "data": []}')
    r = cli("--config", str(cfgdir / "config.toml"), "status", "--json", timeout=QUICK)
    assert r.returncode == 3 and r.stdout == "", r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iot-agent: ") and "state file is corrupt" in lines[0], r.stderr


def test_status_survives_odd_values_in_a_state_with_a_good_checksum(cfgdir):
    StateStore(cfgdir / "state").save(
        {
            "thing_name": 7,
            "provisioning": "x",
            "jobs": {"current": 1, "outbox": 3},
            "connection": {"refused_since": "yesterday"},
            "rotation": [],
            "defender": {"last_report_id": 5, "last_report_at": "x"},
        }
    )
    for args in (("status", "--json"), ("status",)):
        r = cli("--config", str(cfgdir / "config.toml"), *args, timeout=QUICK)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
