"""Secrets on disk: the local cloud's registry (live ownership tokens) and keys are private to its user.

Every file under the cloud's folder that holds a secret — a private key, the URL-signing key, or
any byte of a live certificate ownership token (the SQLite registry and its -wal/-shm) — is mode
0600, and the folders holding them are 0700: nothing a group or other user can read.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from awsiot import iotidentity
from cloudkit import Client, identity_client, new_csr

from localcloud.cloud import LocalCloud
from localcloud.registry import Registry

GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO


def _secret_files(directory: Path, tokens: list[bytes]) -> dict[Path, str]:
    """Files holding a secret, with the reason (what was found in them)."""
    out: dict[Path, str] = {}
    for p in directory.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        data = p.read_bytes()
        if b"PRIVATE KEY" in data:
            out[p] = "private key"
        elif p.name == "url-secret":
            out[p] = "URL-signing key"
        elif p.name.startswith("registry.sqlite"):
            out[p] = "registry (ownership tokens)"
        elif any(t in data for t in tokens):
            out[p] = "certificate ownership token"
    return out


def test_no_secret_under_the_cloud_folder_is_readable_by_group_or_others(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-0001"])
    info = c.up()
    try:
        cert, key = c.issue_claim("secrets")
        claim = Client(info["port"], c.ca.cert_path, cert, key, "claimer-secrets").start()
        try:
            idc = identity_client(claim)
            created = idc.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=new_csr()[0])
            ).result(20)
            idc.register_thing(
                iotidentity.RegisterThingRequest(
                    template_name="iot-agent-fleet",
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"SerialNumber": "SN-0001"},
                )
            ).result(20)
            # A second certificate whose token is still pending: two live tokens on disk.
            pending = idc.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=new_csr()[0])
            ).result(20)
        finally:
            claim.stop()
        tokens = [created.certificate_ownership_token.encode(), pending.certificate_ownership_token.encode()]
        assert all(c.registry.certificate_by_token(t.decode()) for t in tokens)

        found = _secret_files(c.directory, tokens)
        names = {p.relative_to(c.directory).as_posix() for p in found}
        # What must be among them: the registry with its WAL (the service and this process have it
        # open), the CA, server, service and claim keys, and the URL-signing key.
        assert {
            "registry.sqlite",
            "registry.sqlite-wal",
            "registry.sqlite-shm",
            "pki/localcloud-root-CA.key",
            "pki/server.key",
            "pki/service.key",
            "pki/claim-secrets.key",
            "pki/url-secret",
        } <= names, names
        assert any(
            why == "certificate ownership token" or p.name.startswith("registry.sqlite") for p, why in found.items()
        )
        readable = {
            p.relative_to(c.directory).as_posix(): (oct(p.stat().st_mode & 0o777), why)
            for p, why in found.items()
            if p.stat().st_mode & GROUP_OTHER
        }
        assert not readable, f"secrets readable by group/others: {readable}"
        # The folders that hold them: the cloud's own folder and pki/ are 0700.
        for d in {c.directory, c.directory / "pki", *(p.parent for p in found)}:
            assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode & 0o777))
    finally:
        c.down()


def test_a_registry_left_world_readable_by_an_older_version_is_tightened(tmp_path):
    path = tmp_path / "old" / "registry.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES ('live token')")
    db.commit()
    for f in path.parent.iterdir():
        os.chmod(f, 0o644)
    assert {f.name for f in path.parent.iterdir()} >= {"registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm"}
    reg = Registry(path)
    try:
        for f in path.parent.iterdir():
            assert f.stat().st_mode & 0o777 == 0o600, (f.name, oct(f.stat().st_mode & 0o777))
    finally:
        reg.close()
        db.close()


def test_a_new_registry_and_its_wal_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        reg = Registry(tmp_path / "fresh" / "registry.sqlite")
        reg.allow_serials(["SN-1"])  # a write: the -wal and -shm files exist now
    finally:
        os.umask(old)
    try:
        files = sorted((tmp_path / "fresh").iterdir())
        assert [f.name for f in files] == ["registry.sqlite", "registry.sqlite-shm", "registry.sqlite-wal"]
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in files), [(f.name, oct(f.stat().st_mode)) for f in files]
    finally:
        reg.close()
